"""Where tensors live: ``--device auto|cpu|cuda|mps`` and the model's own device.

Every routine of sed_lens moves what it creates (batches, labels, probes, accumulators, random directions)
to the device of the model's parameters, so a model built with ``build_model(..., device="cuda")`` trains and
is analysed on that device. Tasks keep their data on the CPU; it is moved per batch (a few KiB).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sed_lens.errors import SedLensError

if TYPE_CHECKING:  # torch is imported when a function runs, so the CLIs parse flags without it
    import torch
    from torch import nn

DEVICES = ("auto", "cpu", "cuda", "mps")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``), or ``"unknown CPU"``."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def cpu_capability() -> str:
    """The SIMD level PyTorch's CPU kernels run at on this machine (``torch.backends.cpu.get_cpu_capability()``, e.g.
    ``"AVX2"``, ``"AVX512"``). Kernels of another level (and BLAS code paths of another CPU) sum in another order, so
    a rerun is bit-identical only on a CPU of the same kind; a grokking trajectory amplifies that rounding into a
    different run (``docs/REPRODUCTION.md``, "Same code, same seed, another CPU")."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str | torch.device | None = "auto") -> str:
    """``"auto"`` → ``"cuda"`` if available, else ``"mps"`` if available, else ``"cpu"``; other names are
    checked (``"cuda:1"`` is accepted) and returned."""
    import torch

    if isinstance(name, torch.device):
        name = str(name)
    name = "auto" if name is None else str(name).strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    kind = name.split(":")[0]
    if kind not in DEVICES[1:]:
        raise SedLensError(f"unknown device {name!r}; choose {', '.join(DEVICES)}.")
    if kind == "cuda" and not torch.cuda.is_available():
        raise SedLensError("device cuda was asked for but PyTorch sees no CUDA GPU here; use --device cpu or auto.")
    if kind == "mps" and not mps_available():
        raise SedLensError("device mps was asked for but PyTorch sees no Apple GPU (MPS) here; use --device cpu or auto.")
    return name


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's (first) parameter; the CPU for a model without parameters."""
    import torch

    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums of squares, except on Apple GPUs (MPS has no float64): float32 there."""
    import torch

    return torch.float32 if device.type == "mps" else torch.float64
