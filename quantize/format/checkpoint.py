"""Write and read checkpoint folders: safetensors shards, config.json, tokenizer, qtool.json.

A checkpoint is written into a scratch folder beside its destination and renamed into place at the
end, so an interrupted or failed run leaves nothing at the destination. Tensors are written in
name order with fixed metadata, so the same model and weights give the same bytes.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from qtool.errors import FAILURE, QtoolError

SHARD_BYTES = 4 * 1024**3
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
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


def dense_tensors(tensors: dict[str, torch.Tensor], layers, suffixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The stored tensors that are not one of the quantized `layers`' own (`NAME.SUFFIX`)."""
    return {key: tensor for key, tensor in tensors.items()
            if not (key.rpartition(".")[0] in layers and key.rpartition(".")[2] in suffixes)}


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


@dataclass(frozen=True)
class PendingTensor:
    """A tensor to be written, known by dtype and shape; `read()` produces it only when its bytes
    are written, so a checkpoint is written holding one such tensor in memory at a time."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def pending(tensor: torch.Tensor | PendingTensor) -> PendingTensor:
    if isinstance(tensor, PendingTensor):
        return tensor
    return PendingTensor(tensor.dtype, tuple(tensor.shape), lambda: tensor)


def save_tensors(folder: Path, tensors: dict[str, torch.Tensor | PendingTensor],
                 shard_bytes: int = SHARD_BYTES) -> list[str]:
    """Save tensors in name order as one file, or as shards with an index past `shard_bytes`."""
    entries = {name: pending(tensors[name]) for name in sorted(tensors)}
    shards: list[list[str]] = [[]]
    size = 0
    for name, entry in entries.items():
        if shards[-1] and size + entry.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += entry.nbytes
    if len(shards) == 1:
        _write_safetensors(folder / SINGLE_FILE, {name: entries[name] for name in shards[0]})
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(names, shards):
        _write_safetensors(folder / file, {name: entries[name] for name in shard})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(entry.nbytes for entry in entries.values())
    write_json(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


def _write_safetensors(path: Path, entries: dict[str, PendingTensor]) -> None:
    """One safetensors file: the header from dtypes and shapes, then each tensor's bytes in turn."""
    header, offset = {}, 0
    for name, entry in entries.items():
        header[name] = {"dtype": SAFETENSORS_DTYPES[entry.dtype], "shape": list(entry.shape),
                        "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as stream:
        stream.write(len(encoded).to_bytes(8, "little"))
        stream.write(encoded)
        for name, entry in entries.items():
            tensor = entry.read().detach()
            if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
                raise QtoolError(f"{name} was announced as {entry.dtype} {entry.shape} but is "
                                 f"{tensor.dtype} {tuple(tensor.shape)}", FAILURE)
            stream.write(tensor.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
            del tensor  # before the next one is read: one tensor in memory at a time


class TensorSource:
    """The tensors of a folder's safetensors files, each read from disk only when asked for."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = {name: file for file in weight_files(folder) for name in _header(file) if name != "__metadata__"}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str) -> torch.Tensor:
        return self._read(name, lambda reader: reader.get_tensor(name))

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of tensor `name`, without reading the rest."""
        return self._read(name, lambda reader: reader.get_slice(name)[start:stop])

    def _read(self, name: str, take) -> torch.Tensor:
        try:
            with safe_open(self.files[name], framework="pt") as reader:
                return take(reader)
        except (SafetensorError, OSError) as error:
            raise QtoolError(f"{self.files[name]} is not a readable safetensors file ({error})") from None


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


AUTOGPTQ_CONFIG = "quantize_config.json"  # where AutoGPTQ kept its settings before config.json held them


def model_config(folder: Path) -> dict:
    """A model folder's config.json; an AutoGPTQ folder's quantize_config.json becomes its
    quantization_config when config.json has none."""
    config = read_json(folder / "config.json")
    if "quantization_config" not in config and (folder / AUTOGPTQ_CONFIG).is_file():
        config["quantization_config"] = {"quant_method": "gptq", **read_json(folder / AUTOGPTQ_CONFIG)}
    return config


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
