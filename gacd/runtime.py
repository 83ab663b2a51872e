"""Where and how reproducibly a run computes: the device, the seeds, seeded random streams."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA when present, else the CPU; otherwise the device named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_model() -> str:
    """The CPU's model name (`/proc/cpuinfo` on Linux, else `platform.processor()`)."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def hardware(device: torch.device) -> str:
    """What a run's numbers depend on beyond its config and seed: the GPU (and CUDA), or the
    CPU with the kernels PyTorch dispatches to on it (`AVX512`, `AVX2`: another ISA rounds
    differently, and training amplifies it) and its thread count; and PyTorch's version.
    `NVIDIA H100 80GB HBM3, CUDA 13.0, torch 2.14.1+cu130` or `Intel(R) Xeon(R) Processor,
    AVX512, 1 thread, torch 2.14.1+cu130`."""
    if device.type == "cuda":
        found = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        threads = torch.get_num_threads()
        capability = torch.backends.cpu.get_cpu_capability()
        found = f"{cpu_model()}, {capability}, {threads} thread{'s' if threads > 1 else ''}"
    return f"{found}, torch {torch.__version__}"


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and PyTorch's generators (every device) from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Random starts drawn from their own seeded stream: the same numbers on every call, and
    the caller's random state left as it was (so evaluating never changes a training run)."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(seed)
        yield


def random_state() -> dict[str, Any]:
    """Every generator `seed_everything` seeds, as it is now (CUDA's on every device)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_random_state(state: dict[str, Any]) -> None:
    """Put back what `random_state` took."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
