import copy

import pytest
import torch

from qtool.calibrate.pipeline import BlockRun, calibrate_sequentially, capture_inputs, decoder_blocks
from qtool.calibrate.stats import HessianStat


@pytest.mark.parametrize("features", [16, 600])  # one product; the quadrant split
def test_running_hessian_equals_the_batch_formula(features):
    rows = [torch.randn(3, 5, features), torch.randn(7, features), torch.randn(1, 2, features).bfloat16()]
    stat = HessianStat(features)
    for batch in rows:
        stat.update(batch)
    everything = torch.cat([r.reshape(-1, features).float() for r in rows])
    assert stat.count == everything.shape[0]
    assert torch.allclose(stat.hessian, 2 * everything.T @ everything / everything.shape[0], atol=1e-5)


def test_blocks_are_found_by_structure(tiny_llama):
    name, blocks = decoder_blocks(tiny_llama)
    assert name == "model.layers" and blocks is tiny_llama.model.layers


def block_run(model, samples, index=0):
    _, blocks = decoder_blocks(model)
    inputs = capture_inputs(model, blocks, samples, batch_size=2, device=torch.device("cpu"), storage=torch.device("cpu"))
    return BlockRun(index, f"model.layers.{index}", blocks[index], inputs, torch.device("cpu"))


def test_linears_are_grouped_by_shared_input_in_forward_order(tiny_llama):
    run = block_run(tiny_llama, torch.randint(0, 300, (4, 16)))
    assert run.input_groups() == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def test_collected_statistics_see_every_sample(tiny_llama):
    samples = torch.randint(0, 300, (4, 16))
    run = block_run(tiny_llama, samples)
    run.input_groups()  # traced once on its own, before the hook below listens
    seen = []
    handle = run.linears["mlp.down_proj"].register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 128)))
    stats = run.collect(["mlp.down_proj"], lambda linear: HessianStat(linear.in_features))
    handle.remove()
    inputs = torch.cat(seen)
    assert inputs.shape[0] == 4 * 16 and stats["mlp.down_proj"].count == 64
    assert torch.allclose(stats["mlp.down_proj"].hessian, 2 * inputs.T @ inputs / 64, atol=1e-5)


def test_block_inputs_match_the_models_own_hidden_states(tiny_llama):
    samples = torch.randint(0, 300, (4, 16))
    with torch.no_grad():
        hidden = tiny_llama(samples, output_hidden_states=True).hidden_states
    seen = []

    def record(run: BlockRun):
        seen.append(torch.cat(run.inputs.hidden))

    calibrate_sequentially(tiny_llama, samples, record, batch_size=3)
    assert len(seen) == 2
    for index, inputs in enumerate(seen):
        assert torch.allclose(inputs, hidden[index], atol=1e-5)


def test_a_handler_that_changes_weights_changes_what_later_blocks_see(tiny_llama):
    samples = torch.randint(0, 300, (2, 16))
    untouched = []
    calibrate_sequentially(copy.deepcopy(tiny_llama), samples, lambda run: untouched.append(torch.cat(run.inputs.hidden)))
    changed = []

    def zero_first_block(run: BlockRun):
        changed.append(torch.cat(run.inputs.hidden))
        if run.index == 0:
            run.linears["mlp.down_proj"].weight.data.zero_()

    calibrate_sequentially(tiny_llama, samples, zero_first_block)
    assert torch.equal(untouched[0], changed[0])
    assert not torch.allclose(untouched[1], changed[1])


@pytest.mark.parametrize("matmul_dtype", [None, torch.bfloat16])
def test_replaying_kept_outputs_computes_what_recomputing_computes(tiny_llama, matmul_dtype):
    """True-sequential passes that replay what earlier passes kept see bit-identical inputs and
    produce bit-identical block outputs, while running the attention projections far less."""
    samples = torch.randint(0, 300, (4, 16))

    def calibrate(memo_factor):
        model = copy.deepcopy(tiny_llama)
        hessians, query_calls = [], []
        for layer in model.model.layers:
            layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: query_calls.append(1))

        def handler(run: BlockRun):
            for group in run.input_groups():
                stats = run.collect([group[0]], lambda linear: HessianStat(linear.in_features), then_changes=group)
                hessians.append(stats[group[0]].hessian)
                for name in group:
                    run.linears[name].weight.data = run.linears[name].weight.data.round(decimals=1)

        calibrate_sequentially(model, samples, handler, batch_size=2, matmul_dtype=matmul_dtype,
                               memo_factor=memo_factor)
        with torch.no_grad():
            logits = model(samples).logits
        return hessians, logits, len(query_calls)

    recomputed, replayed = calibrate(0.0), calibrate(8.0)
    assert all(torch.equal(a, b) for a, b in zip(recomputed[0], replayed[0]))
    assert torch.equal(recomputed[1], replayed[1])
    assert replayed[2] <= recomputed[2] / 2
