import copy
import logging

import pytest
import torch

from qtool.calibrate.folding import scaling_groups
from qtool.calibrate.pipeline import calibrate_sequentially
from qtool.calibrate.stats import ActivationStat
from qtool.quantize.apply import plan_layers, quantize_model
from qtool.quantize.awq import fake_quantize, output_error, prepare_block, search_clip, search_scales
from qtool.quantize.scheme import AWQOptions, Recipe, Scheme

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=300)


def tiny(family: str):
    """A tiny random model of `family`, float32, in eval mode."""
    import transformers

    configs = {
        "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
        "llama-mha": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4)),
        "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2)),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
        "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=1, head_dim=16)),
        "opt": ("OPTConfig", "OPTForCausalLM", dict(ffn_dim=128, word_embed_proj_dim=64)),
    }
    config_name, model_name, extra = configs[family]
    sizes = dict(SIZES)
    if family == "opt":
        sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=300)
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**sizes, **extra)
    model = getattr(transformers, model_name)(config).float().eval()
    with torch.no_grad():  # norms away from their initial ones, so folding into them is tested
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(torch.rand_like(param) * 0.5)
    return model


FAMILIES = ["llama-gqa", "llama-mha", "mistral", "qwen2", "qwen3", "gemma", "opt"]
EXPECTED_PRODUCERS = {
    "llama-gqa": ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"],
    "llama-mha": ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"],
    "opt": ["self_attn_layer_norm", "self_attn.v_proj", "final_layer_norm", "fc1"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"],  # norms scaling by 1 + weight
}


@pytest.mark.parametrize("family", FAMILIES)
def test_folding_awq_scales_leaves_the_logits_unchanged(family, caplog):
    model = tiny(family)
    samples = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(samples).logits
    producers, offsets = [], []
    recipe = Recipe(method="awq", scheme=Scheme(4, 32, False), awq=AWQOptions(clip=False))
    plan = plan_layers(model, recipe)

    def fold_only(run):
        groups = scaling_groups(run)
        producers.append([group.producer for group in groups])
        offsets.append([group.offset for group in groups])
        prepare_block(run, plan, recipe, None)

    with caplog.at_level(logging.INFO):
        calibrate_sequentially(model, samples, fold_only)
    with torch.no_grad():
        after = model(samples).logits
    assert (after - before).abs().max() < 1e-4
    if family in EXPECTED_PRODUCERS:
        assert producers[0] == EXPECTED_PRODUCERS[family]
    else:
        assert "input_layernorm" in producers[0] and "mlp.up_proj" in producers[0]
    assert offsets[0][0] == (1.0 if family == "gemma" else 0.0)
    if family == "llama-gqa":  # o_proj: v_proj's heads are repeated
        assert "not scaled" in caplog.text


def correlated(rows=4096, features=128):
    outliers = torch.ones(features)
    outliers[:4] = 20  # a few channels with large activations, as in LLMs
    return (torch.randn(rows, features) @ (torch.randn(features, features) * 0.1 + torch.eye(features))) * outliers


def statistic(inputs):
    stat = ActivationStat(inputs.shape[1])
    stat.update(inputs)
    return stat


def test_searched_scales_lower_the_output_error_and_the_grid_includes_no_scaling():
    inputs, weight = correlated(), torch.randn(64, 128)
    stat, scheme = statistic(inputs), Scheme(4, 32, False)
    scales, ratio = search_scales(weight, stat, scheme, AWQOptions(), torch.float16)
    plain = output_error(weight - fake_quantize(weight, scheme, torch.float16), stat.hessian).item()
    scaled = output_error(weight - fake_quantize(weight * scales, scheme, torch.float16) / scales, stat.hessian).item()
    assert ratio > 0 and scaled < 0.9 * plain
    direct = (inputs @ (weight - fake_quantize(weight * scales, scheme, torch.float16) / scales).T).pow(2).sum()
    assert scaled == pytest.approx(direct.item() * 2 / inputs.shape[0], rel=1e-3)  # H = 2/n X^T X


def test_clipping_never_raises_a_group_error_and_stays_within_the_shrink_range():
    inputs, weight = correlated(), torch.randn(64, 128)
    weight[:, 7] *= 8  # an outlier weight column worth clipping
    stat, scheme = statistic(inputs), Scheme(3, 32, False)
    options = AWQOptions()
    limit = search_clip(weight, stat.hessian, scheme, options, torch.float16)
    top = weight.reshape(64, 4, 32).abs().amax(dim=-1, keepdim=True)
    assert torch.all(limit <= top) and torch.all(limit >= top * options.max_shrink - 1e-6)
    assert (limit < top).any()
    clipped = torch.minimum(torch.maximum(weight.reshape(64, 4, 32), -limit), limit).reshape(64, 128)
    before = output_error(weight - fake_quantize(weight, scheme, torch.float16), stat.hessian)
    after = output_error(weight - fake_quantize(clipped, scheme, torch.float16), stat.hessian)
    assert after < before


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_awq_quantized_model_is_closer_to_the_original_than_rtn(method):
    model = tiny("llama-mha")
    samples = torch.randint(0, 300, (8, 64), generator=torch.Generator().manual_seed(2))
    scheme = Scheme(3, 32, False)
    awq_model, rtn_model = copy.deepcopy(model), copy.deepcopy(model)
    awq = quantize_model(awq_model, Recipe(method=method, scheme=scheme), calibration=samples)
    assert all(entry["kind"] == "output" for entry in awq.errors.values())
    rtn = quantize_model(rtn_model, Recipe(method="rtn", scheme=scheme))
    assert set(awq.weights) == set(rtn.weights)
    for name, weight in rtn.weights.items():
        rtn_model.get_submodule(name).weight.data = weight.dequantize()
    with torch.no_grad():
        reference = model(samples).logits
        errors = [(m(samples).logits - reference).pow(2).mean().item() for m in (awq_model, rtn_model)]
    assert errors[0] < errors[1]
