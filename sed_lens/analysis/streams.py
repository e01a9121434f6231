"""Streams: the gradient vectors SED is computed from, at one model state.

Three sources feed rolling SED windows (see :mod:`sed_lens.analysis.sed`):

* ``"update"`` — the change of the subspace weights between consecutive snapshots (what AdamW, its momentum,
  adaptive scaling and weight decay actually applied);
* ``"gradient"`` — the raw cross-entropy gradient on one fixed batch at each snapshot (no clipping, weight decay
  or optimizer state); for a multitask model the gradient of the summed loss;
* ``"task_gradient"`` — one gradient per op, of that op's own loss, on the same batch (``task_gradient/OP``).

:func:`stream_vectors` computes the gradient-type entries of one model state; both the live
:class:`~sed_lens.hooks.capture.GradientCapture` callback and the offline :func:`capture_offline` (stored states)
use it. The ``update`` entry is a difference of two states, kept by whoever walks the states.

Per-op gradients come from one shared forward pass and one backward per op (``torch.autograd.grad`` with the
graph retained), restricted to the subspace's parameters: exact, and the fastest exact option measured
(``benchmarks/capture.py``). Nothing here depends on training or on callbacks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from sed_lens.configs import SOURCES
from sed_lens.devices import model_device
from sed_lens.errors import check
from sed_lens.models import as_label_dict, readout_logits, split_logits
from sed_lens.subspace import ParamSubspace
from sed_lens.task import Batch, Task, cross_entropy


def gradient_batch(task: Task, n: int = 512, seed: int = 0, split: str = "all") -> Batch:
    """The fixed batch gradients are measured on: ``n`` examples drawn with replacement from ``split``
    (``"all"`` — the whole grid, as the paper's code — ``"train"`` or ``"test"``; a sequence task's fixed sets),
    by ``RandomState(seed)``."""
    check(isinstance(n, int) and n >= 1, f"the gradient batch needs at least one pair, got {n!r}.")
    tokens, labels = task.split(split)
    pick = torch.from_numpy(np.random.RandomState(seed).randint(0, len(tokens), size=n).astype(np.int64))
    return tokens[pick], {op: y[pick] for op, y in labels.items()}


def task_gradients(model: HookedTransformer, subspace: ParamSubspace, tokens: Tensor,
                   labels: Mapping[str, Tensor] | Tensor) -> dict[str, Float[Tensor, " P"]]:
    """``{op: [P]}``: the gradient of each op's mean cross-entropy on its own head (over every readout position),
    in the subspace.

    One forward pass is shared; each op gets its own backward (``torch.autograd.grad``, graph retained), so
    the result equals separate per-op backward passes. ``.grad`` of the model is left untouched.
    """
    labels = as_label_dict(model, labels)
    device = model_device(model)
    tokens, labels = tokens.to(device), {op: y.to(device) for op, y in labels.items()}
    with torch.enable_grad():
        logits = split_logits(model, readout_logits(model, tokens), list(labels))
        losses = {op: cross_entropy(logits[op], y) for op, y in labels.items()}
        named = subspace.parameters_of(model)
        params = list(named.values())
        out: dict[str, Tensor] = {}
        for i, (op, loss) in enumerate(losses.items()):
            grads = torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1, allow_unused=True)
            out[op] = subspace.flatten({n: (g if g is not None else torch.zeros_like(p))
                                        for (n, p), g in zip(named.items(), grads, strict=True)})
    return out


def capture_task_gradients(model: HookedTransformer, task: Task, subspace: ParamSubspace,
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


def stream_vectors(model: HookedTransformer, task: Task, subspace: ParamSubspace, batch: Batch,
                   sources: Sequence[str] = SOURCES) -> dict[str, Float[Tensor, " P"]]:
    """The gradient-type stream entries of ``model`` in its current state on the fixed ``batch``:
    ``"gradient"`` and ``"task_gradient/OP"`` as ``sources`` ask for them (``{}`` if it names neither).

    ``batch`` is ``(tokens, {op: labels})``. The ``update`` entry is a difference of two states and is not
    computed here. This is the one computation behind both the live and the offline capture."""
    if not {"gradient", "task_gradient"} & set(sources):
        return {}
    tokens, labels = batch
    grads = task_gradients(model, subspace, tokens, {op: labels[op] for op in task.ops})
    return snapshot_vectors(grads, sources, task.multitask)


def capture_offline(model: HookedTransformer, task: Task, subspace: ParamSubspace,
                    snapshots: Iterable[tuple[int, Mapping[str, Tensor]]], batch: Batch | None = None,
                    sources: Sequence[str] = SOURCES) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """The same stream entries as :class:`~sed_lens.hooks.capture.GradientCapture`, from stored model states
    (e.g. the paper's checkpoints every 25 steps): yields ``(step, {stream: vector})`` per snapshot. The
    ``update`` entry at a snapshot is θ_t − θ_previous (none at the first snapshot). ``model`` is loaded with
    each state in turn."""
    batch = batch if batch is not None else gradient_batch(task)
    last: Tensor | None = None
    for step, state in snapshots:
        model.load_state_dict(dict(state), strict=False)
        vectors: dict[str, Tensor] = {}
        if "update" in sources:
            w = subspace.weights(model)
            if last is not None:
                vectors["update"] = w - last
            last = w
        vectors.update(stream_vectors(model, task, subspace, batch, sources))
        yield step, vectors
