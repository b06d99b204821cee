"""The runtime on tiny random models: model code against transformers, the block pool's invariants,
the engine's greedy generations against transformers' through chunked prefill, preemption and
prefix caching, and sampling."""

import pytest
import torch

from qtool.runtime.cache import BlockPool, block_hashes
from qtool.runtime.engine import Engine
from qtool.runtime.models.llama import LlamaForCausalLM, LlamaSpec
from qtool.runtime.sampling import SamplingParams, first_argmax, sample
from qtool.errors import QtoolError

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=300)


def config(family: str, **extra):
    import transformers

    names = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
    defaults = {"llama": dict(num_key_value_heads=2), "mistral": dict(num_key_value_heads=2, sliding_window=None),
                "qwen2": dict(num_key_value_heads=2), "qwen3": dict(num_key_value_heads=2, head_dim=16)}
    return getattr(transformers, names[family])(**SIZES, **{**defaults[family], **extra})


def pair(family: str = "llama", std: float = 0.02, **extra):
    """A transformers model and the runtime's model with the same random weights (float32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config(family, initializer_range=std, **extra)).eval()
    ours = LlamaForCausalLM(reference.config)
    ours.load_state_dict(reference.state_dict(), strict=False)
    ours.tie_weights()
    return reference, ours.eval()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_model_code_gives_transformers_logits(family):
    reference, ours = pair(family)
    ids = torch.randint(0, 300, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_unsupported_families_are_named():
    from transformers import GPT2Config

    with pytest.raises(QtoolError, match="Llama family"):
        LlamaSpec.from_config(GPT2Config())


class Tokens:
    """A stand-in tokenizer over raw ids: the engine's tests feed token ids, not text."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def greedy_reference(model, prompt: list[int], count: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=count, min_new_tokens=count, do_sample=False)
    return out[0, len(prompt):].tolist()


PROMPTS = [[5, 17, 99, 3], list(range(20, 57)), [250, 7] * 9, [1], list(range(100, 171, 3))]


def engine_for(model, **options) -> Engine:
    return Engine(model, Tokens(), "cpu", torch.float32, **options)


@pytest.mark.parametrize("options", [
    dict(block_size=16),
    dict(block_size=4, max_batched_tokens=8),  # chunked prefill: prompts over several steps
    dict(block_size=4, cache_bytes=4 * 14 * 2 * 2 * 2 * 16 * 4),  # 14 blocks: preemption by recompute
])
def test_engine_generates_what_transformers_generates(options):
    reference, model = pair(std=0.5)  # large weights: outputs that vary from token to token
    engine = engine_for(model, **options)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    sequences = [engine.add(prompt, params) for prompt in PROMPTS]
    finished = engine.run()
    for prompt, sequence in zip(PROMPTS, sequences):
        assert finished[sequence.id].token_ids == greedy_reference(reference, prompt, 12)
    if "cache_bytes" in options:
        assert engine.scheduler.preemptions > 0
    assert engine.pool.free_blocks == engine.pool.total_blocks  # every block returned


def test_prompts_sharing_a_prefix_share_its_blocks():
    reference, model = pair(std=0.5)
    engine = engine_for(model, block_size=4)
    shared = list(range(30, 50))
    first = engine.add(shared + [7, 8], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    engine.step()  # the first prompt's prefill registers its full blocks
    second = engine.add(shared + [9], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    engine.step()
    assert second.blocks[:5] == first.blocks[:5]  # the 20 shared tokens: 5 blocks of 4
    assert all(engine.pool.counts[block] == 2 for block in first.blocks[:5])
    finished = engine.run()
    assert finished[second.id].token_ids == greedy_reference(reference, shared + [9], 3)


def test_blocks_enter_the_prefix_index_under_the_hash_of_their_whole_prefix():
    """Hashes are chained on step by step (blocks that decoded tokens fill too, and a sequence
    admitted on a cached prefix continues that prefix's chain)."""
    _, model = pair(std=0.5)
    engine = engine_for(model, block_size=4)
    shared = list(range(30, 50))
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    first = engine.add(shared + [7, 8], params)
    engine.step()
    second = engine.add(shared + [9], params)
    for _ in range(6):
        engine.step()
    for sequence in (first, second):
        expected = block_hashes(sequence.tokens[: sequence.computed], 4)
        assert sequence.registered == len(expected) == sequence.computed // 4 > 5
        assert [engine.pool.by_hash[value] for value in expected] == sequence.blocks[: len(expected)]


def test_a_request_larger_than_the_whole_cache_is_refused():
    _, model = pair()
    engine = engine_for(model, block_size=4, cache_bytes=4 * 2 * 2 * 2 * 16 * 4 * 3)  # 3 blocks
    with pytest.raises(QtoolError, match="more cache than there is"):
        engine.add(list(range(10)), SamplingParams(max_tokens=8))


def test_block_pool_keeps_its_invariants():
    pool = BlockPool(6, 4)
    a = pool.allocate(3)
    pool.register(a[0], 111)
    pool.acquire([a[0]])
    assert pool.counts[a[0]] == 2 and pool.free_blocks == 3
    pool.release(a)
    assert pool.counts[a[0]] == 1 and pool.free_blocks == 5
    pool.release([a[0]])
    assert pool.free_blocks == 6 and pool.by_hash[111] == a[0]  # freed, still findable
    again = pool.allocate(6)
    assert sorted(again) == list(range(6)) and 111 not in pool.by_hash  # handed out: forgotten
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_sampling_is_reproducible_per_request_and_greedy_at_the_limits():
    logits = torch.randn(3, 50)
    seeded = [SamplingParams(temperature=0.8, seed=7)] * 3

    def draw(params):
        return sample(logits, params, [torch.Generator().manual_seed(p.seed) if p.seed is not None else None
                                       for p in params])

    assert torch.equal(draw(seeded), draw(seeded))
    mixed = [SamplingParams(temperature=0.8, seed=7), SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=7)]
    assert draw(mixed)[0] == draw(seeded)[0] and draw(mixed)[1] == logits[1].argmax()
    assert torch.equal(draw([SamplingParams(top_k=1, seed=1)] * 3), logits.argmax(-1))
    assert torch.equal(draw([SamplingParams(top_p=1e-6, seed=1)] * 3), logits.argmax(-1))
    top3 = draw([SamplingParams(top_k=3, temperature=5.0, seed=s) for s in range(3)])
    assert all(token in logits[row].topk(3).indices for row, token in enumerate(top3.tolist()))


def test_stop_strings_end_the_output_before_them():
    _, model = pair(std=0.5)
    engine = engine_for(model)
    probe = engine.add([5, 17, 99], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    tokens = engine.run()[probe.id].token_ids
    stop = str(tokens[3])
    sequence = engine.add([5, 17, 99], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, stop=[stop]))
    out = engine.run()[sequence.id]
    assert out.finish_reason == "stop" and stop not in out.text and out.token_ids == tokens[: len(out.token_ids)]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=0), dict(top_p=0), dict(max_tokens=0)])
def test_bad_sampling_settings_are_refused(bad):
    with pytest.raises(QtoolError):
        SamplingParams(**bad)


def test_sixty_four_requests_through_a_cache_for_eight_all_finish_right():
    """A KV budget for 8 sequences and 64 requests: preemption by recompute, no request lost, every
    output the one an unconstrained engine gives."""
    _, model = pair(std=0.5)
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 300, (int(torch.randint(4, 13, (1,), generator=generator)),), generator=generator).tolist()
               for _ in range(64)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def outputs(engine):
        sequences = [engine.add(prompt, params) for prompt in prompts]
        finished = engine.run()
        return [finished[sequence.id].token_ids for sequence in sequences]

    per_block = 2 * 2 * 4 * 2 * 16 * 4  # layers, k/v, block size 4, kv heads, head dim, float32
    tight = engine_for(model, block_size=4, cache_bytes=8 * 5 * per_block, max_sequences=64)  # 5 blocks a sequence
    roomy = engine_for(model, block_size=4)
    assert outputs(tight) == outputs(roomy)
    assert tight.scheduler.preemptions > 0 and tight.pool.free_blocks == tight.pool.total_blocks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kv_cache", ["auto", "fp8"])
def test_decode_steps_replayed_from_cuda_graphs_give_the_eager_tokens(kv_cache):
    """Requests finishing one after another: batches of 5, 4, 3, 2, 1 run padded in the graphs of
    8, 4, 4, 2 and 1 sequences, and give the tokens of eager steps."""
    from qtool.runtime.kv_cache import use_kv_cache_dtype

    _, model = pair(std=0.5)
    model = model.cuda()
    use_kv_cache_dtype(model, kv_cache)

    def outputs(graphs: bool):
        engine = Engine(model, Tokens(), "cuda", torch.float32, block_size=4, cuda_graphs=graphs, cache_bytes=1 << 24)
        sequences = [engine.add(prompt, SamplingParams(temperature=0, max_tokens=4 + 3 * index, ignore_eos=True))
                     for index, prompt in enumerate(PROMPTS)]
        finished = engine.run()
        return engine, [finished[sequence.id].token_ids for sequence in sequences]

    eager_engine, eager = outputs(False)
    graph_engine, graphed = outputs(True)
    assert graphed == eager and eager_engine.graphs is None
    assert sorted(graph_engine.graphs.graphs) == [1, 2, 4, 8]
    assert graph_engine.pool.free_blocks == graph_engine.pool.total_blocks


def test_a_step_run_ahead_is_dropped_for_a_sequence_that_stopped():
    """Decode steps run one ahead of the host: a sequence that meets EOS while the step after is
    already launched ends there (that step's token for it dropped), the others go on as transformers
    generates, and every block comes back."""
    reference, model = pair(std=0.5)
    engine = engine_for(model, block_size=4)
    expected = [greedy_reference(reference, prompt, 10) for prompt in PROMPTS[:3]]
    eos = expected[0][4]  # the first prompt's fifth token ends it
    engine.eos = {eos}
    sequences = [engine.add(prompt, SamplingParams(temperature=0, max_tokens=10)) for prompt in PROMPTS[:3]]
    finished, ran_ahead = {}, 0
    while not engine.scheduler.done:
        for event in engine.step():
            assert event.sequence.id not in finished  # nothing more of a finished sequence
            if event.finished is not None:
                finished[event.finished.id] = event.finished
        ran_ahead += engine.in_flight is not None
    for sequence, tokens in zip(sequences, expected):
        out = finished[sequence.id]
        assert out.token_ids == (tokens[: tokens.index(eos)] if eos in tokens else tokens)
        assert out.finish_reason == ("stop" if eos in tokens else "length")
    assert ran_ahead > 0 and engine.pool.free_blocks == engine.pool.total_blocks


@pytest.mark.parametrize("width", [128256, 49152, 1187, 13, 1])
def test_the_chunked_argmax_is_torchs(width):
    """The first index of the largest value, ties and NaN included, for widths of many divisors, a
    prime (one chunk) and one."""
    logits = torch.randn(5, width).half()
    logits[1] = 0.0  # all tied: index 0
    logits[2, width // 2 :] = logits[2].max() + 1  # tied from the middle on
    logits[3, -1] = float("nan")
    logits[4, width // 3] = float("nan")
    logits[4, -1] = float("nan")
    assert torch.equal(first_argmax(logits), logits.argmax(dim=-1))
