"""Device choice (auto: CUDA, then Apple MPS, then CPU) and the matching autocast.

torch is imported inside the functions, so the command line can take `DEVICE_CHOICES` for its options
without loading torch at start-up.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from uharmony.errors import UHarmonyError, ExitCode

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def detect() -> dict:
    """What this machine offers; shown by `uharmony devices` and the Slicer module."""
    import torch

    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return {
        "cuda": cuda,
        "cuda_name": torch.cuda.get_device_name(0) if cuda else None,
        "mps": mps,
        "auto": "cuda" if cuda else "mps" if mps else "cpu",
        "torch": torch.__version__,
    }


def choose_device(name: str = "auto") -> torch.device:
    import torch

    if name not in DEVICE_CHOICES:
        raise UHarmonyError(f"--device must be one of {', '.join(DEVICE_CHOICES)}, not {name!r}", code=ExitCode.USAGE)
    found = detect()
    if name == "auto":
        return torch.device(found["auto"])
    if name == "cuda" and not found["cuda"]:
        raise UHarmonyError("--device cuda was asked for, but no CUDA GPU is available (try --device auto)",
                            code=ExitCode.USAGE)
    if name == "mps" and not found["mps"]:
        raise UHarmonyError("--device mps was asked for, but Apple MPS is not available (try --device auto)",
                            code=ExitCode.USAGE)
    return torch.device(name)


def autocast(device: torch.device):
    """fp16 autocast on CUDA (U-Harmony layers force fp32 themselves); nothing elsewhere."""
    if device.type == "cuda":
        import torch

        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def available_memory_bytes(device: torch.device | None = None) -> int:
    """Free memory where the big arrays will live (host RAM; the GPU's own when on CUDA)."""
    if device is not None and device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30  # unknown platform (Windows without psutil): assume 8 GiB
