"""A quantized model on the GPU leaves its few-token products pending and the norms, the rotary
embedding and SiLU-and-multiply finish them: the same logits and tokens as products finished by the
kernel itself, and every accumulator zero after a forward."""

import pytest
import torch
from transformers import LlamaConfig

from qtool.runtime import quant_linear
from qtool.runtime.bench import synthetic_model
from qtool.runtime.engine import Engine
from qtool.runtime.quant_linear import FusedLinears, QuantLinear
from qtool.runtime.sampling import SamplingParams

from test_engine import Tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="only the GPU kernels leave products pending")

CONFIG = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)


def accumulators(model) -> list[torch.Tensor]:
    """The accumulators the model's kernel views have made (those of products left pending)."""
    layouts = []
    for module in model.modules():
        if isinstance(module, QuantLinear) and module._kernel is not None:
            layouts.append(module._kernel[1])
        layouts += [fused._fused[1][0] for fused in vars(module).values()
                    if isinstance(fused, FusedLinears) and fused._fused is not None and fused._fused[1] is not None]
    return [layout.accumulator for layout in layouts if layout is not None and layout.accumulator is not None]


def test_windows_give_the_logits_of_products_finished_by_the_kernel(monkeypatch):
    model = synthetic_model(CONFIG, 4, 64, torch.float16, "cuda")
    ids = torch.randint(0, CONFIG.vocab_size, (1, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        pending = model(ids).logits
        held = accumulators(model)
        assert len(held) == 3 * CONFIG.num_hidden_layers  # o, gate/up, down (q/k/v only through the cache)
        assert not any(accumulator.any() for accumulator in held)
        monkeypatch.setattr(quant_linear, "pends", lambda tokens: False)
        finished = model(ids).logits
    # the same float32 shares, added in another order: fp16 logits within rounding, whose flips two
    # layers over 40 tokens carry to 2.1% (H200); a share lost or added twice moves them by tens of percent
    assert ((pending.float() - finished.float()).norm() / finished.float().norm()).item() < 3e-2


def greedy_tokens(model, graphs: bool, max_tokens: int) -> list[list[int]]:
    """The greedy tokens of three prompts of random ids (of 3, 9 and 20 tokens, seed 0) decoded by
    an engine on `model`, with or without CUDA graphs."""
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, CONFIG.vocab_size, (length,), generator=generator).tolist() for length in (3, 9, 20)]
    engine = Engine(model, Tokens(), "cuda", torch.float16, block_size=4, cuda_graphs=graphs, cache_bytes=1 << 24)
    sequences = [engine.add(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
                 for prompt in prompts]
    done = engine.run()
    return [done[sequence.id].token_ids for sequence in sequences]


@pytest.mark.parametrize("graphs", [False, True])
def test_decoding_gives_the_tokens_of_products_finished_by_the_kernel(monkeypatch, graphs):
    model = synthetic_model(CONFIG, 4, 64, torch.float16, "cuda")
    with torch.no_grad():
        pending = greedy_tokens(model, graphs, max_tokens=8)
        held = accumulators(model)
        assert len(held) == 4 * CONFIG.num_hidden_layers
        assert not any(accumulator.any() for accumulator in held)
        monkeypatch.setattr(quant_linear, "pends", lambda tokens: False)
        assert greedy_tokens(model, graphs, max_tokens=8) == pending
