"""The command line end to end on a tiny real-format model, and every bad input it can get."""

import json
import subprocess
import sys

import pytest

from qtool.cli.app import main
from qtool.cli.devices import parse_size
from qtool.errors import QtoolError


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "w4"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--group-size", "32", "--quiet"]) == 0
    return out


def test_quantize_writes_a_complete_checkpoint(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "qtool.json", "tokenizer.json", "generation_config.json"} <= names
    record = json.loads((tiny_checkpoint / "qtool.json").read_text())
    assert record["recipe"]["scheme"] == {"bits": 4, "group_size": 32, "symmetric": False, "lut": False,
                                         "activation_bits": None}
    assert record["skipped"] == ["lm_head"]
    assert len(record["layers"]) == 14
    assert record["versions"]["qtool"] and record["wall_seconds"] > 0


def test_quantize_json_prints_one_object(tiny_llama_dir, tmp_path, capsys):
    code, out, _ = run(capsys, "quantize", tiny_llama_dir, "-o", tmp_path / "w8", "--bits", "8", "--group-size", "-1", "--sym", "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["quantized_layers"] == 14
    assert 8 < summary["quantized_bits_per_weight"] < 8.6
    assert summary["size_after_bytes"] < summary["size_before_bytes"]


def test_eval_json_compares_with_the_base(tiny_checkpoint, tiny_llama_dir, tiny_text_file, capsys):
    code, out, _ = run(
        capsys, "eval", tiny_checkpoint, "--ppl", tiny_text_file, "--seqlen", "64", "--max-windows", "3",
        "--compare", tiny_llama_dir, "--json",
    )
    assert code == 0
    result = json.loads(out)
    assert {"ppl", "windows", "tokens", "seqlen", "dataset", "base_ppl", "kl", "top1_agree"} <= result.keys()
    assert (result["windows"], result["tokens"], result["seqlen"]) == (3, 192, 64)
    assert result["ppl"] > 1 and result["base_ppl"] > 1 and result["kl"] >= 0 and 0 <= result["top1_agree"] <= 1


def test_eval_table_names_the_protocol(tiny_checkpoint, tiny_text_file, capsys):
    code, out, _ = run(capsys, "eval", tiny_checkpoint, "--ppl", tiny_text_file, "--seqlen", "64", "--max-windows", "1")
    assert code == 0
    assert "perplexity" in out and "non-overlapping windows" in out


def test_inspect_lists_layers_with_bits_per_weight(tiny_checkpoint, capsys):
    code, out, _ = run(capsys, "inspect", tiny_checkpoint, "--json")
    assert code == 0
    summary = json.loads(out)
    assert len(summary["layers"]) == 14 and summary["dense_linears"] == ["lm_head"]
    layer = summary["layers"][0]
    # 4-bit codes + an fp16 scale and a 4-bit zero per 32 weights, + the 16-byte shape tensor
    assert 4.6 < layer["bits_per_weight"] < 4.8
    code, out, _ = run(capsys, "inspect", tiny_checkpoint)
    assert code == 0 and "W4 g32 asym" in out


def expect_usage_error(capsys, args, message, tmp_path=None):
    code, out, err = run(capsys, *args)
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert message in lines[0]
    return lines[0]


def test_missing_model(capsys, tmp_path):
    expect_usage_error(capsys, ["quantize", tmp_path / "nope", "-o", tmp_path / "out"], "not found")
    assert not (tmp_path / "out").exists()


def test_folder_without_config(capsys, tmp_path):
    expect_usage_error(capsys, ["eval", tmp_path], "has no config.json")


def test_unknown_method(capsys, tiny_llama_dir, tmp_path):
    expect_usage_error(capsys, ["quantize", tiny_llama_dir, "-o", tmp_path / "o", "--method", "magic"], "choose one of: awq, awq+gptq, gptq, rtn")


@pytest.mark.parametrize("bits", ["1", "9"])
def test_bad_bits(capsys, tiny_llama_dir, tmp_path, bits):
    expect_usage_error(capsys, ["quantize", tiny_llama_dir, "-o", tmp_path / "o", "--bits", bits], "bits must be")


def test_group_size_that_does_not_divide(capsys, tiny_llama_dir, tmp_path):
    line = expect_usage_error(capsys, ["quantize", tiny_llama_dir, "-o", tmp_path / "o", "--group-size", "48"], "does not divide")
    assert "8, 16, 32, 64, -1" in line
    assert list(tmp_path.iterdir()) == []


def test_unknown_format(capsys, tiny_llama_dir, tmp_path):
    expect_usage_error(capsys, ["quantize", tiny_llama_dir, "-o", tmp_path / "o", "--format", "onnx"], "compressed-tensors")


def test_device_memory_cap_needs_a_cuda_device(capsys, tiny_llama_dir, tmp_path):
    expect_usage_error(capsys, ["quantize", tiny_llama_dir, "-o", tmp_path / "o", "--device", "cpu",
                                "--max-device-memory", "2GiB"], "limits a CUDA device")


@pytest.mark.parametrize("text, size", [("20GiB", 20 * 2**30), ("1.5GB", 1_500_000_000), ("800 MiB", 800 * 2**20), ("4096", 4096)])
def test_sizes_are_read_with_their_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "2GX", "-1GiB", "0"])
def test_unreadable_sizes_are_refused(text):
    with pytest.raises(QtoolError, match="write it like 20GiB"):
        parse_size(text)


def test_unknown_calibration_dtype(capsys, tiny_llama_dir, tmp_path):
    expect_usage_error(capsys, ["quantize", tiny_llama_dir, "-o", tmp_path / "o", "--method", "gptq",
                                "--calib-dtype", "int8"], "unknown calibration dtype")


def test_existing_output(capsys, tiny_llama_dir, tiny_checkpoint):
    expect_usage_error(capsys, ["quantize", tiny_llama_dir, "-o", tiny_checkpoint], "already exists")


def test_hub_id_offline(capsys, tmp_path):
    expect_usage_error(capsys, ["quantize", "org/some-model", "-o", tmp_path / "o"], "network is off")


def test_unreadable_data_file(capsys, tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    expect_usage_error(capsys, ["eval", tiny_checkpoint, "--ppl", bad], "bad.jsonl:1: not valid JSON")


def test_unknown_dataset_offline(capsys, tiny_checkpoint, tmp_path):
    expect_usage_error(capsys, ["eval", tiny_checkpoint, "--ppl", "wikitext", "--data-dir", tmp_path], "wikitext2 is not on disk")
    expect_usage_error(capsys, ["eval", tiny_checkpoint, "--ppl", "c4"], "unknown data source 'c4'")


def test_corrupt_checkpoint(capsys, tiny_checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    expect_usage_error(capsys, ["eval", broken], "not a readable safetensors file")
    (broken / "config.json").write_text("{")
    expect_usage_error(capsys, ["inspect", broken], "not valid JSON")


def test_corrupt_gguf(capsys, tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF but not really")
    expect_usage_error(capsys, ["eval", tmp_path / "model.gguf"], "cannot read GGUF file")


def test_bad_eval_options(capsys, tiny_checkpoint):
    expect_usage_error(capsys, ["eval", tiny_checkpoint, "--seqlen", "1"], "--seqlen must be at least 2")
    expect_usage_error(capsys, ["eval", tiny_checkpoint, "--dtype", "int8"], "unknown dtype")
    expect_usage_error(capsys, ["eval", tiny_checkpoint, "--device", "tpu"], "unknown device")


def test_console_script_exit_codes(tmp_path):
    missing = subprocess.run(
        [sys.executable, "-m", "qtool.cli.app", "eval", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("qtool: error:") and "Traceback" not in missing.stderr
    usage = subprocess.run([sys.executable, "-m", "qtool.cli.app", "quantize"], capture_output=True, text=True)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_run_resumes_from_saved_blocks_to_the_same_bytes(tiny_llama_dir, tiny_text_file, tmp_path, method):
    """A run killed after its first block (simulated by keeping the state of a run that stopped
    there) resumes to the same checkpoint bytes as an uninterrupted run (AWQ: with the folded
    norms of the restored block)."""
    import shutil

    flags = ["--method", method, "--group-size", "32", "--calib", str(tiny_text_file), "--nsamples", "8",
             "--seqlen", "64", "--quiet"]
    assert main(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "whole"), *flags]) == 0
    assert not (tmp_path / ".whole.qtool-work").exists()  # cleared once the checkpoint is written

    from qtool.quantize import resume

    saved = []
    original_save = resume.BlockStore.save

    def save_then_die(self, index, weights, errors, dense=None):
        original_save(self, index, weights, errors, dense)
        saved.append(index)
        raise KeyboardInterrupt

    resume.BlockStore.save = save_then_die
    try:  # the CLI turns the interruption into a non-zero exit, like Ctrl-C
        assert main(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "resumed"), *flags]) != 0
    finally:
        resume.BlockStore.save = original_save
    assert saved == [0] and not (tmp_path / "resumed").exists()
    assert main(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "resumed"), "--resume", *flags]) == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    shutil.rmtree(tmp_path / "whole")


@pytest.mark.parametrize("method, calib_dtype", [("awq", "auto"), ("awq+gptq", "float64")])
def test_calibrated_methods_write_checkpoints_that_load(tiny_llama_dir, tiny_text_file, tmp_path, method, calib_dtype):
    import torch

    from qtool.runtime.loader import load_model

    out = tmp_path / "out"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--method", method, "--group-size", "32",
                 "--calib", str(tiny_text_file), "--nsamples", "8", "--seqlen", "64", "--calib-dtype", calib_dtype,
                 "--quiet"]) == 0
    record = json.loads((out / "qtool.json").read_text())
    assert record["recipe"]["method"] == method
    assert calib_dtype != "float64" or record["calibration_matmul_dtype"] == "float64"
    assert all(entry["kind"] == "output" and entry["error"] > 0 for entry in record["layers"].values())
    model = load_model(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_awq_format_from_the_command_line_loads_back(tiny_llama_dir, tmp_path):
    import torch

    from qtool.runtime.loader import load_model

    out = tmp_path / "awq"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--format", "awq", "--group-size", "32", "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    with torch.no_grad():
        assert torch.isfinite(load_model(out)(torch.tensor([[1, 2, 3]])).logits).all()


def test_eval_runs_llama_models_through_qtools_runtime_and_generates(capsys, tiny_checkpoint, tiny_text_file):
    code, out, _ = run(capsys, "eval", tiny_checkpoint, "--ppl", tiny_text_file, "--seqlen", "64", "--max-windows", "2",
                       "--json")
    assert code == 0 and json.loads(out)["runtime"] == "qtool"
    code, out, _ = run(capsys, "eval", tiny_checkpoint, "--generate", "The history of", "--max-tokens", "5", "--json")
    result = json.loads(out)
    assert code == 0 and len(result["token_ids"]) <= 5 and result["finish_reason"] in ("stop", "length")


def test_other_families_are_measured_through_transformers_but_not_served(capsys, tmp_path, tiny_text_file):
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import build_tokenizer

    tokenizer = build_tokenizer(tmp_path)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tokenizer))).save_pretrained(tmp_path)
    code, out, _ = run(capsys, "eval", tmp_path, "--ppl", tiny_text_file, "--seqlen", "32", "--max-windows", "1", "--json")
    assert code == 0 and json.loads(out)["runtime"] == "transformers"
    code, _, err = run(capsys, "eval", tmp_path, "--generate", "hello")
    assert code == 2 and "Llama family" in err and "Traceback" not in err


def test_bad_generation_length(capsys, tiny_checkpoint):
    code, _, err = run(capsys, "eval", tiny_checkpoint, "--generate", "hi", "--max-tokens", "0")
    assert code == 2 and "--max-tokens" in err


def test_bench_measures_a_checkpoint_and_a_synthetic_model(capsys, tiny_checkpoint, tiny_llama_dir, tmp_path):
    code, out, err = run(capsys, "bench", tiny_checkpoint, "--batch-sizes", "1", "--batch-sizes", "3",
                         "--prompt-len", "12", "--output-len", "5", "--compare", tiny_llama_dir, "--json")
    assert code == 0, err
    result = json.loads(out)["results"]
    assert list(result) == [str(tiny_checkpoint), str(tiny_llama_dir)]
    for rows in result.values():
        assert [row["concurrency"] for row in rows] == [1, 3]
        assert all(row["output_tokens_per_s"] > 0 and row["ttft_ms_p50"] > 0 and 0 < row["kv_utilisation"] <= 1
                   for row in rows)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                  "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 200}))
    code, out, err = run(capsys, "bench", "--synthetic", config, "--batch-sizes", "2", "--prompt-len", "8",
                         "--output-len", "3", "--json")
    assert code == 0, err
    assert list(json.loads(out)["results"]) == [f"synthetic {config} W4 g64"]


def test_bench_with_a_float8_cache_runs_more_sequences_in_the_same_memory(capsys, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                  "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 200}))
    rows = {}
    for kv in ("auto", "fp8"):  # 64 KiB: 8 blocks of 16 float32 tokens, or 32 of float8; a request needs 3
        code, out, err = run(capsys, "bench", "--synthetic", config, "--batch-sizes", "4", "--prompt-len", "40",
                             "--output-len", "4", "--kv-cache-dtype", kv, "--kv-cache-memory", "64KiB", "--json")
        assert code == 0, err
        (rows[kv],) = json.loads(out)["results"][f"synthetic {config} W4 g64"]
    assert rows["fp8"]["cache_tokens"] == 4 * rows["auto"]["cache_tokens"] == 512
    assert rows["auto"]["max_running"] == 2 and rows["fp8"]["max_running"] == 4


@pytest.mark.parametrize("args, message", [
    (["--synthetic", "no-such-preset"], "--synthetic takes a preset"),
    ([], "give a checkpoint, or --synthetic"),
])
def test_bad_bench_options(capsys, args, message):
    code, _, err = run(capsys, "bench", *args)
    assert code == 2 and message in err


@pytest.mark.parametrize("args, message", [
    (["--port", "0"], "--port"),
    (["--smoke", "--smoke-requests", "0"], "--smoke-requests"),
])
def test_bad_serve_options(capsys, tiny_checkpoint, args, message):
    code, _, err = run(capsys, "serve", tiny_checkpoint, *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_serve_smoke_on_a_tiny_checkpoint(capsys, tiny_checkpoint):
    code, out, err = run(capsys, "serve", tiny_checkpoint, "--smoke", "--smoke-requests", "2", "--quiet")
    # the tiny tokenizer has no chat template: the chat half fails, and the smoke says so with exit 1
    assert code == 1 and "FAILED" in out and "chat template" in err
