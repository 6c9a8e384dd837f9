"""Device and numeric precision: the one place that decides where tensors live."""

from __future__ import annotations

import contextlib
import functools

import torch

from mtl import settings
from mtl.errors import MtlError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when a GPU is visible, else the CPU; ``cuda`` without a GPU is an error."""
    if isinstance(name, torch.device):
        return name
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


@functools.cache
def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively here (AVX-512-BF16 or AMX CPUs, Ampere+ GPUs): where
    they do not, bf16 autocast is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        from pathlib import Path

        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def cpu_name() -> str:
    """The processor's model name, printed beside every benchmark figure (speeds compare only within one)."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def set_threads(threads: int | None) -> None:
    """A recipe's ``threads``, capped by ``MTL_MAX_THREADS``."""
    keep_freed_memory()
    cap = settings.max_threads()
    if threads or cap:
        torch.set_num_threads(min(n for n in (threads, cap) if n))


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of handing it back to the system.

    A meta-iteration allocates and frees the same large activation buffers for every task; by
    default glibc unmaps or trims them and page-faults them in again (millions of faults a minute
    on Omniglot's Conv-4, 10-25% of meta-training time on CPU). The cost: the process keeps its
    peak memory until it exits. A no-op (False) where there is no glibc."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    settings = ((m_mmap_threshold, 32 << 20), (m_trim_threshold, 2**31 - 1), (m_top_pad, 256 << 20))
    return all(mallopt(option, value) == 1 for option, value in settings)


def init_distributed(name: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under ``torchrun`` (WORLD_SIZE > 1) joins the process group:
    ``nccl`` on CUDA (one GPU per local rank), ``gloo`` on CPU."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(name)
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _group_active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every process; a no-op outside ``torchrun``."""
    import torch.distributed as dist

    if _group_active():
        dist.barrier()


def close_distributed() -> None:
    """Leave the process group before exit. Without it a rank that finishes first (rank 1 skips
    checkpointing) can abort in gloo's teardown ("terminate called without an active exception")."""
    import torch.distributed as dist

    if _group_active():
        dist.destroy_process_group()


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum tensors over processes in place, as one flat buffer (one collective, not one per tensor)."""
    import torch.distributed as dist

    if not tensors or not _group_active() or dist.get_world_size() == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
