"""Per-block state of a calibrated run, so an interrupted run resumes from its last finished block.

The state lives in a work folder beside the output: one safetensors file per finished block with
its layers' `QuantizedWeight`s, and `state.json` with the run's fingerprint and per-layer errors.
A run whose fingerprint (model files, recipe, calibration tokens) differs never reuses it. The
saved blocks double as the run's store of finished layers: memory holds only their placeholders
(meta tensors), and the checkpoint writer reads each layer back when it gets to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qtool.quantize.qweight import QuantizedWeight
from qtool.quantize.scheme import Scheme

log = logging.getLogger(__name__)
STATE_FILE = "state.json"
DENSE_PREFIX = "dense:"


def run_fingerprint(model_folder: Path, recipe: dict, calibration: torch.Tensor) -> str:
    """A hash of what decides the result: the model's config and weight files (names, sizes and
    their first megabyte), the recipe, and the calibration tokens."""
    digest = hashlib.sha256()
    digest.update((model_folder / "config.json").read_bytes())
    for file in sorted(model_folder.glob("*.safetensors")):
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
        with file.open("rb") as stream:
            digest.update(stream.read(1 << 20))
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    digest.update(calibration.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()


class BlockStore:
    """Finished blocks of one run, saved as they finish."""

    def __init__(self, folder: Path, fingerprint: str, resume: bool):
        self.folder = folder
        self.fingerprint = fingerprint
        state = self._read_state()
        if state is not None and (not resume or state.get("fingerprint") != fingerprint):
            if resume:
                log.warning("the saved state in %s belongs to another run; starting from the first block", folder)
            shutil.rmtree(folder)
            state = None
        self.errors: dict[str, dict] = state["errors"] if state else {}
        self.finished: list[int] = state["finished"] if state else []
        self.block_of: dict[str, int] = {}  # layer -> the block whose file holds it

    def _read_state(self) -> dict | None:
        try:
            return json.loads((self.folder / STATE_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def read(self, name: str) -> QuantizedWeight:
        """The saved weight of one layer, read from its block's file alone."""
        index = self.block_of[name]
        layout = json.loads((self.folder / f"block-{index:05d}.json").read_text())[name]
        with safe_open(self.folder / f"block-{index:05d}.safetensors", framework="pt") as reader:
            tensors = {key: reader.get_tensor(key) for key in reader.keys() if key.startswith(name + ".")}
        return _from_tensors(name, tensors, layout)

    def load(self, index: int) -> dict[str, QuantizedWeight] | None:
        """The quantized layers of block `index` if it finished in an earlier run."""
        if index not in self.finished:
            return None
        tensors = load_file(self.folder / f"block-{index:05d}.safetensors")
        layouts = json.loads((self.folder / f"block-{index:05d}.json").read_text())
        self.block_of.update(dict.fromkeys(layouts, index))
        return {name: _from_tensors(name, tensors, layout) for name, layout in layouts.items()}  # dense ones: dense()

    def dense(self, index: int) -> dict[str, torch.Tensor]:
        """The parameters of block `index` that were saved as they were (unquantized)."""
        tensors = load_file(self.folder / f"block-{index:05d}.safetensors")
        return {key.removeprefix(DENSE_PREFIX): tensor for key, tensor in tensors.items() if key.startswith(DENSE_PREFIX)}

    def save(self, index: int, weights: dict[str, QuantizedWeight], errors: dict[str, dict],
             dense: dict[str, torch.Tensor] | None = None) -> None:
        """Save a finished block: its quantized layers, and the `dense` parameters a method may have
        changed without quantizing them (AWQ folds scales into norms)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {DENSE_PREFIX + name: tensor.detach().contiguous().cpu() for name, tensor in (dense or {}).items()}
        layouts = {}
        for name, weight in weights.items():
            self.block_of[name] = index
            layouts[name] = {"bits": weight.scheme.bits, "group_size": weight.scheme.group_size,
                             "symmetric": weight.scheme.symmetric, "activation_bits": weight.scheme.activation_bits,
                             "shape": list(weight.shape)}
            for field in ("packed", "scales", "zeros", "g_idx"):
                if getattr(weight, field) is not None:
                    tensors[f"{name}.{field}"] = getattr(weight, field).contiguous().cpu()
        save_file(tensors, self.folder / f"block-{index:05d}.safetensors")
        (self.folder / f"block-{index:05d}.json").write_text(json.dumps(layouts))
        self.errors.update({name: errors[name] for name in weights})
        self.finished.append(index)
        state = {"fingerprint": self.fingerprint, "finished": self.finished, "errors": self.errors}
        scratch = self.folder / (STATE_FILE + ".tmp")
        scratch.write_text(json.dumps(state))
        scratch.replace(self.folder / STATE_FILE)  # the block counts only once its files are complete

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _from_tensors(name: str, tensors: dict[str, torch.Tensor], layout: dict) -> QuantizedWeight:
    scheme = Scheme(layout["bits"], layout["group_size"], layout["symmetric"], activation_bits=layout["activation_bits"])
    return QuantizedWeight(
        tensors[f"{name}.packed"], tensors[f"{name}.scales"], tensors.get(f"{name}.zeros"), scheme,
        tuple(layout["shape"]), tensors.get(f"{name}.g_idx"),
    )
