"""Helpers shared by the benchmark scripts: interleaved timing and a machine description."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping

import torch

from sed_lens.devices import cpu_capability, cpu_model


def machine() -> str:
    return (f"{cpu_model()} ({cpu_capability()} kernels), {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def interleaved(fns: Mapping[str, Callable[[], object]], reps: int = 5, inner: int = 20,
                warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, measured round-robin so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[k].append((time.perf_counter() - t) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}
