"""Device choice (CUDA, then Apple MPS, then CPU, with an override) and what the device has."""

from __future__ import annotations

import platform

import psutil
import torch

from .errors import InputError

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def pick_device(choice: str = "auto") -> torch.device:
    """The device to run on: the best available for 'auto', else exactly the one asked for."""
    if choice not in DEVICE_CHOICES:
        raise InputError(f"unknown device '{choice}'; use one of {', '.join(DEVICE_CHOICES)}")
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu or auto")
    if choice == "mps" and not torch.backends.mps.is_available():
        raise InputError("--device mps was asked for but this PyTorch has no MPS support; use --device cpu or auto")
    return torch.device(choice)


def device_report(device: torch.device) -> dict:
    """Versions, device, GPU name and free memory, as plain JSON-able values."""
    report = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "gpu": None,
        "free_memory_bytes": None,
        "total_memory_bytes": None,
    }
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        report.update(
            gpu=torch.cuda.get_device_name(device),
            cuda=torch.version.cuda,
            free_memory_bytes=free,
            total_memory_bytes=total,
        )
    else:
        memory = psutil.virtual_memory()
        report.update(free_memory_bytes=memory.available, total_memory_bytes=memory.total)
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    return report
