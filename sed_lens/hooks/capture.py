"""The live ``GradientCapture`` training callback: rolling SED windows of the attention training signals.

The stream vectors themselves (update / gradient / per-task gradient) and the offline capture from stored
states are pure computations in :mod:`sed_lens.analysis.streams`; this module only feeds them to SED windows
while training. ``gradient_batch``, ``task_gradients``, ``capture_task_gradients``, ``snapshot_vectors`` and
``capture_offline`` are re-exported from there (their old home) so existing imports keep working.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from sed_lens.analysis.sed import RollingSED
from sed_lens.analysis.streams import (  # re-exported: their old home was this module
    capture_offline,
    capture_task_gradients,
    gradient_batch,
    snapshot_vectors,
    stream_vectors,
    task_gradients,
)
from sed_lens.configs import SOURCES
from sed_lens.devices import model_device
from sed_lens.errors import check
from sed_lens.subspace import ParamSubspace
from sed_lens.task import Batch, Task
from sed_lens.training import Callback, Trainer

__all__ = ["GradientCapture", "capture_offline", "capture_task_gradients", "gradient_batch", "snapshot_vectors",
           "stream_vectors", "task_gradients"]


class GradientCapture(Callback):
    """Feed rolling SED windows with attention updates, gradients and per-task gradients while training.

    Every ``every`` steps (and at step 0) it takes a snapshot: the subspace's weights (the ``update`` stream
    gets θ_t − θ_{t−every}) and per-op gradients on a fixed batch (the ``gradient`` and ``task_gradient/OP``
    streams). No checkpoint is stored; memory is O(window · P) per stream. At each eval it adds, per stream,
    ``sed/STREAM/sigma_j`` (j = 1..k+1), ``sed/STREAM/gap_j`` (σ_j/σ_{j+1}), ``sed/STREAM/overlap`` (mean cos² of
    the principal angles to the previous snapshot's basis) and ``sed/STREAM/rank_deficient`` to the metrics;
    at the end it saves the final bases to ``RUN_DIR/sed_bases.pt`` (see :meth:`save_bases`).

    For a single-op task ``task_gradient/OP`` is the ``gradient`` stream itself and is not duplicated.

    Args:
        subspace: where vectors live; default ``ParamSubspace.attention(model)`` at the start of training.
        sources: any of ``"update"``, ``"gradient"``, ``"task_gradient"``.
        window, k: the rolling SED window W and the number of directions.
        every: snapshot interval in steps.
        batch: the fixed gradient batch; default ``gradient_batch(task, batch_size, batch_seed, batch_split)``.
    """

    def __init__(self, subspace: ParamSubspace | None = None, sources: Sequence[str] = SOURCES, window: int = 20,
                 k: int = 3, every: int = 25, batch: Batch | None = None, batch_size: int = 512, batch_seed: int = 0,
                 batch_split: str = "all") -> None:
        sources = tuple(sources)
        bad = [s for s in sources if s not in SOURCES]
        check(not bad and len(sources) > 0, f"unknown SED source {', '.join(bad) or '(none)'}; choose from {', '.join(SOURCES)}.")
        check(isinstance(every, int) and every >= 1, f"the snapshot interval must be a positive integer, got {every!r}.")
        RollingSED(window, k)  # validates window and k
        self.subspace, self.sources, self.window, self.k, self.every = subspace, sources, window, k, every
        self.batch, self.batch_args = batch, (batch_size, batch_seed, batch_split)
        self.seds: dict[str, RollingSED] = {}
        self.last_weights: Tensor | None = None
        self.last_step: int | None = None

    # --- snapshots ---------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer) -> None:
        if self.subspace is None:
            self.subspace = ParamSubspace.attention(trainer.model)
        if self.batch is None:
            self.batch = gradient_batch(trainer.task, *self.batch_args)
        if not self.seds:
            for name in self.stream_names(trainer.task):
                self.seds[name] = RollingSED(self.window, self.k, track_overlap=True)
        if trainer.step == 0 and self.last_step is None:
            self.snapshot(trainer)

    def on_after_step(self, trainer: Trainer) -> None:
        if trainer.step % self.every == 0:
            self.snapshot(trainer)

    def stream_names(self, task: Task) -> list[str]:
        names = [s for s in self.sources if s != "task_gradient"]
        if "task_gradient" in self.sources and (task.multitask or "gradient" not in self.sources):
            names += [f"task_gradient/{op}" for op in task.ops]
        return names

    @torch.no_grad()
    def snapshot(self, trainer: Trainer) -> dict[str, Tensor]:
        """Take one snapshot now: compute this step's stream entries and push them."""
        assert self.subspace is not None and self.batch is not None
        vectors: dict[str, Tensor] = {}
        if "update" in self.sources:
            w = self.subspace.weights()
            if self.last_weights is not None:  # on the CPU after a resume (checkpoints load there)
                vectors["update"] = w - self.last_weights.to(w.device)
            self.last_weights = w.clone()
        if {"gradient", "task_gradient"} & set(self.sources):
            device = model_device(trainer.model)
            tokens, labels = self.batch
            if tokens.device != device:  # move the fixed batch once
                tokens, labels = tokens.to(device), {op: y.to(device) for op, y in labels.items()}
                self.batch = tokens, labels
            vectors.update(stream_vectors(trainer.model, trainer.task, self.subspace, self.batch, self.sources))
        for name, vec in vectors.items():
            self.seds[name].push(vec)
        self.last_step = trainer.step
        self.on_snapshot(trainer, vectors)
        return vectors

    def on_snapshot(self, trainer: Trainer, vectors: dict[str, Tensor]) -> None:
        """Called after each snapshot with its stream entries; override to consume them (e.g. store them)."""

    # --- reporting ---------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        """Spectrum, gaps, overlap and rank flag of every stream's current window."""
        out: dict[str, Any] = {}
        for name, sed in self.seds.items():
            if sed.n_pushed == 0:
                continue
            b = sed.basis()
            for j in range(self.k + 1):
                out[f"sed/{name}/sigma_{j + 1}"] = float(b.singular_values[j]) if j < len(b.singular_values) else 0.0
            for j, g in enumerate(b.gaps().tolist()):
                out[f"sed/{name}/gap_{j + 1}"] = g
            overlap = sed.overlap()
            if overlap is not None:
                out[f"sed/{name}/overlap"] = overlap
            out[f"sed/{name}/rank_deficient"] = int(b.rank_deficient)
        return out

    def on_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        metrics.update(self.metrics())

    def bases(self) -> dict[str, dict[str, Any]]:
        """``{stream: {"directions" [k, P], "singular_values", "rank", "n_vectors"}}`` of the current windows."""
        out = {}
        for name, sed in self.seds.items():
            if sed.n_pushed:
                b = sed.basis()
                out[name] = {"directions": b.directions.float().cpu(), "singular_values": b.singular_values,
                             "rank": b.rank, "n_vectors": b.n_vectors}
        return out

    def save_bases(self, path: Any, step: int) -> None:
        """Save the current bases with the subspace layout (parameter names, shapes, heads, offsets); tensors and
        plain Python only (loads with ``torch.load(..., weights_only=True)``)."""
        from sed_lens.serialization import save

        assert self.subspace is not None
        save({"format": "sed_lens.sed_bases/1", "step": step, "window": self.window, "k": self.k,
                    "every": self.every, "subspace": self.subspace.describe(), "bases": self.bases()}, path)

    def on_train_end(self, trainer: Trainer) -> None:
        if trainer.run is not None:
            self.save_bases(trainer.run.dir / "sed_bases.pt", trainer.step)

    # --- resume ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"seds": {k: v.state_dict() for k, v in self.seds.items()}, "last_weights": self.last_weights,
                "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seds = {}
        for name, s in state["seds"].items():
            sed = RollingSED(self.window, self.k, track_overlap=True)
            sed.load_state_dict(s)
            self.seds[name] = sed
        self.last_weights, self.last_step = state["last_weights"], state["last_step"]

