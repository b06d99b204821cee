"""llm-compressor's AWQ on SmolLM2-135M with qtool's calibration tokens: the baseline issue 4 compares with.

Two steps, in two environments (llm-compressor pins its own torch/transformers, so it is not a
qtool dependency):

    python benchmarks/llmcompressor_awq.py tokens TOKENS.pt            # in qtool's venv
    python benchmarks/llmcompressor_awq.py run MODEL TOKENS.pt OUT [DTYPE]  # in a venv with llmcompressor

The first writes the exact windows `qtool quantize --calib wiki-leads --nsamples 128 --seqlen 512
--seed 0` calibrates on; the second runs llm-compressor's AWQModifier (W4 group 64 asymmetric,
its default Llama mappings, duo scaling, 20 grid points, lm_head dense) on them and saves a compressed-tensors
checkpoint, which `qtool eval OUT --ppl wikitext --seqlen 2048 --max-windows 40` measures. DTYPE
is what the model is loaded and calibrated in: float32 (the default, as qtool calibrates on a CPU)
or float16 (as stored, llm-compressor's own default; on a CPU its fp16 matmuls take ~30 s per grid
point here).
"""

from __future__ import annotations

import sys
import time

import torch

SCHEME = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64}


def save_tokens(path: str) -> None:
    from qtool.calibrate.data import calibration_windows, load_text, tokenize
    from qtool.runtime.loader import load_tokenizer
    from qtool.runtime.resolve import resolve_model

    tokenizer = load_tokenizer(resolve_model("smollm2-135m"), False)
    windows = calibration_windows(tokenize(tokenizer, load_text("wiki-leads")), 128, 512, 0)
    torch.save(windows, path)


def run_awq(model: str, tokens_path: str, out: str, dtype: str = "float32") -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.cuda.is_available():  # pinning host memory (for faster copies to a GPU) needs one
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    windows = torch.load(tokens_path)
    data = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    # AWQ only scales (it searches with the quantization scheme of the modifier after it)
    recipe = [AWQModifier(), QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": SCHEME}},
                                                  ignore=["lm_head"])]
    started = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
    oneshot(model=loaded, tokenizer=AutoTokenizer.from_pretrained(model), recipe=recipe, dataset=data, num_calibration_samples=len(windows),
            max_seq_length=windows.shape[1], output_dir=out, save_compressed=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "the CPU"
    print(f"llm-compressor AWQ ({dtype}) took {time.perf_counter() - started:.1f} s on {device}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["tokens"]:
        save_tokens(sys.argv[2])
    elif sys.argv[1:2] == ["run"]:
        run_awq(*sys.argv[2:6])
    else:
        raise SystemExit(__doc__)
