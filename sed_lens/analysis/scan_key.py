"""What a coupling scan measured, typed: :class:`ScanKey` names one measured set of SED directions.

A scan (:func:`~sed_lens.analysis.trajectory.scan_coupling`) measures, per op, the SED bases of every stream
(``update``, ``gradient``, and for a multitask model ``task_gradient`` of each op) with each window alignment
(``leading``, ``trailing``), and optionally variants of them: the window ablation (gradient SED at another window
W, k = 1), the paper's finite difference at some ε_rel beside the exact value, and, for a multitask model, the
author's per-op inputs (``per_op``: each op measured on its own probes, its ``task_gradient`` on its own gradient
batch; :attr:`ScanKey.inputs`). In memory a key is a ``ScanKey``; in JSON (``coupling.json``, ``cell.json``, the
reproduction's results) and in ``.pt`` files it is the string ``str(key)``, e.g. ``gradient/leading``,
``task_gradient/add/leading``, ``gradient/trailing/W=5``, ``update/leading/fd_eps=0.005``,
``task_gradient/mul/leading/per_op``. :meth:`ScanKey.parse` is the only reader of that string and :func:`parse_keys`
the deserialiser of a JSON map keyed by it; nothing else takes a key string apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TypeVar

from sed_lens.configs import ALIGNMENTS, SOURCES
from sed_lens.errors import SedLensError, check

RANDOM = "random"
"""The entry of a scan's per-op results that holds the random directions' responses (not a :class:`ScanKey`)."""

V = TypeVar("V")

PER_OP = "per_op"
"""The :attr:`ScanKey.inputs` of the per-op variant of a multitask scan (:class:`~sed_lens.configs.ScanConfig`'s
``per_op_inputs``)."""
INPUTS: tuple[str, ...] = (PER_OP,)
"""The input conventions a scan key can name beside the standard one (None: one shared gradient batch and probe set)."""


def stream_name(source: str, op: str | None = None) -> str:
    """A stream's name as SED capture and the scan's ``metrics.jsonl`` keys spell it: ``update``, ``gradient``,
    ``task_gradient/OP``."""
    return source if op is None else f"{source}/{op}"


@dataclass(frozen=True)
class ScanKey:
    """One measured set of SED directions of a scan: a stream's SED with one window alignment, or a variant of it.

    ``source``: ``update``, ``gradient`` or ``task_gradient`` (with the ``op`` whose loss it is the gradient of);
    ``align``: ``leading`` or ``trailing``. Variants (at most one): ``window`` — the window ablation, gradient SED
    at window W with k = 1; ``fd_eps`` — the same directions measured with the central finite difference at
    ε_rel = ``fd_eps`` (kept as its key writes it, 6 significant digits); ``inputs`` — ``"per_op"``, the multitask
    scan with the author's per-op conventions: the op's own probe set (and, for ``task_gradient``, SED of the op's
    gradient on its own gradient batch; ``update`` and ``gradient`` keep the standard directions), see
    :mod:`sed_lens.analysis.trajectory`. A key without a variant is a main measurement (:attr:`is_main`).
    """

    source: str
    align: str
    op: str | None = None
    window: int | None = None
    fd_eps: float | None = None
    inputs: str | None = None

    def __post_init__(self) -> None:
        check(self.source in SOURCES, f"unknown scan stream {self.source!r}; choose from {', '.join(SOURCES)}.")
        check(self.align in ALIGNMENTS, f"unknown window alignment {self.align!r}; choose from {', '.join(ALIGNMENTS)}.")
        if self.source == "task_gradient":
            check(isinstance(self.op, str) and self.op != "" and "/" not in self.op,
                  f"a task_gradient scan key needs the op it belongs to, got {self.op!r}.")
        else:
            check(self.op is None, f"only task_gradient scan keys name an op, got op {self.op!r} for {self.source}.")
        check(sum(v is not None for v in (self.window, self.fd_eps, self.inputs)) <= 1,
              "a scan key has at most one variant: a window, an fd_eps or its inputs.")
        check(self.inputs is None or self.inputs in INPUTS,
              f"unknown scan key inputs {self.inputs!r}; choose from {', '.join(INPUTS)} (or None: the standard ones).")
        if self.window is not None:
            check(isinstance(self.window, int) and not isinstance(self.window, bool) and self.window >= 1,
                  f"a scan key's window must be a positive integer, got {self.window!r}.")
        if self.fd_eps is not None:
            check(isinstance(self.fd_eps, (int, float)) and not isinstance(self.fd_eps, bool)
                  and math.isfinite(self.fd_eps) and self.fd_eps > 0,
                  f"a scan key's fd_eps must be a positive number, got {self.fd_eps!r}.")
            object.__setattr__(self, "fd_eps", float(f"{self.fd_eps:g}"))  # as written: parse(str(key)) == key

    @property
    def stream(self) -> str:
        """The measured stream's name: ``update``, ``gradient`` or ``task_gradient/OP``."""
        return stream_name(self.source, self.op)

    @property
    def is_main(self) -> bool:
        """Whether this is a main measurement (no window, finite-difference or inputs variant)."""
        return self.window is None and self.fd_eps is None and self.inputs is None

    @property
    def main(self) -> ScanKey:
        """The main measurement this key is a variant of (the key itself when it has no variant)."""
        return self if self.is_main else replace(self, window=None, fd_eps=None, inputs=None)

    def with_fd_eps(self, eps: float) -> ScanKey:
        """This main measurement's directions measured with the central finite difference at ε_rel = ``eps``."""
        check(self.is_main, f"a variant key has no finite-difference variant: {self}.")
        return replace(self, fd_eps=eps)

    def with_inputs(self, inputs: str = PER_OP) -> ScanKey:
        """This main measurement under another input convention (``"per_op"``: the author's per-op inputs)."""
        check(self.is_main, f"a variant key has no inputs variant: {self}.")
        return replace(self, inputs=inputs)

    @property
    def variant(self) -> str:
        """The variant as the key writes it: ``W=5``, ``fd_eps=0.005``, ``per_op``, or ``""`` for a main measurement."""
        if self.window is not None:
            return f"W={self.window}"
        if self.inputs is not None:
            return self.inputs
        return f"fd_eps={self.fd_eps:g}" if self.fd_eps is not None else ""

    def to_str(self) -> str:
        """The key as JSON and ``.pt`` files write it (``task_gradient/add/leading/W=5``); :meth:`parse` reads it."""
        return "/".join(p for p in (self.stream, self.align, self.variant) if p)

    def __str__(self) -> str:
        return self.to_str()

    @classmethod
    def parse(cls, text: str) -> ScanKey:
        """The key written as ``text`` by :meth:`to_str`; :class:`SedLensError` if ``text`` is no scan key."""
        form = ("SOURCE[/OP]/ALIGN[/W=N or /fd_eps=E or /per_op], e.g. 'gradient/leading' or "
                "'task_gradient/add/leading/W=5'")
        check(isinstance(text, str), f"a scan key is a string ({form}), got {text!r}.")
        parts = text.split("/")
        n = 2 if parts[0] == "task_gradient" else 1
        check(len(parts) in (n + 1, n + 2), f"{text!r} is not a scan key ({form}).")
        op = parts[1] if n == 2 else None
        window = fd_eps = None
        inputs = None
        if len(parts) == n + 2 and parts[-1] in INPUTS:
            inputs = parts[-1]
        elif len(parts) == n + 2:
            name, sep, value = parts[-1].partition("=")
            check(sep == "=" and name in ("W", "fd_eps"), f"{text!r} is not a scan key: unknown variant {parts[-1]!r} ({form}).")
            try:
                if name == "W":
                    window = int(value)
                else:
                    fd_eps = float(value)
            except ValueError:
                raise SedLensError(f"{text!r} is not a scan key: bad value in {parts[-1]!r} ({form}).") from None
        try:
            key = cls(parts[0], parts[n], op, window, fd_eps, inputs)
        except SedLensError as e:
            raise SedLensError(f"{text!r} is not a scan key: {e}") from None
        check(key.to_str() == text, f"{text!r} is not a scan key as sed_lens writes it (that would be {key.to_str()!r}).")
        return key


def parse_keys(results: Mapping[str, V]) -> dict[ScanKey, V]:
    """A JSON map keyed by scan-key strings (a scan's per-op results or summary, a compact scan's series) keyed by
    :class:`ScanKey` instead, in the same order; the random directions' entry (:data:`RANDOM`) is left out."""
    return {ScanKey.parse(k): v for k, v in results.items() if k != RANDOM}
