"""--device and --dtype as the commands understand them."""

from __future__ import annotations

import torch

from qtool.errors import QtoolError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def choose_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise QtoolError(f"unknown device {device!r}; use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QtoolError(f"device {device!r} asked for, but no CUDA device is available; use --device cpu")
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


def calibration_dtypes(choice: str, device: str, stored: torch.dtype) -> tuple[torch.dtype, torch.dtype | None]:
    """(dtype the weights are loaded in, dtype calibration matmuls autocast to or None) for
    --calib-dtype. On the CPU weights stay float32, so methods see them exactly, and half
    precision only enters through autocast; on a GPU the weights keep the checkpoint's dtype."""
    if choice != "auto" and choice not in DTYPES:
        raise QtoolError(f"unknown calibration dtype {choice!r}; choose auto or one of: {', '.join(DTYPES)}")
    if choice == "float32":
        return torch.float32, None
    if device == "cpu":
        if choice == "auto":
            return torch.float32, torch.bfloat16 if cpu_has_fast_bfloat16() else None
        return torch.float32, DTYPES[choice]
    if choice == "auto" or DTYPES[choice] == stored:
        return stored, None
    return stored, DTYPES[choice]
