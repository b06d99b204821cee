"""The engine: requests in, tokens out, many sequences at once.

`Engine` owns the model, the paged KV cache, the block pool and the scheduler. Each `step()` asks
the scheduler for the step's sequences and token counts, runs their tokens through the model as
one flattened batch (keys and values into the cache, attention through block tables), samples
the next token of every sequence whose scheduled tokens reach its end, and retires sequences
that hit EOS, a stop string or `max_tokens`. `LLM(path).generate(prompts, params)` is the
offline front door; `Engine.add` / `step` is what a server drives.

Decoding runs one step ahead of the host: while the device computes a decode step, the engine
launches the next one, its token ids taken on the device from the step before (`Flight`), and only
then waits for the earlier step's tokens (copied to the host right behind that step) to retire
sequences and report them. The host's work for a step (scheduling, the upload, reading tokens back:
~0.2 ms on an H200's host, a tenth of a batch-1 step of an 8B model) then overlaps the device's
instead of adding to it. A step run ahead for a sequence that has meanwhile stopped (EOS, a stop
string) is dropped; its cache write lands past the sequence's end, in a block no prefix index holds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qtool.errors import QtoolError
from qtool.kernels.dispatch import indexed
from qtool.runtime.attention import KVCache, PagedBatch
from qtool.runtime.cache import BlockPool
from qtool.runtime.cuda_graphs import DecodeGraphs
from qtool.runtime.kv_cache import attention_layers, use_kv_cache_dtype
from qtool.runtime.quant_linear import make_kernel_views
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
class Flight:
    """A step launched on the device whose sampled tokens the host has not read yet: its plan, its
    shape, the next tokens [sequences sampled] on the device (None: none sampled) and whose they are."""

    plan: list[Scheduled]
    shape: StepShape
    tokens: torch.Tensor | None = None
    sampled: list[Sequence] = field(default_factory=list)
    copy: tuple[torch.Tensor, torch.cuda.Event] | None = None  # the tokens' copy on its way to the host

    @classmethod
    def with_tokens(cls, plan: list[Scheduled], shape: StepShape, tokens: torch.Tensor, sampled: list[Sequence]
                 ) -> "Flight":
        """A step that sampled `tokens`: on CUDA their copy to pinned host memory is issued right
        behind them, so that reading them waits for this step only (a copy issued when they are
        read would queue behind the step launched ahead)."""
        copy = None
        if tokens.is_cuda:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            copy = (host, copied)
        return cls(plan, shape, tokens, sampled, copy)

    def host_tokens(self) -> list[int]:
        """The sampled tokens, once this step has made them."""
        if self.copy is None:
            return self.tokens.tolist()
        host, copied = self.copy
        copied.synchronize()
        return host.tolist()

    @property
    def live(self) -> bool:
        """Whether any of its sequences still runs (others stopped or were aborted meanwhile)."""
        return any(item.sequence.status is Status.RUNNING for item in self.plan)


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
        self.device, self.dtype = indexed(torch.device(device)), dtype  # the layers' kernel views' key
        spec = model.spec
        cache_dtype = next(iter(attention_layers(model).values())).kv_cache_dtype or dtype  # float8 if the model uses it
        per_block = KVCache.bytes_per_block(spec.layers, block_size, spec.kv_heads, spec.head_dim, cache_dtype)
        graphs = cuda_graphs and self.device.type == "cuda"
        if self.device.type == "cuda":  # before the KV cache's budget, which must count them (not their scratch)
            make_kernel_views(model, self.device, dtype)
            torch.cuda.empty_cache()
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
        self.in_flight: Flight | None = None  # the decode step launched ahead

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
        """One step's events: the step launched ahead by the last call, or one scheduled now; before
        its tokens are read, the decode step after it is launched where it can be."""
        flight, self.in_flight = self.in_flight, None
        if flight is None or not flight.live:
            flight = self._launch(self.scheduler.schedule())
        self.in_flight = self._run_ahead(flight)
        self.last_step = flight.shape
        return self._collect(flight)

    def _launch(self, plan: list[Scheduled], ahead: torch.Tensor | None = None) -> Flight:
        """Puts a step on the device. `ahead`: the tokens [plan] of the step before, still on the
        device, as the ids of a decode step run ahead (each of its items samples)."""
        shape = StepShape(sum(item.count for item in plan), len(plan),
                          bool(plan) and all(item.count == 1 for item in plan))
        if not plan:
            return Flight(plan, shape)
        sampling = list(range(len(plan))) if ahead is not None else [i for i, item in enumerate(plan) if item.samples]
        if self._replays_graph(shape, sampling):
            logits = self.graphs.logits(self._inputs(plan, self.graphs.size_for(len(plan)), ahead=ahead))[: len(plan)]
        else:
            inputs = self._inputs(plan, sampling=sampling, ahead=ahead)
            hidden = self.model.forward_tokens(inputs.ids, inputs.positions, inputs.batch(self.cache))
            if not sampling:
                return Flight(plan, shape)
            logits = self.model.compute_logits(hidden[inputs.sampled_rows])
        sequences = [plan[index].sequence for index in sampling]
        tokens = sample(logits, [s.params for s in sequences], [s.generator for s in sequences])
        return Flight.with_tokens(plan, shape, tokens, sequences)

    def _replays_graph(self, shape: StepShape, sampling: list[int]) -> bool:
        """A step where every sequence decodes one token, at a batch size a graph is kept for."""
        decoding = shape.decoding and len(sampling) == shape.sequences
        return self.graphs is not None and decoding and self.graphs.size_for(shape.sequences) is not None

    def _run_ahead(self, flight: Flight) -> Flight | None:
        """The decode step after `flight`, launched before its tokens are read, where the scheduler
        would run the same sequences again (`Scheduler.extend`)."""
        if flight.tokens is None or len(flight.sampled) != len(flight.plan):
            return None
        plan = self.scheduler.extend(flight.plan)
        return None if plan is None else self._launch(plan, ahead=flight.tokens)

    def _collect(self, flight: Flight) -> list[StepEvent]:
        """Waits for a step's tokens and applies them to the sequences still running."""
        self.scheduler.finish_step([item for item in flight.plan if item.sequence.status is Status.RUNNING])
        if flight.tokens is None:
            return []
        tokens = flight.host_tokens()
        return [self._advance(sequence, token) for sequence, token in zip(flight.sampled, tokens)
                if sequence.status is Status.RUNNING]

    def _inputs(self, plan: list[Scheduled], rows: int | None = None, sampling: list[int] = (),
                ahead: torch.Tensor | None = None) -> StepInputs:
        """The step's inputs on the device, in one copy from pinned host memory. `rows`: a captured
        graph's batch size, the rows past the plan's decoding the scratch slot alone; `sampling`:
        the plan's items whose last token's hidden state is sampled; `ahead`: the ids of a decode
        step run ahead, on the device (copied in after the upload)."""
        block_size = self.pool.block_size
        ids, positions, slots, lengths, ends, tables = [], [], [], [], [], []
        for item in plan:
            sequence = item.sequence
            span = range(item.start, item.start + item.count)
            ids += [0] if ahead is not None else sequence.tokens[item.start : item.start + item.count]
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
        sampled_rows = [ends[index] for index in sampling]
        inputs = StepInputs.upload([ids, positions, slots, lengths, starts, sampled_rows], tables, self.device)
        if ahead is not None:
            inputs.ids[: len(plan)].copy_(ahead)
        return inputs

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
