"""sed_lens — spectral-edge directions (SED) of attention training signals and their coupling to LCH centroids.

A TransformerLens extension implementing Xu (2026), arXiv 2604.25143. Models are ``HookedTransformer``s.
"""

from sed_lens.analysis.centroids import centroids
from sed_lens.analysis.coupling import CouplingResult, centroid_response, coupling
from sed_lens.analysis.sed import RollingSED
from sed_lens.analysis.trajectory import ScanConfig, scan_coupling
from sed_lens.errors import SedLensError
from sed_lens.grid import Cell, run_grid
from sed_lens.hooks.capture import GradientCapture, capture_task_gradients
from sed_lens.hooks.interventions import SubspaceProjection
from sed_lens.hooks.snapshots import SnapshotStore
from sed_lens.models import PRESETS, Readout, build_model, get_readout, set_readout, task_logits
from sed_lens.subspace import ParamSubspace
from sed_lens.tasks import ModularArithmetic, available_ops, register_op
from sed_lens.tracking import Run
from sed_lens.training import Callback, TrainConfig, Trainer, TrainResult, evaluate

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
    "Readout",
    "Run",
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
