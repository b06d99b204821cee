"""Checkpoints written by llm-compressor (tests/fixtures/llmcompressor) load in qtool with the
logits transformers gives them, and decode to weights close to the originals."""

from pathlib import Path

import pytest
import torch

from qtool.quantize.format import read_checkpoint
from qtool.runtime.loader import load_model
from qtool.runtime.quant_linear import QuantLinear

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "llmcompressor"
LOADABLE_BY_TRANSFORMERS = ["w4a16_sym_g32", "w4a16_asym_g32", "w8a16_sym_channel", "w3a16_asym_g32", "gptq_weight"]


@pytest.mark.parametrize("name", LOADABLE_BY_TRANSFORMERS)
def test_qtool_gives_the_logits_transformers_gives(name):
    from transformers import AutoModelForCausalLM

    ours = load_model(FIXTURES / name, dtype=torch.float32)
    assert isinstance(ours.model.layers[1].mlp.down_proj, QuantLinear)
    theirs = AutoModelForCausalLM.from_pretrained(FIXTURES / name, dtype=torch.float32).eval()
    tokens = torch.randint(3, 1000, (2, 48))
    with torch.no_grad():
        assert (ours(tokens).logits - theirs(tokens).logits).abs().max().item() < 1e-3


@pytest.mark.parametrize("name", [*LOADABLE_BY_TRANSFORMERS, "gptq_group_actorder"])
def test_decoded_weights_are_close_to_the_originals(name):
    from qtool.quantize.format.checkpoint import load_tensors

    original = load_tensors(FIXTURES / "original")
    checkpoint = read_checkpoint(FIXTURES / name)
    assert len(checkpoint.weights) == 14
    for layer, weight in checkpoint.weights.items():
        reference = original[f"{layer}.weight"].float()
        error = (weight.dequantize() - reference).pow(2).sum() / reference.pow(2).sum()
        assert error < (0.05 if weight.scheme.bits == 3 else 0.02), layer


def test_act_order_groups_are_followed():
    from qtool.quantize.format.checkpoint import load_tensors

    original = load_tensors(FIXTURES / "original")["model.layers.0.self_attn.q_proj.weight"].float()
    weight = read_checkpoint(FIXTURES / "gptq_group_actorder").weights["model.layers.0.self_attn.q_proj"]
    assert weight.g_idx is not None and not torch.equal(weight.g_idx.sort().values, weight.g_idx)
    with_groups = (weight.dequantize() - original).abs().max()
    weight.g_idx = None  # read the same codes as if groups were contiguous
    without_groups = (weight.dequantize() - original).abs().max()
    assert with_groups < 0.02 < without_groups
