"""Modular-arithmetic tasks: an op registry and :class:`ModularArithmetic` datasets.

A task is the grid of pairs ``(a, b)``, one label per op (``add`` → ``(a + b) mod p`` …), a train/test split
fixed by the seed, batches sampled with replacement from the train split, and a fixed probe set drawn from the
whole grid. Several ops on the same pairs make a multitask dataset (one label per op for every pair).

The split follows the paper's protocol: the pairs in row-major order (``a`` outer, ``b`` inner) are shuffled by
Python's ``random.Random(seed)`` and the first ``int(train_frac · n)`` are the train split.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

from sed_lens.devices import model_device
from sed_lens.errors import SedLensError, check
from sed_lens.task import ReadoutLogits, cross_entropy

OpFn = Callable[[Tensor, Tensor, int], Tensor]
"""``fn(a, b, p) -> label``: elementwise on int64 tensors; the result is reduced mod p by the task."""


@dataclass(frozen=True)
class Op:
    """A binary op mod p. ``nonzero``: its operands range over 1..p-1 (e.g. ``mul``). ``needs_prime``: the op
    only makes sense in a field, so p must be prime (``mul``: a composite modulus has zero divisors)."""

    name: str
    fn: OpFn
    nonzero: bool = False
    formula: str = ""
    needs_prime: bool = False


_OPS: dict[str, Op] = {}


def register_op(name: str, fn: OpFn, *, nonzero: bool = False, formula: str = "", needs_prime: bool = False,
                overwrite: bool = False) -> Op:
    """Register a user op under ``name`` so that ``ModularArithmetic(ops=(name,))`` can use it.

    ``fn(a, b, p)`` gets int64 tensors of operands and returns labels (reduced mod ``p`` afterwards).
    ``nonzero=True`` restricts the operands to 1..p-1, as for ``mul``; ``needs_prime=True`` makes a task with
    this op reject a composite modulus, as for ``mul``.
    """
    check(isinstance(name, str) and name.isidentifier(), f"op name must be an identifier, got {name!r}.")
    check(callable(fn), f"op {name!r} needs a callable fn(a, b, p), got {type(fn).__name__}.")
    check(overwrite or name not in _OPS, f"op {name!r} is already registered; pass overwrite=True to replace it.")
    op = Op(name, fn, nonzero, formula, bool(needs_prime))
    _OPS[name] = op
    return op


def available_ops() -> list[str]:
    """The names of every registered op."""
    return sorted(_OPS)


def get_op(name: str) -> Op:
    """The registered op called ``name``."""
    if name not in _OPS:
        raise SedLensError(f"unknown op {name!r}; choose from {', '.join(available_ops())} or register_op() your own.")
    return _OPS[name]


register_op("add", lambda a, b, p: a + b, formula="a+b")
register_op("sub", lambda a, b, p: a - b, formula="a-b")
register_op("mul", lambda a, b, p: a * b, nonzero=True, formula="a*b", needs_prime=True)
register_op("sq", lambda a, b, p: a * a + b * b, formula="a^2+b^2")

def is_prime(n: int) -> bool:
    """Whether ``n`` is a prime number (trial division; p is at most a few thousand here)."""
    if n < 2:
        return False
    return all(n % d for d in range(2, int(n**0.5) + 1))


LAYOUTS = ("ab", "ab=")
"""Token layouts: ``"ab"`` → ``[a, b]``; ``"ab="`` → ``[a, b, =]`` with ``=`` the token ``p``."""

Labels = dict[str, Int[Tensor, " batch"]]
Batch = tuple[Int[Tensor, "batch ctx"], Labels]


class ModularArithmetic:
    """Pairs ``(a, b)`` mod ``p`` with one label per op, a seeded train/test split, batches and probes.

    Args:
        p: the modulus (an integer ≥ 3, prime if an op needs a field, e.g. ``mul``); tokens ``0..p-1`` are the
            operands.
        ops: op names (see :func:`available_ops`); several ops make a multitask dataset on the same pairs.
        train_frac: fraction of the pairs in the train split, in (0, 1).
        seed: fixes the split.
        layout: ``"ab"`` (tokens ``[a, b]``) or ``"ab="`` (``[a, b, =]``, with ``=`` the token ``p``).
    """

    def __init__(
        self,
        p: int = 97,
        ops: Sequence[str] | str = ("add",),
        train_frac: float = 0.5,
        seed: int = 42,
        layout: str = "ab",
    ) -> None:
        check(isinstance(p, int) and not isinstance(p, bool), f"p must be an integer, got {p!r}.")
        check(p >= 3, f"p must be at least 3, got {p}.")
        if isinstance(ops, str):
            ops = tuple(o for o in ops.split(",") if o)
        ops = tuple(ops)
        check(len(ops) > 0, "ops must name at least one op.")
        check(len(set(ops)) == len(ops), f"ops must not repeat, got {', '.join(ops)}.")
        self.op_specs = tuple(get_op(o) for o in ops)
        field_ops = [op.name for op in self.op_specs if op.needs_prime]
        check(not field_ops or is_prime(p),
              f"op {', '.join(field_ops)} needs a prime modulus (a field), but p={p} is not prime.")
        check(isinstance(train_frac, (int, float)) and 0.0 < float(train_frac) < 1.0,
              f"train_frac must lie strictly between 0 and 1, got {train_frac!r}.")
        check(isinstance(seed, int) and not isinstance(seed, bool), f"seed must be an integer, got {seed!r}.")
        check(layout in LAYOUTS, f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}.")
        self.p = p
        self.ops: tuple[str, ...] = ops
        self.train_frac = float(train_frac)
        self.seed = seed
        self.layout = layout

        lo = 1 if any(op.nonzero for op in self.op_specs) else 0
        operands = torch.arange(lo, p, dtype=torch.long)
        check(len(operands) > 0, f"p={p} leaves no operands for {', '.join(ops)}.")
        a, b = torch.meshgrid(operands, operands, indexing="ij")
        self.pairs: Int[Tensor, "n 2"] = torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)
        n = len(self.pairs)
        order = list(range(n))
        random.Random(seed).shuffle(order)
        n_train = int(self.train_frac * n)
        check(0 < n_train < n, f"train_frac={train_frac} leaves an empty split of the {n} pairs for p={p}.")
        self.train_idx: Int[Tensor, " n_train"] = torch.tensor(order[:n_train], dtype=torch.long)
        self.test_idx: Int[Tensor, " n_test"] = torch.tensor(order[n_train:], dtype=torch.long)
        self.tokens: Int[Tensor, "n ctx"] = self._tokens(self.pairs)
        self.labels: Labels = {op.name: self._label(op, self.pairs) for op in self.op_specs}

    # --- layout ------------------------------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        """Tokens per example."""
        return 3 if self.layout == "ab=" else 2

    @property
    def d_vocab(self) -> int:
        """Input vocabulary: the operands ``0..p-1`` (and ``=`` for layout ``"ab="``)."""
        return self.p + 1 if self.layout == "ab=" else self.p

    @property
    def multitask(self) -> bool:
        return len(self.ops) > 1

    def with_layout(self, layout: str) -> ModularArithmetic:
        """The same task (pairs, split, labels) with another token layout."""
        return ModularArithmetic(self.p, self.ops, self.train_frac, self.seed, layout)

    def single_op(self, op: str) -> ModularArithmetic:
        """The task of ``op`` alone with this task's p, train fraction, seed and layout: its pairs are those a run of
        that op alone has (0..p-1, or 1..p-1 for a ``nonzero`` op such as ``mul``; a multitask task restricts every
        op to 1..p-1 as soon as one op is ``nonzero``), laid out as the same tokens, so its batches and probes feed
        a model of this task directly (the per-op inputs of a multitask coupling scan)."""
        check(op in self.ops, f"op {op!r} is not one of this task's ops ({', '.join(self.ops)}).")
        return ModularArithmetic(self.p, (op,), self.train_frac, self.seed, self.layout)

    def _tokens(self, pairs: Tensor) -> Tensor:
        if self.layout == "ab=":
            eq = torch.full((len(pairs), 1), self.p, dtype=torch.long)
            return torch.cat([pairs, eq], dim=1)
        return pairs.clone()

    def _label(self, op: Op, pairs: Tensor) -> Tensor:
        out = op.fn(pairs[:, 0], pairs[:, 1], self.p)
        if not isinstance(out, Tensor) or out.shape != pairs[:, 0].shape:
            raise SedLensError(f"op {op.name!r} must return one label per pair (a tensor of shape [n]).")
        return torch.remainder(out.long(), self.p)

    # --- splits ------------------------------------------------------------------------------------------
    def split(self, name: str) -> Batch:
        """``(tokens, labels)`` of the whole ``"train"``, ``"test"`` or ``"all"`` split."""
        if name == "all":
            return self.tokens, dict(self.labels)
        idx = {"train": self.train_idx, "test": self.test_idx}.get(name)
        if idx is None:
            raise SedLensError(f"unknown split {name!r}; choose train, test or all.")
        return self.tokens[idx], {op: lab[idx] for op, lab in self.labels.items()}

    @property
    def train(self) -> Batch:
        return self.split("train")

    @property
    def test(self) -> Batch:
        return self.split("test")

    def batch(self, n: int, generator: Any = None) -> Batch:
        """``n`` train examples drawn with replacement.

        ``generator``: a ``numpy.random.RandomState`` (the paper's sampler), a ``numpy.random.Generator`` or a
        ``torch.Generator``; ``None`` uses a fresh ``RandomState(seed)``.
        """
        check(isinstance(n, int) and n >= 1, f"batch size must be a positive integer, got {n!r}.")
        m = len(self.train_idx)
        if generator is None:
            generator = np.random.RandomState(self.seed)
        if isinstance(generator, np.random.RandomState):
            pick = torch.from_numpy(generator.randint(0, m, size=n).astype(np.int64))
        elif isinstance(generator, np.random.Generator):
            pick = torch.from_numpy(generator.integers(0, m, size=n).astype(np.int64))
        elif isinstance(generator, torch.Generator):
            pick = torch.randint(0, m, (n,), generator=generator)
        else:
            raise SedLensError("generator must be a numpy RandomState/Generator or a torch.Generator, "
                               f"got {type(generator).__name__}.")
        idx = self.train_idx[pick]
        return self.tokens[idx], {op: lab[idx] for op, lab in self.labels.items()}

    @property
    def max_probes(self) -> int:
        """The grid size: :meth:`probes` draws distinct pairs."""
        return len(self.pairs)

    def probes(self, n: int = 1024, seed: int = 0) -> Batch:
        """A fixed set of ``n`` distinct pairs from the whole grid (train and test mixed), chosen by ``seed``."""
        total = len(self.pairs)
        check(isinstance(n, int) and 1 <= n <= total, f"probe count must be an integer in 1..{total} (the grid size), got {n!r}.")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(total, generator=g)[:n]
        return self.tokens[idx], {op: lab[idx] for op, lab in self.labels.items()}

    # --- the Task protocol: losses, metrics, milestones ---------------------------------------------------
    @property
    def n_classes(self) -> int:
        """Classes per op: the residues ``0..p-1``."""
        return self.p

    def losses(self, logits: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Mean cross-entropy of each op's head (``logits[op]``, ``[batch, p]``) on its own labels."""
        return {op: cross_entropy(logits[op], y) for op, y in labels.items()}

    def evaluate(self, model: HookedTransformer, readout: ReadoutLogits) -> dict[str, float]:
        """Loss and accuracy of every op on the full train and test splits (and their means over the ops), from
        one forward pass over the grid; ``readout`` gives the per-op logits at the readout position."""
        device = model_device(model)
        per_op = readout(self.tokens.to(device))
        out: dict[str, float] = {}
        for split, idx in (("train", self.train_idx.to(device)), ("test", self.test_idx.to(device))):
            for op in self.ops:
                lg, y = per_op[op][idx], self.labels[op].to(device)[idx]
                out[f"{split}/loss/{op}"] = torch.nn.functional.cross_entropy(lg, y).item()
                out[f"{split}/acc/{op}"] = (lg.argmax(-1) == y).float().mean().item()
            out[f"{split}/acc"] = float(np.mean([out[f"{split}/acc/{op}"] for op in self.ops]))
            out[f"{split}/loss"] = float(np.mean([out[f"{split}/loss/{op}"] for op in self.ops]))
        return out

    def milestones(self, history: Sequence[Mapping[str, Any]]) -> dict[str, int | None]:
        """None beyond the trainer's grok step (first eval with test accuracy ≥ ``grok_acc``)."""
        return {}

    # --- description -------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"p": self.p, "ops": list(self.ops), "train_frac": self.train_frac, "seed": self.seed,
                "layout": self.layout, "n_pairs": len(self.pairs), "n_train": len(self.train_idx),
                "n_test": len(self.test_idx)}

    def __repr__(self) -> str:
        return (f"ModularArithmetic(p={self.p}, ops={self.ops}, train_frac={self.train_frac}, seed={self.seed}, "
                f"layout={self.layout!r}; {len(self.train_idx)} train / {len(self.test_idx)} test pairs)")
