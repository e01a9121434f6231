"""sed_lens — spectral-edge directions (SED) of attention training signals and their coupling to LCH centroids.

A TransformerLens extension implementing Xu (2026), arXiv 2604.25143. Models are ``HookedTransformer``s.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sed_lens.errors import SedLensError

if TYPE_CHECKING:
    from sed_lens.analysis.centroids import centroids
    from sed_lens.analysis.coupling import CouplingResult, centroid_response, coupling
    from sed_lens.analysis.sed import RollingSED
    from sed_lens.analysis.streams import capture_task_gradients
    from sed_lens.analysis.trajectory import ScanConfig, scan_coupling
    from sed_lens.grid import Cell, run_grid
    from sed_lens.hooks.capture import GradientCapture
    from sed_lens.hooks.interventions import SubspaceProjection
    from sed_lens.hooks.snapshots import SnapshotStore
    from sed_lens.induction import InductionTask, head_scores
    from sed_lens.loading import LoadedRun, load_run
    from sed_lens.models import PRESETS, Readout, build_model, get_readout, set_readout, task_logits
    from sed_lens.subspace import ParamSubspace
    from sed_lens.task import Task
    from sed_lens.tasks import ModularArithmetic, available_ops, register_op
    from sed_lens.tracking import Run
    from sed_lens.training import Callback, TrainConfig, Trainer, TrainResult, evaluate

# The public names are imported on first use (PEP 562), so that ``python -m sed_lens.experiments.grokking
# --help`` does not pay for torch, TransformerLens and W&B; ``from sed_lens import Trainer`` works as before.
_LAZY = {
    "sed_lens.analysis.centroids": ("centroids",),
    "sed_lens.analysis.coupling": ("CouplingResult", "centroid_response", "coupling"),
    "sed_lens.analysis.sed": ("RollingSED",),
    "sed_lens.analysis.streams": ("capture_task_gradients",),
    "sed_lens.analysis.trajectory": ("ScanConfig", "scan_coupling"),
    "sed_lens.grid": ("Cell", "run_grid"),
    "sed_lens.hooks.capture": ("GradientCapture",),
    "sed_lens.hooks.interventions": ("SubspaceProjection",),
    "sed_lens.hooks.snapshots": ("SnapshotStore",),
    "sed_lens.models": ("PRESETS", "Readout", "build_model", "get_readout", "set_readout", "task_logits"),
    "sed_lens.subspace": ("ParamSubspace",),
    "sed_lens.task": ("Task",),
    "sed_lens.induction": ("InductionTask", "head_scores"),
    "sed_lens.tasks": ("ModularArithmetic", "available_ops", "register_op"),
    "sed_lens.loading": ("LoadedRun", "load_run"),
    "sed_lens.tracking": ("Run",),
    "sed_lens.training": ("Callback", "TrainConfig", "Trainer", "TrainResult", "evaluate"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'sed_lens' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "Callback",
    "Cell",
    "CouplingResult",
    "ScanConfig",
    "SnapshotStore",
    "SubspaceProjection",
    "centroid_response",
    "centroids",
    "coupling",
    "run_grid",
    "scan_coupling",
    "GradientCapture",
    "ParamSubspace",
    "RollingSED",
    "capture_task_gradients",
    "ModularArithmetic",
    "InductionTask",
    "Task",
    "head_scores",
    "Readout",
    "Run",
    "LoadedRun",
    "load_run",
    "SedLensError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "available_ops",
    "build_model",
    "evaluate",
    "get_readout",
    "register_op",
    "set_readout",
    "task_logits",
]
