"""Device and numeric precision: the one place that decides where tensors live."""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

from mtl.errors import MtlError

DeviceName = Literal["auto", "cpu", "cuda"]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when a GPU is visible, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MtlError("--device cuda was asked for but no CUDA GPU is visible to torch",
                       "use --device cpu or --device auto, or install a CUDA build of torch")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise MtlError(f"unknown device '{name}'", "use auto, cpu or cuda")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast (3x faster convolutions on AVX-512-BF16 CPUs and on recent GPUs), or nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
