import json

import pytest
import torch

from qtool.errors import QtoolError
from qtool.quantize.apply import quantize_model
from qtool.quantize.format import read_checkpoint, write_checkpoint
from qtool.quantize.format.checkpoint import PendingTensor, TensorSource, save_tensors, weight_files, write_folder_atomically
from qtool.quantize.format.compressed_tensors import layer_schemes
from qtool.quantize.grid import fit_minmax, quantize_to_codes
from qtool.quantize.qweight import QuantizedWeight
from qtool.quantize.scheme import Override, Recipe, Scheme

SCHEMES = [Scheme(bits, group, sym) for bits in (2, 3, 4, 5, 8) for group in (32, -1) for sym in (True, False)]


def write(model, folder, recipe):
    result = quantize_model(model, recipe)
    write_checkpoint(folder, model, result.weights, result.skipped, "compressed-tensors", {"recipe": recipe.to_dict()})
    return result


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_checkpoint_round_trip_is_bit_exact(tiny_llama, tmp_path, scheme):
    result = write(tiny_llama, tmp_path / "ckpt", Recipe(scheme=scheme))
    loaded = read_checkpoint(tmp_path / "ckpt")
    assert loaded.weights.keys() == result.weights.keys()
    for name, weight in result.weights.items():
        back = loaded.weights[name]
        assert back.scheme == scheme and back.shape == weight.shape
        assert torch.equal(back.packed, weight.packed)
        assert torch.equal(back.scales, weight.scales)
        assert torch.equal(back.zero_points(), weight.zero_points())
    assert "model.embed_tokens.weight" in loaded.dense
    assert "lm_head.weight" not in loaded.dense  # tied: stored once, as the embedding


def test_act_order_g_idx_round_trips(tmp_path, tiny_llama):
    weight = torch.randn(16, 64)
    scheme = Scheme(4, 16, False)
    grid = fit_minmax(weight, scheme, torch.float16)
    g_idx = torch.randperm(64).remainder(4).to(torch.int32)
    quantized = QuantizedWeight.from_codes(quantize_to_codes(weight, grid, scheme), grid, scheme, g_idx=g_idx)
    from qtool.quantize.format.compressed_tensors import layer_tensors, read_layer

    back = read_layer("layer", layer_tensors("layer", quantized), scheme)
    assert torch.equal(back.g_idx, g_idx)
    assert torch.equal(back.dequantize(), quantized.dequantize())


def test_same_inputs_give_the_same_bytes(tiny_llama, tmp_path):
    for name in ("a", "b"):
        write(tiny_llama, tmp_path / name, Recipe())
    for file in ("model.safetensors", "config.json", "generation_config.json", "qtool.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file


def test_mixed_schemes_become_config_groups_and_dense_layers_ignore(tiny_llama, tmp_path):
    recipe = Recipe(
        scheme=Scheme(4, 32, False),
        overrides=(Override("mlp", Scheme(8, -1, True)), Override(r"layers\.1\.self_attn\.o_proj", None)),
    )
    write(tiny_llama, tmp_path / "mixed", recipe)
    config = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization_config"]
    assert len(config["config_groups"]) == 2
    assert config["ignore"] == ["lm_head", "model.layers.1.self_attn.o_proj"]
    loaded = read_checkpoint(tmp_path / "mixed")
    assert loaded.weights["model.layers.0.mlp.up_proj"].scheme == Scheme(8, -1, True)
    assert loaded.weights["model.layers.0.self_attn.q_proj"].scheme == Scheme(4, 32, False)
    assert "model.layers.1.self_attn.o_proj.weight" in loaded.dense


def test_most_specific_target_decides_the_scheme():
    group = {"weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}}
    config = {
        "format": "pack-quantized",
        "config_groups": {
            "broad": {**group, "targets": ["Linear"]},
            "regex": {**group, "targets": ["re:.*mlp.*"], "weights": {**group["weights"], "num_bits": 8}},
            "exact": {**group, "targets": ["model.layers.0.mlp.up_proj"], "weights": {**group["weights"], "num_bits": 2}},
        },
    }
    schemes = layer_schemes(config, ["a.q_proj", "a.mlp.down_proj", "model.layers.0.mlp.up_proj"])
    assert [schemes[n].bits for n in schemes] == [4, 8, 2]


def test_a_failed_write_leaves_no_folder_behind(tmp_path):
    def fail(folder):
        (folder / "half.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_folder_atomically(tmp_path / "out", fail)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_unless_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(QtoolError, match="already exists"):
        write_folder_atomically(tmp_path / "out", lambda folder: None)
    write_folder_atomically(tmp_path / "out", lambda folder: (folder / "new").write_text("y"), overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_large_models_are_sharded_with_an_index(tmp_path):
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(5)}
    files = save_tensors(tmp_path, tensors, shard_bytes=2048)
    assert len(files) == 3
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert [p.name for p in weight_files(tmp_path)] == files


def test_written_files_read_back_exactly_and_pending_tensors_are_read_when_written(tmp_path):
    from safetensors.torch import load_file

    tensors = {
        "a.f32": torch.randn(3, 5), "b.bf16": torch.randn(7).bfloat16(), "c.f16": torch.randn(2, 2, 2).half(),
        "d.i32": torch.randint(-9, 9, (4,), dtype=torch.int32), "e.i64": torch.tensor([3, 1], dtype=torch.int64),
        "f.scalar": torch.tensor(2.5), "g.u8": torch.arange(5, dtype=torch.uint8),
    }
    reads = []
    late = torch.randn(6, 3)
    tensors["h.pending"] = PendingTensor(torch.float32, (6, 3), lambda: reads.append(1) or late)
    save_tensors(tmp_path, tensors)
    assert reads == [1]
    loaded = load_file(tmp_path / "model.safetensors")
    assert list(loaded) == sorted(tensors)
    for name, tensor in loaded.items():
        expected = late if name == "h.pending" else tensors[name]
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected)
    source = TensorSource(tmp_path)
    assert "b.bf16" in source and torch.equal(source.read("b.bf16"), tensors["b.bf16"])


def test_pickle_only_folders_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(QtoolError, match="never unpickles"):
        weight_files(tmp_path)


def test_an_io_failure_is_a_failure_exit_not_a_traceback(tmp_path):
    def no_space(folder):
        raise OSError(28, "No space left on device")

    with pytest.raises(QtoolError, match="could not write .*No space left on device") as error:
        write_folder_atomically(tmp_path / "out", no_space)
    assert error.value.exit_code == 1
    assert list(tmp_path.iterdir()) == []


def test_awq_layout_packs_eight_output_channels_per_word_in_awq_order():
    from qtool.quantize.format.awq import layer_tensors

    scheme = Scheme(4, 32, False)
    codes = torch.arange(16, dtype=torch.int32).unsqueeze(1).expand(16, 64).contiguous()  # channel c: all c
    weight = QuantizedWeight.from_codes(codes, fit_minmax(torch.randn(16, 64), scheme, torch.float16), scheme)
    qweight = layer_tensors("x", weight)["x.qweight"]
    assert qweight.shape == (64, 2)
    word = qweight[0, 0].item() & 0xFFFFFFFF
    nibbles = [(word >> (4 * j)) & 0xF for j in range(8)]
    assert nibbles == [0, 2, 4, 6, 1, 3, 5, 7]  # channel c holds code c in input row 0


@pytest.mark.parametrize("scheme", [Scheme(4, 32, False), Scheme(4, 64, True)], ids=lambda s: s.describe())
def test_awq_format_loads_back_with_the_same_logits(tiny_llama, tmp_path, scheme):
    from qtool.runtime.loader import load_model

    recipe = Recipe(scheme=scheme)
    result = quantize_model(tiny_llama, recipe, scale_dtype=torch.float16)  # the scales the AWQ layout stores
    for fmt in ("compressed-tensors", "awq"):
        write_checkpoint(tmp_path / fmt, tiny_llama, result.weights, result.skipped, fmt, {"recipe": recipe.to_dict()})
    config = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "awq" and config["version"] == "gemm" and config["group_size"] == scheme.group_size
    back = read_checkpoint(tmp_path / "awq").weights
    for name, weight in result.weights.items():
        assert torch.equal(back[name].dequantize(), weight.dequantize()), name
    tokens = torch.tensor([[1, 5, 9, 200, 17, 3]])
    with torch.no_grad():
        logits = [load_model(tmp_path / fmt)(tokens).logits for fmt in ("compressed-tensors", "awq")]
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("flags, message", [
    (["--bits", "3"], "4-bit weights with a group size"),
    (["--group-size", "-1"], "4-bit weights with a group size"),
    (["--method", "gptq", "--act-order", "group"], "no g_idx"),
])
def test_recipes_the_awq_layout_cannot_hold_are_refused_up_front(capsys, tiny_llama_dir, tmp_path, flags, message):
    from qtool.cli.app import main

    assert main(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "o"), "--format", "awq", *flags]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_awq_layout_refuses_scales_that_float16_would_change(tiny_llama, tmp_path):
    result = quantize_model(tiny_llama, Recipe(), scale_dtype=torch.float32)
    with pytest.raises(QtoolError, match="do not fit float16 exactly"):
        write_checkpoint(tmp_path / "awq", tiny_llama, result.weights, result.skipped, "awq", {})
    assert not (tmp_path / "awq").exists()
