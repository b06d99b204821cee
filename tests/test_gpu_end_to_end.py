"""`qtool quantize` on a CUDA device, end to end on a small trained Llama: the GPU computes what
the CPU computes, two GPU runs write the same bytes, and a device memory cap is honoured."""

import pytest
import torch

from conftest import build_tokenizer
from qtool.calibrate.data import calibration_windows, load_text, tokenize
from qtool.cli.app import main
from qtool.quantize.format import read_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CALIBRATION = ["--method", "gptq", "--nsamples", "64", "--seqlen", "256", "--quiet"]


@pytest.fixture(scope="module")
def trained_llama(tmp_path_factory):
    return train_small_llama(tmp_path_factory.mktemp("trained-llama"))


def train_small_llama(folder):
    """A 4-block Llama trained for a few hundred steps on wiki-leads, so its perplexity means something."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(folder)
    tokens = tokenize(tokenizer, load_text("wiki-leads"))
    config = LlamaConfig(
        hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(400):
        batch = calibration_windows(tokens, 32, 128, seed=step).cuda()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.half().save_pretrained(folder)
    return folder


def perplexity(folder, capsys, *flags) -> float:
    import json

    capsys.readouterr()  # what earlier commands printed
    assert main(["eval", str(folder), "--ppl", "wikitext", "--seqlen", "256", "--max-windows", "40",
                 "--device", "cuda", "--json", "--quiet", *flags]) == 0
    return json.loads(capsys.readouterr().out)["ppl"]


def test_a_float8_kv_cache_costs_little_perplexity_in_half_precision(trained_llama, capsys):
    fp16_cache = perplexity(trained_llama, capsys)
    fp8_cache = perplexity(trained_llama, capsys, "--kv-cache-dtype", "fp8")
    print(f"ppl fp16 cache {fp16_cache:.4f} fp8 cache {fp8_cache:.4f}")
    assert fp8_cache == pytest.approx(fp16_cache, rel=5e-3)


def quantize_both_ways(model, folder, calib_dtype):
    for device in ("cpu", "cuda"):
        assert main(["quantize", str(model), "-o", str(folder / device), "--device", device,
                     "--calib-dtype", calib_dtype, *CALIBRATION]) == 0
    cpu, gpu = read_checkpoint(folder / "cpu").weights, read_checkpoint(folder / "cuda").weights
    assert cpu.keys() == gpu.keys() and len(cpu) == 4 * 7

    def agreement(names):
        same = sum((cpu[name].codes() == gpu[name].codes()).sum().item() for name in names)
        return same / sum(cpu[name].codes().numel() for name in names)

    return agreement, agreement(cpu)


def test_gpu_calibration_computes_what_cpu_calibration_computes(trained_llama, tmp_path, capsys):
    """Float32 calibration both ways. Inputs that are the same give the same codes; after that,
    float rounding flips a few roundings, GPTQ carries each flip into the columns after it, and
    later layers see slightly different inputs: the checkpoints differ in codes but not in quality."""
    agreement, overall = quantize_both_ways(trained_llama, tmp_path, "float32")
    first = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]  # read the block's input: the same both ways
    assert agreement(first) >= 0.999
    assert overall >= 0.75
    cpu_ppl, gpu_ppl, base_ppl = (perplexity(folder, capsys) for folder in (tmp_path / "cpu", tmp_path / "cuda", trained_llama))
    print(f"float32: codes identical {overall:.2%}; ppl base {base_ppl:.3f} cpu {cpu_ppl:.3f} gpu {gpu_ppl:.3f}")
    assert base_ppl < 200  # trained: far below the vocabulary size
    assert gpu_ppl == pytest.approx(cpu_ppl, rel=0.005)


def test_float64_calibration_gives_the_same_codes_on_both_devices(trained_llama, tmp_path, capsys):
    """In float64 the two devices' rounding differences stay far below any rounding decision of
    the grid: the algorithm itself is the same both ways."""
    _, overall = quantize_both_ways(trained_llama, tmp_path, "float64")
    cpu_ppl, gpu_ppl = (perplexity(folder, capsys) for folder in (tmp_path / "cpu", tmp_path / "cuda"))
    print(f"float64: codes identical {overall:.4%}; ppl cpu {cpu_ppl:.3f} gpu {gpu_ppl:.3f}")
    assert overall >= 0.99
    assert gpu_ppl == pytest.approx(cpu_ppl, rel=0.005)


def test_two_gpu_runs_write_the_same_bytes(trained_llama, tmp_path):
    for run in ("first", "second"):
        assert main(["quantize", str(trained_llama), "-o", str(tmp_path / run), "--device", "cuda", *CALIBRATION]) == 0
    assert (tmp_path / "first" / "model.safetensors").read_bytes() == (tmp_path / "second" / "model.safetensors").read_bytes()


def test_a_device_memory_cap_too_small_for_one_block_is_a_clear_failure(trained_llama, tmp_path, capsys):
    try:
        code = main(["quantize", str(trained_llama), "-o", str(tmp_path / "out"), "--device", "cuda",
                     "--max-device-memory", "2MiB", *CALIBRATION])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and "--max-device-memory" in err
    assert not (tmp_path / "out").exists()


def test_squeezellm_on_the_gpu_computes_what_the_cpu_computes(trained_llama, tmp_path, capsys):
    """The Fisher information (float32 both ways) agrees closely; the k-means has no floating-point
    sums whose order differs between devices, so codes agree but where a value sits on a
    cluster boundary."""
    flags = ["--method", "squeezellm", "--bits", "4", "--outliers", "0.45%", "--nsamples", "32", "--seqlen", "256",
             "--calib-dtype", "float32", "--quiet"]
    for device in ("cpu", "cuda"):
        assert main(["quantize", str(trained_llama), "-o", str(tmp_path / device), "--device", device,
                     "--fisher", str(tmp_path / f"{device}.fisher"), *flags]) == 0
    from safetensors.torch import load_file

    cpu_fisher, gpu_fisher = (load_file(tmp_path / f"{device}.fisher") for device in ("cpu", "cuda"))
    for name, value in cpu_fisher.items():
        assert (gpu_fisher[name] - value).norm() <= 1e-3 * value.norm(), name
    cpu, gpu = read_checkpoint(tmp_path / "cpu").weights, read_checkpoint(tmp_path / "cuda").weights
    same = sum((cpu[name].codes() == gpu[name].codes()).sum().item() for name in cpu)
    assert same / sum(cpu[name].codes().numel() for name in cpu) >= 0.99
    cpu_ppl, gpu_ppl = (perplexity(tmp_path / device, capsys) for device in ("cpu", "cuda"))
    assert gpu_ppl == pytest.approx(cpu_ppl, rel=0.005)


@pytest.mark.parametrize("flags", [
    ["--method", "gptq", "--bits", "4", "--group-size", "64", "--asym"],
    ["--method", "gptq", "--bits", "8", "--group-size", "-1", "--sym", "--act-order", "group"],
    ["--method", "squeezellm", "--bits", "4", "--outliers", "0.45%"],
    ["--method", "squeezellm", "--bits", "3", "--group-size", "64"],
    ["--method", "smoothquant+gptq", "--alpha", "auto"],  # W8A8: the int8 GEMM against exact integer sums
])
def test_kernels_give_the_reference_perplexity(trained_llama, tmp_path, capsys, monkeypatch, flags):
    """The same checkpoint evaluated in fp16 on the GPU through the Triton kernels and through the
    reference dequantize-and-matmul path: perplexities within 0.1%."""
    out = tmp_path / "ckpt"
    assert main(["quantize", str(trained_llama), "-o", str(out), "--nsamples", "32", "--seqlen", "256", "--quiet",
                 *flags]) == 0
    with_kernels = perplexity(out, capsys)
    monkeypatch.setenv("QTOOL_KERNELS", "reference")
    with_reference = perplexity(out, capsys)
    print(f"{' '.join(flags)}: ppl kernels {with_kernels:.4f} reference {with_reference:.4f}")
    assert with_kernels == pytest.approx(with_reference, rel=1e-3)
