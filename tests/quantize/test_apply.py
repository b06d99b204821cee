import pytest
import torch

from qtool.errors import QtoolError
from qtool.quantize.apply import plan_layers, quantize_model
from qtool.quantize.methods import METHODS
from qtool.quantize.scheme import Override, Recipe, Scheme


def test_lm_head_stays_dense_and_every_block_linear_is_planned(tiny_llama):
    plan = plan_layers(tiny_llama, Recipe())
    assert plan["lm_head"] is None
    quantized = [name for name, scheme in plan.items() if scheme is not None]
    assert len(quantized) == 2 * 7
    assert all(".layers." in name for name in quantized)


def test_skip_patterns_leave_layers_dense(tiny_llama):
    result = quantize_model(tiny_llama, Recipe(overrides=(Override("down_proj", None),)))
    assert "model.layers.0.mlp.down_proj" in result.skipped
    assert "model.layers.0.mlp.down_proj" not in result.weights
    assert len(result.weights) == 2 * 6


def test_tied_lm_head_cannot_be_quantized_alone(tiny_llama):
    with pytest.raises(QtoolError, match="shares its weight with the input embeddings"):
        plan_layers(tiny_llama, Recipe(overrides=(Override("lm_head", Scheme()),)))


def test_group_size_that_does_not_divide_names_layers_and_sizes_that_work(tiny_llama):
    with pytest.raises(QtoolError) as error:
        quantize_model(tiny_llama, Recipe(scheme=Scheme(4, 48, False)))
    message = str(error.value)
    assert "model.layers.0.self_attn.q_proj" in message
    assert "group sizes that fit every quantized layer: 8, 16, 32, 64, -1" in message


def test_skipping_everything_is_an_error(tiny_llama):
    with pytest.raises(QtoolError, match="no layer is left to quantize"):
        quantize_model(tiny_llama, Recipe(overrides=(Override(".", None),)))


def test_unknown_method_lists_the_registered_ones(tiny_llama):
    with pytest.raises(QtoolError, match=r"unknown method .magic.; choose one of: awq, awq\+gptq, gptq, rtn"):
        quantize_model(tiny_llama, Recipe(method="magic"))
    assert "rtn" in METHODS


def test_rtn_leaves_the_model_unchanged_and_reports_relative_error(tiny_llama):
    before = {name: p.clone() for name, p in tiny_llama.state_dict().items()}
    result = quantize_model(tiny_llama, Recipe(scheme=Scheme(4, 32, True)))
    assert all(torch.equal(before[name], p) for name, p in tiny_llama.state_dict().items())
    for name, weight in result.weights.items():
        original = tiny_llama.get_submodule(name).weight
        error = (original - weight.dequantize()).pow(2).sum() / original.pow(2).sum()
        assert result.errors[name]["error"] == pytest.approx(error.item(), rel=1e-4)
        assert 0 < result.errors[name]["error"] < 0.05


def test_more_bits_give_less_error(tiny_llama):
    errors = {
        bits: sum(e["error"] for e in quantize_model(tiny_llama, Recipe(scheme=Scheme(bits, 32, False))).errors.values())
        for bits in (2, 3, 4, 8)
    }
    assert errors[2] > errors[3] > errors[4] > errors[8]


@pytest.mark.parametrize("true_sequential", [True, False])
def test_gptq_quantizes_every_block_linear_and_beats_rtn_on_the_outputs(tiny_llama, true_sequential):
    import copy

    from qtool.quantize.scheme import GPTQOptions

    samples = torch.randint(0, 300, (8, 32))
    scheme = Scheme(3, 32, False)
    rtn = quantize_model(tiny_llama, Recipe(scheme=scheme))
    calibrated = copy.deepcopy(tiny_llama)
    gptq = quantize_model(calibrated, Recipe(method="gptq", scheme=scheme, gptq=GPTQOptions(true_sequential=true_sequential)),
                          calibration=samples, batch_size=3)
    assert gptq.weights.keys() == rtn.weights.keys() and gptq.skipped == ["lm_head"]
    assert all(entry["kind"] == "output" for entry in gptq.errors.values())

    def logits_with(weights):
        model = copy.deepcopy(tiny_llama)
        for name, weight in weights.items():
            model.get_submodule(name).weight.data = weight.dequantize()
        with torch.no_grad():
            return model(samples).logits

    with torch.no_grad():
        reference = tiny_llama(samples).logits
    gptq_error = (logits_with(gptq.weights) - reference).pow(2).mean()
    rtn_error = (logits_with(rtn.weights) - reference).pow(2).mean()
    assert gptq_error < 0.8 * rtn_error
    # the calibrated model now holds its dequantized weights
    assert torch.equal(calibrated.model.layers[1].mlp.down_proj.weight, gptq.weights["model.layers.1.mlp.down_proj"].dequantize())


def test_gptq_without_calibration_data_is_an_error(tiny_llama):
    with pytest.raises(QtoolError, match="needs calibration data"):
        quantize_model(tiny_llama, Recipe(method="gptq"))


def test_an_interrupted_gptq_run_resumes_to_the_same_weights(tmp_path):
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from qtool.quantize.resume import BlockStore

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)
    model = LlamaForCausalLM(config).eval()
    samples = torch.randint(0, 300, (4, 32))
    recipe = Recipe(method="gptq", scheme=Scheme(4, 32, False))
    whole = quantize_model(copy.deepcopy(model), recipe, calibration=samples)

    def stop_at_block_two(index, count):
        if index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_model(copy.deepcopy(model), recipe, calibration=samples, on_block=stop_at_block_two,
                       store=BlockStore(tmp_path / "work", "run-1", resume=False))
    store = BlockStore(tmp_path / "work", "run-1", resume=True)
    assert store.finished == [0, 1]
    calibrated = []
    resumed = quantize_model(copy.deepcopy(model), recipe, calibration=samples, store=store,
                             on_layer=lambda name, done, total: calibrated.append(name))
    assert all(".layers.2." in name or ".layers.3." in name for name in calibrated)
    assert list(resumed.weights) == list(whole.weights)
    assert all(weight.packed.is_meta for weight in resumed.weights.values())  # held in the store
    for name, weight in whole.weights.items():
        assert torch.equal(store.read(name).packed, weight.packed), name
        assert torch.equal(store.read(name).scales, weight.scales), name
        assert resumed.errors[name] == whole.errors[name]


def test_state_of_another_run_is_never_reused(tmp_path):
    from qtool.quantize.resume import BlockStore

    store = BlockStore(tmp_path / "work", "run-1", resume=False)
    store.save(0, {}, {})
    assert BlockStore(tmp_path / "work", "run-1", resume=True).finished == [0]
    assert BlockStore(tmp_path / "work", "run-2", resume=True).finished == []
    assert not (tmp_path / "work").exists()


def test_calibrated_methods_refuse_layers_outside_the_blocks_before_any_work():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)
    recipe = Recipe(method="gptq", overrides=(Override("lm_head", Scheme()),))
    with pytest.raises(QtoolError, match="lm_head lie outside the decoder blocks"):
        quantize_model(LlamaForCausalLM(config), recipe, calibration=torch.randint(0, 300, (2, 8)))
