"""Choosing where tensors are computed (``--device auto|cpu|cuda``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from bora_tools.choices import DEVICE_CHOICES
from bora_tools.errors import UnsupportedError, ValidationError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU.

    Example: ``resolve_device("auto")`` -> ``device(type='cpu')`` on a machine without a GPU.

    Raises:
        UnsupportedError: ``cuda`` was asked for and no CUDA device is available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UnsupportedError("`device` cuda: no CUDA device is available on this machine", hint="use `device` cpu")
    if name not in DEVICE_CHOICES:
        raise ValidationError(f"`device` {name!r}: expected one of {', '.join(DEVICE_CHOICES)}")
    return torch.device(name)


@contextlib.contextmanager
def one_cpu_thread(device: torch.device | str) -> Iterator[None]:
    """Run torch on one CPU thread inside the block, restoring the setting afterwards.

    Streaming and per-module work is a series of small, cache-sized operations:
    a second thread gains little, and on a CPU shared with other processes the
    thread pool's barriers made a merge up to 20x and a to-lora conversion
    5-10x slower (docs/benchmarks.md). No effect on a GPU.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
