"""`qtool quantize --method squeezellm` end to end on a tiny model: the qtool format, the Fisher
cache, the loader's look-up-table path, and the bad inputs special to it."""

import json

import pytest
import torch

from qtool.cli.app import main
from qtool.quantize.format import read_checkpoint
from qtool.runtime.loader import load_model


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def sparse_checkpoint(tiny_llama_dir, tmp_path_factory, calibration_flags):
    folder = tmp_path_factory.mktemp("squeezellm")
    fisher = folder / "fisher.safetensors"
    out = folder / "w3"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--method", "squeezellm", "--bits", "3",
                 "--outliers", "0.45%", "--fisher", str(fisher), *calibration_flags]) == 0
    return out, fisher


def test_squeezellm_writes_lut_weights_with_outliers_that_load(sparse_checkpoint, tiny_llama_dir):
    out, fisher = sparse_checkpoint
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "qtool"
    assert [entry["lut"] and entry["bits"] == 3 and entry["group_size"] == -1 for entry in config["schemes"]] == [True]
    record = json.loads((out / "qtool.json").read_text())
    assert record["recipe"]["squeezellm"]["outliers"] == pytest.approx(0.0045)
    assert record["recipe"]["calibration"]["nsamples"] == 6 and record["fisher_file"] == str(fisher)
    assert all(entry["kind"] == "fisher-weighted weight" for entry in record["layers"].values())
    checkpoint = read_checkpoint(out)
    weight = checkpoint.weights["model.layers.0.mlp.down_proj"]
    assert weight.lut.shape == (64, 1, 8) and weight.outliers is not None
    assert len(weight.outliers.values) == round(0.0045 * 64 * 128)

    model = load_model(out)  # QuantLinear: look-up, sparse add, matmul
    reference = load_model(tiny_llama_dir, torch.float32)
    with torch.no_grad():
        for name, quantized in checkpoint.weights.items():
            reference.get_submodule(name).weight.copy_(quantized.dequantize())
        tokens = torch.tensor([[5, 17, 99, 3, 250, 7]])
        torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, atol=1e-5, rtol=1e-5)
    assert fisher.is_file()


def test_the_fisher_file_is_reused_and_gives_the_same_bytes(sparse_checkpoint, tiny_llama_dir, tmp_path, calibration_flags):
    out, fisher = sparse_checkpoint
    stamp = fisher.stat().st_mtime_ns
    again = tmp_path / "again"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(again), "--method", "squeezellm", "--bits", "3",
                 "--outliers", "0.0045", "--fisher", str(fisher), *calibration_flags]) == 0
    assert fisher.stat().st_mtime_ns == stamp  # read, not recomputed
    for name in ("model.safetensors", "config.json"):
        assert (again / name).read_bytes() == (out / name).read_bytes()


def test_a_fisher_file_of_other_data_is_refused(capsys, sparse_checkpoint, tiny_llama_dir, tmp_path, tiny_text_file):
    _, fisher = sparse_checkpoint
    code, _, err = run(capsys, "quantize", tiny_llama_dir, "-o", tmp_path / "out", "--method", "squeezellm",
                       "--fisher", fisher, "--calib", tiny_text_file, "--nsamples", "5", "--seqlen", "48")
    assert code == 2 and "another model, calibration set" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_without_sensitivity_no_calibration_data_is_read(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "plain"
    code, _, err = run(capsys, "quantize", tiny_llama_dir, "-o", out, "--method", "squeezellm", "--no-sensitivity",
                       "--group-size", "32", "--calib", tmp_path / "no-such-file.txt", "--quiet")
    assert code == 0, err
    record = json.loads((out / "qtool.json").read_text())
    assert record["calibration_fingerprint"] is None
    assert {entry["kind"] for entry in record["layers"].values()} == {"weight"}
    assert read_checkpoint(out).weights["model.layers.1.self_attn.q_proj"].lut.shape == (64, 2, 16)


@pytest.mark.parametrize("flags, message", [
    (["--outliers", "lots"], "cannot read --outliers"),
    (["--outliers", "60%"], "outliers must be a fraction"),
    (["--format", "compressed-tensors"], "use --format qtool"),
    (["--format", "awq", "--group-size", "32"], "--format awq holds 4-bit weights"),
])
def test_bad_squeezellm_options(capsys, tiny_llama_dir, tmp_path, flags, message):
    code, _, err = run(capsys, "quantize", tiny_llama_dir, "-o", tmp_path / "out", "--method", "squeezellm", *flags)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
