"""--device and --dtype as the commands understand them."""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

from qtool.errors import QtoolError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def choose_device(device: str | None) -> str:
    """cpu, or cuda:N with the index spelled out (some CUDA APIs refuse a bare "cuda")."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise QtoolError(f"unknown device {device!r}; use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QtoolError(f"device {device!r} asked for, but no CUDA device is available; use --device cpu")
    if device == "cuda":
        return f"cuda:{torch.cuda.current_device()}"
    return device


def choose_dtype(dtype: str | None, device: str) -> torch.dtype:
    if dtype is None:
        return torch.float32 if device == "cpu" else torch.float16
    if dtype not in DTYPES:
        raise QtoolError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), where bf16 matmuls run
    about twice as fast as float32 ones; elsewhere they are emulated and slower."""
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


class CalibrationDtypes(NamedTuple):
    weights: torch.dtype  # what the model's tensors are loaded in
    linears: torch.dtype  # what linear layers' weights are loaded in
    matmul: torch.dtype | None  # what calibration matmuls autocast to (None: no autocast)


def calibration_dtypes(choice: str, device: str, stored: torch.dtype) -> CalibrationDtypes:
    """The dtypes of a calibrated run for --calib-dtype. On the CPU weights stay float32, so
    methods see them exactly, and half precision only enters through autocast; linear weights,
    which autocast casts anyway, then stay in the checkpoint's dtype (half the memory of float32,
    the same products). On a GPU the weights keep the checkpoint's dtype."""
    if choice not in ("auto", "float64") and choice not in DTYPES:
        raise QtoolError(f"unknown calibration dtype {choice!r}; choose auto, float64 or one of: {', '.join(DTYPES)}")
    if choice in ("float32", "float64"):
        return CalibrationDtypes(DTYPES.get(choice, torch.float64), DTYPES.get(choice, torch.float64), None)
    if device == "cpu":
        matmul = DTYPES[choice] if choice != "auto" else torch.bfloat16 if cpu_has_fast_bfloat16() else None
        return CalibrationDtypes(torch.float32, stored if matmul is not None else torch.float32, matmul)
    if choice == "auto" or DTYPES[choice] == stored:
        return CalibrationDtypes(stored, stored, None)
    return CalibrationDtypes(stored, stored, DTYPES[choice])


SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
              "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes in a size such as 20GiB, 1.5GB or 800MiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise QtoolError(f"cannot read the size {text!r}; write it like 20GiB, 1.5GB or 800MiB")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def limit_device_memory(device: str, limit: str | None) -> int | None:
    """Cap what this process may allocate on a CUDA device; the cap in bytes, or None."""
    if limit is None:
        return None
    if not device.startswith("cuda"):
        raise QtoolError("--max-device-memory limits a CUDA device; drop it or pass --device cuda")
    cap = parse_size(limit)
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    if cap > total:
        raise QtoolError(f"--max-device-memory {limit} is more than {device} has ({total / 2**30:.1f} GiB)")
    torch.cuda.set_per_process_memory_fraction(cap / total, torch.device(device))
    return cap
