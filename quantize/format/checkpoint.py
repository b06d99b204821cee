"""Write and read checkpoint folders: safetensors shards, config.json, tokenizer, qtool.json.

A checkpoint is written into a scratch folder beside its destination and renamed into place at the
end, so an interrupted or failed run leaves nothing at the destination. Tensors are written in
name order with fixed metadata, so the same model and weights give the same bytes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qtool.errors import FAILURE, QtoolError

SHARD_BYTES = 4 * 1024**3
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def write_folder_atomically(destination: Path, fill: Callable[[Path], None], overwrite: bool = False) -> None:
    """Run `fill(scratch)` and move the scratch folder to `destination` only if it succeeds."""
    destination = destination.expanduser().absolute()
    if destination.exists() and not overwrite:
        raise QtoolError(f"output folder {destination} already exists; choose another -o or pass --overwrite")
    destination.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        try:
            fill(scratch)
        except OSError as error:
            raise QtoolError(f"could not write {destination}: {error}", exit_code=FAILURE) from None
        if destination.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
            destination.rename(retired / destination.name)
            shutil.rmtree(retired)
        scratch.rename(destination)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without aliases of an earlier tensor (a tied lm_head keeps only the embedding)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    unique = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        unique[name] = tensor
    return unique


def save_tensors(folder: Path, tensors: dict[str, torch.Tensor], shard_bytes: int = SHARD_BYTES) -> list[str]:
    """Save tensors in name order as one file, or as shards with an index past `shard_bytes`."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / SINGLE_FILE, metadata={"format": "pt"})
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(names, shards):
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QtoolError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise QtoolError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise QtoolError(f"{path} must hold a JSON object")
    return data


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder; pickle weights are refused, never loaded."""
    if (folder / INDEX_FILE).is_file():
        index = read_json(folder / INDEX_FILE)
        return [folder / name for name in sorted(set(index.get("weight_map", {}).values()))]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise QtoolError(
            f"{folder} holds only pickle weights (.bin/.pt), which qtool never unpickles; convert them once with "
            f"safetensors.torch.save_file(torch.load(FILE, weights_only=True), 'model.safetensors')"
        )
    raise QtoolError(f"{folder} has no safetensors weights")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def tensor_infos(folder: Path) -> dict[str, TensorInfo]:
    """Names, dtypes, shapes and byte sizes of every stored tensor, from the file headers alone."""
    infos = {}
    for file in weight_files(folder):
        for name, entry in _header(file).items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            infos[name] = TensorInfo(entry["dtype"], tuple(entry["shape"]), end - start)
    return infos


def _header(file: Path) -> dict:
    try:
        with file.open("rb") as stream:
            length = int.from_bytes(stream.read(8), "little")
            if length <= 0 or length > file.stat().st_size:
                raise ValueError("bad header length")
            return json.loads(stream.read(length))
    except (OSError, ValueError) as error:
        raise QtoolError(f"{file} is not a readable safetensors file ({error})") from None


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in weight_files(folder):
        try:
            with safe_open(file, framework="pt") as reader:
                for name in reader.keys():
                    tensors[name] = reader.get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise QtoolError(f"{file} is not a readable safetensors file ({error})") from None
    return tensors
