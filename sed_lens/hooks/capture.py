"""Capture of attention-weight training signals: per-task gradients, and the live ``GradientCapture`` callback.

Three sources feed rolling SED windows (see :mod:`sed_lens.analysis.sed`):

* ``"update"`` — the change of the subspace weights between consecutive snapshots (what AdamW, its momentum,
  adaptive scaling and weight decay actually applied);
* ``"gradient"`` — the raw cross-entropy gradient on one fixed batch at each snapshot (no clipping, weight decay
  or optimizer state); for a multitask model the gradient of the summed loss;
* ``"task_gradient"`` — one gradient per op, of that op's own loss, on the same batch (``task_gradient/OP``).

Per-op gradients come from one shared forward pass and one backward per op (``torch.autograd.grad`` with the
graph retained), restricted to the subspace's parameters: exact, and the fastest exact option measured
(``benchmarks/capture.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from sed_lens.analysis.sed import RollingSED
from sed_lens.configs import SOURCES
from sed_lens.devices import model_device
from sed_lens.errors import check
from sed_lens.models import as_label_dict, readout_logits, split_logits
from sed_lens.subspace import ParamSubspace
from sed_lens.tasks import Batch, ModularArithmetic
from sed_lens.training import Callback, Trainer


def gradient_batch(task: ModularArithmetic, n: int = 512, seed: int = 0, split: str = "all") -> Batch:
    """The fixed batch gradients are measured on: ``n`` pairs drawn with replacement from ``split``
    (``"all"`` — the whole grid, as the paper's code — ``"train"`` or ``"test"``), by ``RandomState(seed)``."""
    check(isinstance(n, int) and n >= 1, f"the gradient batch needs at least one pair, got {n!r}.")
    tokens, labels = task.split(split)
    pick = torch.from_numpy(np.random.RandomState(seed).randint(0, len(tokens), size=n).astype(np.int64))
    return tokens[pick], {op: y[pick] for op, y in labels.items()}


def task_gradients(model: HookedTransformer, subspace: ParamSubspace, tokens: Tensor,
                   labels: Mapping[str, Tensor] | Tensor) -> dict[str, Float[Tensor, " P"]]:
    """``{op: [P]}``: the gradient of each op's mean cross-entropy on its own head, in the subspace.

    One forward pass is shared; each op gets its own backward (``torch.autograd.grad``, graph retained), so
    the result equals separate per-op backward passes. ``.grad`` of the model is left untouched.
    """
    labels = as_label_dict(model, labels)
    device = model_device(model)
    tokens, labels = tokens.to(device), {op: y.to(device) for op, y in labels.items()}
    with torch.enable_grad():
        logits = split_logits(model, readout_logits(model, tokens), list(labels))
        losses = {op: F.cross_entropy(logits[op], y) for op, y in labels.items()}
        named = subspace.parameters_of(model)
        params = list(named.values())
        out: dict[str, Tensor] = {}
        for i, (op, loss) in enumerate(losses.items()):
            grads = torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1, allow_unused=True)
            out[op] = subspace.flatten({n: (g if g is not None else torch.zeros_like(p))
                                        for (n, p), g in zip(named.items(), grads, strict=True)})
    return out


def capture_task_gradients(model: HookedTransformer, task: ModularArithmetic, subspace: ParamSubspace,
                           batch: Batch | None = None) -> dict[str, Float[Tensor, " P"]]:
    """Per-op gradients on ``batch`` (default: :func:`gradient_batch` of ``task``), ``{op: [P]}``.

    ``batch`` is ``(tokens, labels)`` as ``task.batch`` / ``task.probes`` return it (labels ``{op: [n]}``)."""
    if batch is None:
        batch = gradient_batch(task)
    check(isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Tensor)
          and isinstance(batch[1], (Mapping, Tensor)),
          f"batch must be a (tokens, labels) pair as task.batch(n) returns it, got "
          f"{'a bare tensor' if isinstance(batch, Tensor) else type(batch).__name__}.")
    tokens, labels = batch
    if isinstance(labels, Tensor):
        check(len(task.ops) == 1, f"labels for a multitask task must be a dict {{op: labels}} of {', '.join(task.ops)}.")
        labels = {task.ops[0]: labels}
    missing = [op for op in task.ops if op not in labels]
    check(not missing, f"batch labels have no entry for op {', '.join(missing)}.")
    return task_gradients(model, subspace, tokens, {op: labels[op] for op in task.ops})


def snapshot_vectors(grads: Mapping[str, Tensor], sources: Sequence[str], multitask: bool) -> dict[str, Tensor]:
    """The gradient-type stream entries of one snapshot from its per-op gradients."""
    out: dict[str, Tensor] = {}
    if "gradient" in sources:
        total = torch.stack(list(grads.values())).sum(0) if len(grads) > 1 else next(iter(grads.values()))
        out["gradient"] = total
    if "task_gradient" in sources and (multitask or "gradient" not in sources):
        out.update({f"task_gradient/{op}": g for op, g in grads.items()})
    return out


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

    def stream_names(self, task: ModularArithmetic) -> list[str]:
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
            grads = task_gradients(trainer.model, self.subspace, tokens, {op: labels[op] for op in trainer.task.ops})
            vectors.update(snapshot_vectors(grads, self.sources, trainer.task.multitask))
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
        """Save the current bases with the subspace layout (parameter names, shapes, heads, offsets)."""
        assert self.subspace is not None
        torch.save({"format": "sed_lens.sed_bases/1", "step": step, "window": self.window, "k": self.k,
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


def capture_offline(model: HookedTransformer, task: ModularArithmetic, subspace: ParamSubspace,
                    snapshots: Iterable[tuple[int, Mapping[str, Tensor]]], batch: Batch | None = None,
                    sources: Sequence[str] = SOURCES) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """The same stream entries as :class:`GradientCapture`, from stored model states (e.g. the paper's
    checkpoints every 25 steps): yields ``(step, {stream: vector})`` per snapshot. The ``update`` entry at a
    snapshot is θ_t − θ_previous (none at the first snapshot). ``model`` is loaded with each state in turn."""
    batch = batch if batch is not None else gradient_batch(task)
    tokens, labels = batch
    last: Tensor | None = None
    for step, state in snapshots:
        model.load_state_dict(dict(state), strict=False)
        vectors: dict[str, Tensor] = {}
        if "update" in sources:
            w = subspace.weights(model)
            if last is not None:
                vectors["update"] = w - last
            last = w
        if {"gradient", "task_gradient"} & set(sources):
            grads = task_gradients(model, subspace, tokens, {op: labels[op] for op in task.ops})
            vectors.update(snapshot_vectors(grads, sources, task.multitask))
        yield step, vectors
