"""SED bases along a trajectory: the windows of every scan key, fed from one walk over the stream entries.

A coupling scan needs, at each measured snapshot, the SED basis of every key (stream × window alignment × window
size): windows of W consecutive entries of a stream (see :func:`~sed_lens.analysis.sed.window_bounds`).
:class:`KeyBases` says which windows one key reads; :class:`BasesFeed` computes the bases of many keys in one pass
over the entries, *pushing* each entry into every key's :class:`~sed_lens.analysis.sed.SEDPass` as it arrives. So
the entries can be computed on the fly from the snapshots (a gradient on the fixed batch, a difference of two
states) and dropped at once: a scan needs no stored stream at all, only each key's window and the few bases that are
complete before the scan's loop asks for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from sed_lens.analysis.sed import SEDBasis, SEDPass, window_bounds
from sed_lens.errors import SedLensError, check


@dataclass
class KeyBases:
    """The SED windows of one scan key at the measured snapshots of a run: ``stream`` (the name of the entries it
    reads in a :class:`BasesFeed`), ``n`` (how many entries the run has: a window never reaches past them),
    ``anchors`` (measured snapshot → entry index of its window's anchor), ``window``, ``k``, ``align``; and what names
    its windows in the response cache, ``name`` and ``extra`` (:meth:`ident`)."""

    stream: str
    n: int
    anchors: dict[int, int]
    window: int
    k: int
    align: str
    name: str
    extra: tuple[Any, ...] = ()

    def ident(self, t: int) -> tuple[Any, ...]:
        """The identity of the window at snapshot ``t``: stream name, window bounds, k (and ``extra``)."""
        return (self.name, *window_bounds(self.anchors[t], self.n, self.window, self.align), self.k, *self.extra)

    def sed_pass(self, snapshots: Iterable[int] | None = None) -> tuple[SEDPass, dict[int, int]]:
        """A pass over the stream for the windows at ``snapshots`` (default: every anchored one), and the map from
        an anchor's entry index back to its snapshot."""
        keep = None if snapshots is None else set(snapshots)
        snapshot_of = {a: t for t, a in self.anchors.items() if keep is None or t in keep}
        return SEDPass(self.n, snapshot_of, self.window, self.k, self.align), snapshot_of


class BasesFeed:
    """The bases of several :class:`KeyBases` from one walk over their streams' entries.

    ``entries`` yields, step by step, ``{stream name: next entry}`` for the streams that have a next entry at that
    step (each stream's entries in order; streams advance together, e.g. one snapshot per step). ``keys`` are
    ``(key bases, snapshots)`` pairs (``snapshots`` None: every anchored one). :meth:`at` advances the walk only as
    far as the basis it is asked for needs, so the entries are read once, in order, however many keys share them;
    bases completed ahead of the question (a trailing window ends before a leading one at the same snapshot) wait
    in memory until asked for, and each is handed out once."""

    def __init__(self, entries: Iterator[Mapping[str, Tensor]],
                 keys: Iterable[tuple[KeyBases, Iterable[int] | None]]) -> None:
        self._entries = entries
        self._subscribers: dict[str, list[tuple[int, SEDPass, dict[int, int]]]] = {}
        self._ready: dict[int, dict[int, SEDBasis]] = {}
        self._wanted: dict[int, set[int]] = {}
        for kb, snapshots in keys:
            if id(kb) in self._ready:
                continue
            sed_pass, snapshot_of = kb.sed_pass(snapshots)
            self._subscribers.setdefault(kb.stream, []).append((id(kb), sed_pass, snapshot_of))
            self._ready[id(kb)] = {}
            self._wanted[id(kb)] = set(snapshot_of.values())

    def at(self, kb: KeyBases, t: int) -> SEDBasis:
        """The basis of ``kb`` at snapshot ``t`` (once: it is dropped as it is handed out)."""
        check(id(kb) in self._ready and t in self._wanted[id(kb)],
              f"no SED window of {kb.name!r} at snapshot {t} was asked of this feed.")
        ready = self._ready[id(kb)]
        while t not in ready:
            self._advance()
        self._wanted[id(kb)].discard(t)
        return ready.pop(t)

    def _advance(self) -> None:
        try:
            entries = next(self._entries)
        except StopIteration:
            raise SedLensError("the stream entries ended before every SED window was complete.") from None
        for name, vec in entries.items():
            for kid, sed_pass, snapshot_of in self._subscribers.get(name, ()):
                for a, basis in sed_pass.push(vec):
                    self._ready[kid][snapshot_of[a]] = basis
