"""Shared fixtures: a tiny random Llama with a real (small, trained here) tokenizer, built in the
test session, and the environment every test runs in (offline, WikiText-2 from shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ["QTOOL_OFFLINE"] = "1"
if not torch.cuda.is_available():  # Triton kernels run on the CPU only in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
if "QTOOL_DATA_DIR" not in os.environ and (SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").is_file():
    os.environ["QTOOL_DATA_DIR"] = str(SHARED_DATA)


def training_text() -> str:
    from qtool.calibrate.data import load_text

    return load_text("wiki-leads")[:200_000]


def build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    core.train_from_iterator([training_text()], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_tiny_llama(folder: Path, tie: bool = True, dtype=torch.float16, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(folder)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random fp16 Llama (2 blocks, hidden 64) with a 512-token BPE tokenizer, saved as safetensors."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(training_text()[:20_000], encoding="utf-8")
    return path


@pytest.fixture
def tiny_llama():
    """A random fp32 Llama in memory (no files), for unit tests of quantization and loading."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws the same random numbers on every run."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def calibration_flags(tiny_text_file):
    """A short calibration set for the command-line tests: enough for every method on the tiny model."""
    return ["--calib", str(tiny_text_file), "--nsamples", "6", "--seqlen", "48", "--quiet"]
