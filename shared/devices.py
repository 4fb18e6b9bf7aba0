"""Which device a stage runs on, in one place."""
from __future__ import annotations

import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DEVICE_METAVAR = "auto|cpu|cuda|cuda:N"   # how a --device option shows its choices in --help


class DeviceError(ValueError):
    """A device that does not exist here: an unknown name, or CUDA where none is available."""


def resolve_device(spec: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """The torch device for a device option.

    None, "" or "auto": this process's GPU (cuda:`local_rank`) when CUDA is available, else the CPU.
    "cuda": cuda:`local_rank` (one GPU per process under torchrun / accelerate launch).
    "cuda:N", "cpu" or any other torch device string: that device.
    Raises DeviceError for a name torch does not know, or for a CUDA device that is not there."""
    if spec is None or spec in ("", "auto"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        dev = torch.device("cuda", local_rank)
    else:
        try:
            dev = torch.device(spec)
        except (RuntimeError, TypeError, ValueError):
            raise DeviceError(f"unknown device {spec!r}; use {DEVICE_CHOICES}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r} asked for, but no CUDA GPU is available; use cpu or auto")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        count = torch.cuda.device_count()
        if dev.index >= count:
            raise DeviceError(f"device {spec!r} is {dev}, but only {count} CUDA GPU(s) are visible")
    return dev
