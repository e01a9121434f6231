"""Safe files: everything sed_lens writes with ``torch.save`` loads with ``torch.load(..., weights_only=True)``.

Checkpoints, snapshots, ``sed_bases.pt`` and coupling artifacts hold tensors and plain Python (dict, list,
tuple, str, int, float, bool, None) only, so reading one never runs pickled code. :func:`plain` is what writers
pass their objects through (NumPy scalars become Python numbers, NumPy arrays tensors); :func:`load` is the one
reader. Files written before this (sed_lens ≤ 0.1.0) held NumPy arrays (a checkpoint's sampler state) and NumPy
scalars (an artifact's model config); :func:`load` reads those with exactly those NumPy globals allow-listed,
and anything else that is not plain data fails with one :class:`UnsafeFileError` line.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sed_lens.errors import SedLensError


class UnsafeFileError(SedLensError):
    """A file holds Python objects that sed_lens does not unpickle (it loads with ``weights_only=True``)."""


def plain(obj: Any) -> Any:
    """``obj`` with NumPy values replaced by plain Python (scalars) and tensors (arrays), dataclasses by dicts;
    containers are rebuilt only where something changed (a state dict keeps its type and ``_metadata``)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return plain(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        new = {k: plain(v) for k, v in obj.items()}
        if all(new[k] is v for k, v in obj.items()):
            return obj
        out = type(obj)() if type(obj) is not dict else {}
        out.update(new)
        if hasattr(obj, "_metadata"):
            setattr(out, "_metadata", obj._metadata)  # noqa: B010 - nn.Module.state_dict's module versions
        return out
    if isinstance(obj, (list, tuple)):
        items = [plain(v) for v in obj]
        if all(a is b for a, b in zip(items, obj, strict=True)):
            return obj
        return items if isinstance(obj, list) else tuple(items)
    return obj


def save(obj: Any, path: str | Path) -> Path:
    """``torch.save(plain(obj), path)``."""
    torch.save(plain(obj), path)
    return Path(path)


def _legacy_numpy_globals() -> list[Callable[..., Any] | tuple[Callable[..., Any], str]]:
    """The NumPy globals files of sed_lens ≤ 0.1.0 referenced: arrays (``_reconstruct``, ``ndarray``, ``dtype``)
    and scalars (``scalar``), under NumPy 2's and NumPy 1's module paths."""
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # NumPy 1.x
        multiarray = importlib.import_module("numpy.core.multiarray")
    out: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [np.ndarray, np.dtype]
    for name in ("_reconstruct", "scalar"):
        fn = getattr(multiarray, name)
        out += [(fn, f"numpy._core.multiarray.{name}"), (fn, f"numpy.core.multiarray.{name}")]
    out += [type(np.dtype(t)) for t in (np.uint32, np.int64, np.int32, np.float64, np.float32, np.bool_)]
    return list(dict.fromkeys(out))


def _writer_version(path: Path) -> str:
    """The sed_lens version recorded in the ``run.json`` of the run directory holding ``path``."""
    for d in list(path.parents)[:3]:
        try:
            meta = json.loads((d / "run.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("sed_lens_version"):
            return f"sed_lens {meta['sed_lens_version']}"
    return "an unknown sed_lens version (no run.json beside it)"


def _unsupported_global(e: Exception) -> bool:
    """A weights-only load refused a global or a type (not a damaged file)."""
    return isinstance(e, pickle.UnpicklingError) and ("Unsupported global" in str(e) or "Can only build" in str(e))


def load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a file of an older sed_lens with NumPy values is read with just
    those NumPy globals allowed. Anything else that is not tensors and plain data: :class:`UnsafeFileError`.
    Other failures (a truncated or damaged file) propagate as ``torch.load`` raises them."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - sorted below
        if not _unsupported_global(e):
            raise
        first = str(e)
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch ≥ 2.5
    if safe_globals is not None:
        try:
            with safe_globals(_legacy_numpy_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - sorted below
            if not _unsupported_global(e):
                raise
            first = str(e)
    what = first[first.find("GLOBAL ") + 7:].split(" ", 1)[0] if "GLOBAL " in first else "a Python object"
    raise UnsafeFileError(f"{path} was written by {_writer_version(path)} and holds {what}, which sed_lens does not "
                          "unpickle (it loads tensors and plain data only); rerun what wrote it with this sed_lens.")
