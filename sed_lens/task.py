"""The task protocol: what training, the gradient streams and the centroids need from a dataset.

Two task families satisfy :class:`Task`: :class:`sed_lens.tasks.ModularArithmetic` (a finite grid of pairs, one
label per op at one readout position) and :class:`sed_lens.induction.InductionTask` (freshly sampled repeated
sequences, labels at many readout positions). Nothing in :mod:`sed_lens.training`, :mod:`sed_lens.analysis` or
:mod:`sed_lens.hooks` assumes more about a task than this protocol says.

**Labels.** A batch is ``(tokens [batch, ctx], {op: labels})``. The labels of an op are ``[batch]`` (one
readout position, e.g. modular arithmetic) or ``[batch, n_pos]`` (one label per readout position, e.g. the
next tokens of the second half of an induction sequence); the model's :class:`~sed_lens.models.Readout` gives
logits of the same leading shape with the classes last (``[batch, n_classes]`` or ``[batch, n_pos,
n_classes]``). :func:`cross_entropy` is the mean cross-entropy over every labelled position of every example,
whichever of the two shapes.

**Losses and metrics belong to the task** (:meth:`Task.losses`, :meth:`Task.evaluate`,
:meth:`Task.milestones`), so the :class:`~sed_lens.training.Trainer` stays generic. ``evaluate`` must report at
least ``train/acc/OP``, ``test/acc/OP``, ``train/loss/OP`` and ``test/loss/OP`` for every op (the trainer's grok
step, stop rule and progress bar read them), and may add any other ``train/…``, ``test/…`` metric.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch.nn.functional as F
from torch import Tensor
from transformer_lens import HookedTransformer

Labels = dict[str, Tensor]
"""``{op: labels}``: ``[batch]`` (one readout position) or ``[batch, n_pos]`` (one label per readout position)."""
Batch = tuple[Tensor, Labels]
"""``(tokens [batch, ctx], labels)``."""
ReadoutLogits = Callable[[Tensor], dict[str, Tensor]]
"""``tokens -> {op: logits at the readout position(s)}``: ``[batch, n_classes]`` or ``[batch, n_pos, n_classes]``
(:func:`sed_lens.models.task_logits` of a model)."""


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over every labelled position: ``logits [..., n_classes]`` against ``labels [...]``
    (``[batch]`` with ``[batch, C]``, or ``[batch, n_pos]`` with ``[batch, n_pos, C]``). A label ``-100``
    (``F.cross_entropy``'s ``ignore_index``) marks an unlabelled position: no loss there, and the mean is over the
    labelled ones. For one readout position it is ``F.cross_entropy(logits, labels)`` exactly."""
    if logits.ndim == 2:
        return F.cross_entropy(logits, labels)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


@runtime_checkable
class Task(Protocol):
    """A dataset sed_lens can train on and measure: batches, probes, labels at one or many readout positions,
    per-op losses and evaluation metrics (see the module docstring)."""

    @property
    def ops(self) -> tuple[str, ...]:
        """The heads' names; each op has its own labels, loss and metrics."""
        ...

    @property
    def seed(self) -> int:
        """The task's seed (the trainer's default sampler seed)."""
        ...

    @property
    def multitask(self) -> bool:
        """More than one op."""
        ...

    @property
    def n_ctx(self) -> int:
        """Tokens per example."""
        ...

    @property
    def d_vocab(self) -> int:
        """Input vocabulary size."""
        ...

    @property
    def n_classes(self) -> int:
        """Classes per op (outputs of each head)."""
        ...

    def split(self, name: str) -> Batch:
        """A fixed set of examples: ``"train"``, ``"test"`` or ``"all"``."""
        ...

    def batch(self, n: int, generator: Any = None) -> Batch:
        """``n`` training examples drawn with ``generator`` (a ``numpy.random.RandomState``, a
        ``numpy.random.Generator`` or a ``torch.Generator``): resampled from a finite split, or freshly sampled."""
        ...

    def probes(self, n: int = 1024, seed: int = 0) -> Batch:
        """A fixed probe set of ``n`` examples chosen by ``seed`` (centroids, coupling)."""
        ...

    @property
    def max_probes(self) -> int | None:
        """The most probes :meth:`probes` can return (a finite grid's size); None: any number (freshly sampled)."""
        ...

    def losses(self, logits: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{op: scalar loss}`` for every op in ``labels``, from the readout logits ``{op: [batch, (n_pos,) C]}``;
        training minimises their sum."""
        ...

    def evaluate(self, model: HookedTransformer, readout: ReadoutLogits) -> dict[str, float]:
        """Evaluation metrics of ``model`` (in eval mode, gradients off): at least ``{train,test}/{acc,loss}/OP``."""
        ...

    def milestones(self, history: Sequence[Mapping[str, Any]]) -> dict[str, int | None]:
        """Named steps found in a run's own eval rows (e.g. ``{"phase_change": 1200}``); ``{}`` if none."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able description."""
        ...


@runtime_checkable
class SequenceTask(Task, Protocol):
    """A :class:`Task` whose labels sit at fixed readout positions it names itself (a model built for it reads
    its logits there)."""

    @property
    def readout_positions(self) -> tuple[int, ...]:
        """The positions whose logits are read, in order (the last axis but one of the labels)."""
        ...
