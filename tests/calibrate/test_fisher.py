import pytest
import torch
import torch.nn.functional as F

from qtool.calibrate.fisher import StoredFisher, diagonal_fisher, save_fisher
from qtool.errors import QtoolError
from qtool.runtime.loader import load_lazily, load_model


def block_linears(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and ".layers." in name]


def autograd_fisher(model, samples: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per sequence: the loss, its gradient by plain autograd, squared; then the mean."""
    names = block_linears(model)
    total = {name: torch.zeros_like(model.get_submodule(name).weight) for name in names}
    for sample in samples:
        model.zero_grad()
        logits = model(input_ids=sample[None]).logits[0]
        F.cross_entropy(logits[:-1], sample[1:]).backward()
        for name in names:
            total[name] += model.get_submodule(name).weight.grad.pow(2)
    return {name: value / len(samples) for name, value in total.items()}


def test_fisher_equals_squared_per_sequence_gradients_from_autograd(tiny_llama):
    samples = torch.randint(0, 300, (5, 24), generator=torch.Generator().manual_seed(3))
    expected = autograd_fisher(tiny_llama, samples)
    fisher = diagonal_fisher(tiny_llama, samples, list(expected), batch_size=2)
    assert fisher.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-4, atol=1e-12)
        assert fisher[name].abs().sum() > 0


def test_fisher_of_a_lazily_loaded_model_equals_the_loaded_one(tiny_llama_dir):
    samples = torch.randint(0, 500, (3, 16), generator=torch.Generator().manual_seed(4))
    loaded = load_model(tiny_llama_dir, torch.float32)
    names = block_linears(loaded)
    expected = diagonal_fisher(loaded, samples, names, batch_size=3)
    skeleton, lazy = load_lazily(tiny_llama_dir, torch.float32)
    fisher = diagonal_fisher(skeleton, samples, names, batch_size=2, weights=lazy)
    for name in names:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-4, atol=1e-12)
    assert all(param.is_meta for param in skeleton.parameters())  # everything released again


def test_stored_fisher_reads_back_and_refuses_another_key(tmp_path):
    fisher = {"model.layers.0.mlp.up_proj": torch.rand(8, 4), "model.layers.1.mlp.up_proj": torch.rand(8, 4)}
    path = tmp_path / "fisher.safetensors"
    save_fisher(path, fisher, "key-a")
    stored = StoredFisher(path, "key-a")
    assert set(stored) == set(fisher)
    torch.testing.assert_close(stored["model.layers.1.mlp.up_proj"], fisher["model.layers.1.mlp.up_proj"])
    with pytest.raises(QtoolError, match="another model"):
        StoredFisher(path, "key-b")
    path.write_bytes(b"not safetensors")
    with pytest.raises(QtoolError, match="not a readable"):
        StoredFisher(path, "key-a")
