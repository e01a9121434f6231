"""Which run of an experiment's grid a cell is, typed: :class:`CellId`.

A grid cell is a run directory named after what it runs (:class:`~sed_lens.grid.Cell` takes the name as a plain
string; the grid itself does not interpret it). The experiments name their cells through ``CellId``:

* ``add-s42`` — a single-task coupling run of one op;
* ``multitask-s42`` — the multitask coupling run (one encoder, a head per op);
* ``A-control-s42`` — an intervention run of one condition (its code and its label as a slug).

:attr:`CellId.name` writes the name and :meth:`CellId.parse` is the only reader of one (for names read back from
disk, e.g. the ``runs`` of a coupling output's ``coupling.json``); :func:`parse_cells` is the deserialiser of a
map keyed by names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from sed_lens.errors import SedLensError, check

SINGLE, MULTITASK, INTERVENTION = "single", "multitask", "intervention"
KINDS = (SINGLE, MULTITASK, INTERVENTION)

V = TypeVar("V")


def _plain(part: str | None) -> bool:
    """Whether ``part`` can be one part of a run directory's name."""
    return isinstance(part, str) and part != "" and not any(c in part for c in "/\\")


@dataclass(frozen=True)
class CellId:
    """One run of an experiment's grid: its ``kind`` (``single``, ``multitask`` or ``intervention``), its training
    ``seed`` and, for a single-task run, its ``op``; for an intervention run, its ``condition`` code (``A``…) and
    ``label`` (the condition's label as a slug: ``control``, ``remove-sed``)."""

    kind: str
    seed: int
    op: str | None = None
    condition: str | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        check(self.kind in KINDS, f"unknown kind of grid cell {self.kind!r}; choose from {', '.join(KINDS)}.")
        check(isinstance(self.seed, int) and not isinstance(self.seed, bool),
              f"a grid cell's seed must be an integer, got {self.seed!r}.")
        single, intervention = self.kind == SINGLE, self.kind == INTERVENTION
        check((self.op is not None) == single and (not single or _plain(self.op)),
              f"a single-task cell names its op and only it does, got op {self.op!r} for a {self.kind} cell.")
        check((self.condition is not None) == intervention and (self.label is not None) == intervention
              and (not intervention or (_plain(self.condition) and _plain(self.label))),
              f"an intervention cell names its condition code and label, and only it does; got condition "
              f"{self.condition!r}, label {self.label!r} for a {self.kind} cell.")

    @classmethod
    def single(cls, op: str, seed: int) -> CellId:
        """A single-task coupling run of ``op``."""
        return cls(SINGLE, seed, op=op)

    @classmethod
    def multitask(cls, seed: int) -> CellId:
        """The multitask coupling run."""
        return cls(MULTITASK, seed)

    @classmethod
    def intervention(cls, condition: str, label: str, seed: int) -> CellId:
        """An intervention run of ``condition`` (its code) with the condition's ``label`` as a slug."""
        return cls(INTERVENTION, seed, condition=condition, label=label)

    @property
    def is_multitask(self) -> bool:
        return self.kind == MULTITASK

    @property
    def name(self) -> str:
        """The run directory's name under the grid's root: ``add-s42``, ``multitask-s42``, ``A-control-s42``."""
        what = {SINGLE: self.op, MULTITASK: MULTITASK, INTERVENTION: f"{self.condition}-{self.label}"}[self.kind]
        return f"{what}-s{self.seed}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str) -> CellId:
        """The cell named ``name`` (as :attr:`name` writes it); :class:`SedLensError` if it names no grid cell."""
        form = "OP-sSEED, multitask-sSEED or CONDITION-LABEL-sSEED, e.g. 'add-s42', 'A-control-s42'"
        m = re.fullmatch(r"(.+)-s(-?\d+)", name) if isinstance(name, str) else None
        check(m is not None, f"{name!r} does not name a grid cell ({form}).")
        assert m is not None
        what, seed = m[1], int(m[2])
        try:
            if what == MULTITASK:
                cell = cls.multitask(seed)
            elif (c := re.fullmatch(r"([A-Z])-(.+)", what)) is not None:  # ops are lower-case, condition codes not
                cell = cls.intervention(c[1], c[2], seed)
            else:
                cell = cls.single(what, seed)
        except SedLensError as e:
            raise SedLensError(f"{name!r} does not name a grid cell: {e}") from None
        check(cell.name == name, f"{name!r} is not a grid cell name as sed_lens writes it (that would be {cell.name!r}).")
        return cell


def parse_cells(runs: Mapping[str, V]) -> dict[CellId, V]:
    """A map keyed by cell names (e.g. the ``runs`` of a coupling output's ``coupling.json``) keyed by
    :class:`CellId` instead, in the same order."""
    return {CellId.parse(name): v for name, v in runs.items()}
