"""The engine: requests in, tokens out, many sequences at once.

`Engine` owns the model, the paged KV cache, the block pool and the scheduler. Each `step()` asks
the scheduler for the step's sequences and token counts, runs their tokens through the model as
one flattened batch (keys and values into the cache, attention through block tables), samples
the next token of every sequence whose scheduled tokens reach its end, and retires sequences
that hit EOS, a stop string or `max_tokens`. `LLM(path).generate(prompts, params)` is the
offline front door; `Engine.add` / `step` is what a server drives.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from qtool.errors import QtoolError
from qtool.runtime.attention import KVCache, PagedBatch
from qtool.runtime.cache import BlockPool
from qtool.runtime.cuda_graphs import DecodeGraphs
from qtool.runtime.kv_cache import attention_layers, use_kv_cache_dtype
from qtool.runtime.sampling import SamplingParams, sample
from qtool.runtime.scheduler import Scheduled, Scheduler, Sequence, Status

CPU_CACHE_BYTES = 512 << 20  # KV cache on the CPU unless told otherwise


@dataclass
class RequestOutput:
    """A finished request: its prompt's ids, the generated ids and text, and why it stopped
    ("stop": EOS or a stop string; "length": max_tokens)."""

    id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str


@dataclass(frozen=True)
class StepShape:
    """What the last step ran: its tokens, its sequences, and whether each only decoded one."""

    tokens: int
    sequences: int
    decoding: bool


@dataclass
class StepEvent:
    """What one step did to one sequence: the token it sampled, and its output if it finished."""

    sequence: Sequence
    token: int
    finished: RequestOutput | None


@dataclass
class StepInputs:
    """One step's int32 inputs on the device, views into `flat`, which one upload filled in this
    order: token ids, positions and cache slots [tokens], context lengths [sequences], where each
    sequence's tokens start [sequences + 1], the hidden rows to sample, block tables [sequences,
    width]. The first four come first, so a decode step's are `flat[:4 * sequences]`."""

    flat: torch.Tensor
    ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    context_lens: torch.Tensor
    starts: torch.Tensor
    sampled_rows: torch.Tensor
    block_tables: torch.Tensor
    query_starts: list[int]

    @classmethod
    def upload(cls, parts: list[list[int]], tables: list[list[int]], device: torch.device) -> "StepInputs":
        """`parts`: ids, positions, slots, lengths, starts, sampled rows; `tables` padded with zeros to
        the widest. From pinned host memory on CUDA."""
        width = max(len(table) for table in tables)
        values = [value for part in parts for value in part]
        values += [block for table in tables for block in table + [0] * (width - len(table))]
        host = torch.tensor(values, dtype=torch.int32, pin_memory=device.type == "cuda")
        flat = host.to(device, non_blocking=True)
        *views, flat_tables = flat.split([len(part) for part in parts] + [len(tables) * width])
        return cls(flat, *views, flat_tables.view(len(tables), width), parts[4])

    def batch(self, cache: KVCache) -> PagedBatch:
        return PagedBatch(cache, self.slots, self.query_starts, self.context_lens, self.block_tables,
                          starts=self.starts)


class Engine:
    def __init__(self, model, tokenizer, device: torch.device | str, dtype: torch.dtype, block_size: int = 16,
                 max_batched_tokens: int = 2048, max_sequences: int = 256, cache_bytes: int | None = None,
                 memory_utilization: float = 0.9, cuda_graphs: bool = True):
        """`cuda_graphs`: decode steps replay CUDA graphs on a GPU (`qtool.runtime.cuda_graphs`)."""
        self.model, self.tokenizer = model, tokenizer
        self.device, self.dtype = torch.device(device), dtype
        spec = model.spec
        cache_dtype = next(iter(attention_layers(model).values())).kv_cache_dtype or dtype  # float8 if the model uses it
        per_block = KVCache.bytes_per_block(spec.layers, block_size, spec.kv_heads, spec.head_dim, cache_dtype)
        graphs = cuda_graphs and self.device.type == "cuda"
        blocks = (cache_bytes or self._cache_budget(memory_utilization)) // per_block - graphs  # one scratch block
        if blocks < 1:
            raise QtoolError("no memory is left for the KV cache; lower the model's footprint or allow more memory")
        self.cache = KVCache.allocate(spec.layers, blocks + graphs, block_size, spec.kv_heads, spec.head_dim,
                                      cache_dtype, self.device)
        self.pool = BlockPool(blocks, block_size)
        self.graphs = None
        if graphs:
            self.graphs = DecodeGraphs(model, self.cache, blocks, max_sequences,
                                       min(blocks, -(-spec.max_positions // block_size)))
        self.scheduler = Scheduler(self.pool, max_batched_tokens, max_sequences, spec.max_positions)
        self.eos = _eos_ids(model, tokenizer)
        self.ids = itertools.count()
        self.last_step = StepShape(0, 0, False)

    def _cache_budget(self, utilization: float) -> int:
        """On CUDA, `utilization` of the device's memory less what is in use and a margin for a
        step's activations; on the CPU a fixed budget."""
        if self.device.type != "cuda":
            return CPU_CACHE_BYTES
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        return int(total * utilization - used - (1 << 30))

    def add(self, prompt: str | list[int], params: SamplingParams) -> Sequence:
        if isinstance(prompt, str) and self.tokenizer is None:
            raise QtoolError("this model has no tokenizer; give prompts as token ids")
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise QtoolError("the prompt is empty")
        sequence = Sequence(next(self.ids), ids, params)
        self.scheduler.add(sequence)
        return sequence

    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        plan = self.scheduler.schedule()
        self.last_step = StepShape(sum(item.count for item in plan), len(plan),
                                   bool(plan) and all(item.count == 1 for item in plan))
        if not plan:
            return []
        sampling = [index for index, item in enumerate(plan) if item.samples]
        if self._replays_graph(plan, sampling):
            logits = self.graphs.logits(self._inputs(plan, self.graphs.size_for(len(plan))))[: len(plan)]
            self.scheduler.finish_step(plan)
        else:
            inputs = self._inputs(plan, sampling=sampling)
            hidden = self.model.forward_tokens(inputs.ids, inputs.positions, inputs.batch(self.cache))
            self.scheduler.finish_step(plan)
            if not sampling:
                return []
            logits = self.model.compute_logits(hidden[inputs.sampled_rows])
        sequences = [plan[index].sequence for index in sampling]
        tokens = sample(logits, [s.params for s in sequences], [s.generator for s in sequences]).tolist()
        return [self._advance(sequence, token) for sequence, token in zip(sequences, tokens)]

    def _replays_graph(self, plan: list[Scheduled], sampling: list[int]) -> bool:
        """A step where every sequence decodes one token, at a batch size a graph is kept for."""
        decoding = self.last_step.decoding and len(sampling) == len(plan)
        return self.graphs is not None and decoding and self.graphs.size_for(len(plan)) is not None

    def _inputs(self, plan: list[Scheduled], rows: int | None = None, sampling: list[int] = ()) -> StepInputs:
        """The step's inputs on the device, in one copy from pinned host memory. `rows`: a captured
        graph's batch size, the rows past the plan's decoding the scratch slot alone; `sampling`:
        the plan's items whose last token's hidden state is sampled."""
        block_size = self.pool.block_size
        ids, positions, slots, lengths, ends, tables = [], [], [], [], [], []
        for item in plan:
            sequence = item.sequence
            span = range(item.start, item.start + item.count)
            ids += sequence.tokens[item.start : item.start + item.count]
            positions += span
            slots += [sequence.blocks[p // block_size] * block_size + p % block_size for p in span]
            lengths.append(item.start + item.count)
            ends.append(len(ids) - 1)
            tables.append(sequence.blocks)
        padding = (rows or len(plan)) - len(plan)
        if padding:
            ids, positions = ids + [0] * padding, positions + [0] * padding
            slots, lengths = slots + [self.graphs.scratch_slot] * padding, lengths + [1] * padding
            tables = tables + [[self.graphs.scratch_block]] * padding
        starts = list(itertools.accumulate((item.count for item in plan), initial=0))
        starts += [starts[-1] + 1 + row for row in range(padding)]  # a padding row's one token
        return StepInputs.upload([ids, positions, slots, lengths, starts, [ends[index] for index in sampling]], tables,
                                 self.device)

    def _advance(self, sequence: Sequence, token: int) -> StepEvent:
        params = sequence.params
        if token in self.eos and not params.ignore_eos:
            return StepEvent(sequence, token, self._finish(sequence, "stop"))
        sequence.tokens.append(token)
        if params.stop and any(stop in self.text_of(sequence) for stop in params.stop):
            return StepEvent(sequence, token, self._finish(sequence, "stop"))
        if len(sequence.output) >= params.max_tokens:
            return StepEvent(sequence, token, self._finish(sequence, "length"))
        return StepEvent(sequence, token, None)

    def _finish(self, sequence: Sequence, reason: str) -> RequestOutput:
        self.scheduler.finish(sequence, reason)
        text = self.text_of(sequence)
        cut = min((text.index(stop) for stop in sequence.params.stop if stop in text), default=len(text))
        return RequestOutput(sequence.id, sequence.prompt, sequence.output, text[:cut], reason)

    def text_of(self, sequence: Sequence) -> str:
        """The output so far as text ("" for a model without a tokenizer, e.g. a synthetic one)."""
        return "" if self.tokenizer is None else self.tokenizer.decode(sequence.output, skip_special_tokens=True)

    def run(self) -> dict[int, RequestOutput]:
        """Step until every added request has finished."""
        finished = {}
        while not self.scheduler.done:
            for event in self.step():
                if event.finished is not None:
                    finished[event.finished.id] = event.finished
        return finished


def _eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    return set(ids if isinstance(ids, list) else [] if ids is None else [ids])


class LLM:
    """A model folder, checkpoint, alias or hub id ready to generate: `LLM(path).generate(prompts)`."""

    def __init__(self, model: str | Path, device: str | None = None, dtype: torch.dtype | None = None,
                 trust_remote_code: bool = False, kv_cache_dtype: str = "auto", **engine_options):
        """`kv_cache_dtype`: "auto" (the activations' dtype) or "fp8" (`qtool.runtime.kv_cache`)."""
        from qtool.runtime.loader import load_model, load_tokenizer, supports_native
        from qtool.runtime.resolve import resolve_model

        folder = self.folder = resolve_model(str(model))
        if not supports_native(folder, trust_remote_code):
            raise QtoolError(f"{model} is not of the Llama family (llama, mistral, qwen2, qwen3) the runtime serves; "
                             f"`qtool eval --ppl` still measures it through transformers")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.float32 if device == "cpu" else torch.float16)
        self.tokenizer = load_tokenizer(folder, trust_remote_code)
        self.model = load_model(folder, dtype, device, trust_remote_code, native=True)
        use_kv_cache_dtype(self.model, kv_cache_dtype, self.tokenizer)
        self.engine = Engine(self.model, self.tokenizer, device, dtype, **engine_options)

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | None = None) -> list[RequestOutput]:
        """One output per prompt, in order."""
        params = params or SamplingParams()
        sequences = [self.engine.add(prompt, params) for prompt in prompts]
        finished = self.engine.run()
        return [finished[sequence.id] for sequence in sequences]


__all__ = ["LLM", "Engine", "RequestOutput", "SamplingParams", "Status"]
