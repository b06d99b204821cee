import pytest
import torch

from conftest import build_tiny_llama
from qtool.quantize.apply import quantize_model
from qtool.quantize.format import write_checkpoint
from qtool.quantize.scheme import CalibrationSpec, Recipe, Scheme
from qtool.runtime.loader import load_lazily, load_model


def quantize_and_write(model, recipe, calibration, output, lazy=None, on_block=None):
    result = quantize_model(model, recipe, calibration, weights=lazy, on_block=on_block)
    write_checkpoint(output, model, result.weights, result.skipped, "compressed-tensors", {}, dtype=torch.float16,
                     lazy=lazy)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_a_lazily_loaded_model_quantizes_to_the_bytes_of_a_loaded_one(tmp_path, method, tie):
    folder = tmp_path / "model"
    build_tiny_llama(folder, tie=tie)
    recipe = Recipe(method=method, scheme=Scheme(4, 32, False), calibration=CalibrationSpec("wiki-leads", 4, 32))
    calibration = torch.randint(0, 300, (4, 32)) if method == "gptq" else None

    quantize_and_write(load_model(folder, torch.float32), recipe, calibration, tmp_path / "eager")

    model, lazy = load_lazily(folder, torch.float32)
    assert lazy is not None and all(param.is_meta for param in model.parameters())
    resident = []

    def on_block(index, count):  # before each block: the later ones are still on disk
        layers = model.model.layers
        resident.append([not any(p.is_meta for p in layers[i].parameters()) for i in range(count)])

    quantize_and_write(model, recipe, calibration, tmp_path / "lazy", lazy, on_block)
    if method == "gptq":
        assert resident == [[False, False], [False, False]]
    assert all(linear.weight.is_meta for linear in model.model.layers[0].modules() if isinstance(linear, torch.nn.Linear))
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "lazy" / name).read_bytes() == (tmp_path / "eager" / name).read_bytes()
