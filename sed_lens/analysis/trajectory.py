"""Coupling along a training trajectory: SED windows around chosen snapshots, R_k at each of them.

Given the model states of a run at every snapshot (every 25 steps in the paper), :func:`scan_coupling`

1. computes the stream vectors at every snapshot — the attention update between consecutive snapshots, the
   gradient on a fixed batch, and per-op gradients for a multitask model (:meth:`TrajectoryScan.snapshot_entries`;
   stored, or computed as the windows reach them: ``TrajectoryScan(streams=...)``);
2. picks ``n_snapshots`` evenly spaced snapshots (``linspace(0, N-1, n)`` as the paper's code);
3. at each, builds the SED bases of every stream for each window alignment — *leading* (the W entries starting
   at the snapshot, clamped at the end: the paper's code) and *trailing* (the W entries known at the snapshot:
   causal) — and measures the centroid response of all bases and of fresh random directions in one pass;
4. reports R_j = A(v_j) / median A(random), R̄ = mean_j R_j per snapshot, and the peak and final R̄ per stream.

Stream entries and snapshots: a gradient entry i belongs to snapshot i; the update entry j is θ_{j+1} − θ_j
(the paper's ``np.diff``), so the trailing update window at snapshot t ends with entry t−1 and there is none at
t = 0. Optional ablations: other window sizes (k = 1, peak R_1) and finite differences at other ε.

Standard inputs: one fixed gradient batch (``grad_batch_size`` pairs of the task, :func:`gradient_batch`) and one
probe set (``task.probes(n_probes)``), shared by all ops of a multitask model. ``ScanConfig(per_op_inputs=True)``
on a multitask modular-arithmetic task also measures, on the same snapshots and random directions and in addition
to the standard keys, the author's per-op conventions (keys ``…/per_op``, :meth:`ScanKey.with_inputs`; the first
alignment only, every analysis seed): for each op, the single-op task of that op with the task's p, split seed and
layout (:meth:`~sed_lens.tasks.ModularArithmetic.single_op`: pairs from 0..p-1, from 1..p-1 for ``mul`` only) gives

* its own gradient batch — ``grad_batch_size`` pairs drawn by ``RandomState(op_seed(grad_batch_seed + a, op))``
  from its ``grad_batch_split`` — on which the ``task_gradient/OP`` stream is recomputed (a backward pass of that
  op's loss alone at every snapshot; :meth:`TrajectoryScan.per_op_streams`), and
* its own probe set — ``task.probes(n_probes, op_seed(probe_seed + a, op))`` of the single-op task — on which
  ``update``, ``gradient`` (the standard directions: the aggregated gradient stays on the shared batch) and that
  ``task_gradient/OP`` are measured against the same random directions (``a``: the analysis seed;
  :func:`op_seed`).
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm  # plain tqdm: tqdm.auto warns (TqdmWarning) in Jupyter without ipywidgets
from transformer_lens import HookedTransformer

from sed_lens.analysis.coupling import centroid_response, perturbation_scale, ratios
from sed_lens.analysis.scan_key import PER_OP, RANDOM, ScanKey, parse_keys
from sed_lens.analysis.sed import SEDBasis
from sed_lens.analysis.stream_file import StreamFile
from sed_lens.analysis.streams import capture_offline, gradient_batch, task_gradients
from sed_lens.analysis.trajectory_bases import BasesFeed, KeyBases
from sed_lens.configs import SOURCES, ScanConfig
from sed_lens.errors import SedLensError, check
from sed_lens.models import model_spec
from sed_lens.subspace import ParamSubspace
from sed_lens.task import Batch, Task
from sed_lens.tasks import ModularArithmetic

Stream = list[Tensor] | StreamFile
"""A stream's entries over a trajectory, stored: in memory, or on disk (``TrajectoryScan(streams=DIRECTORY)``)."""

ARTIFACT_FORMAT = "sed_lens.coupling_snapshot/1"
RESPONSES_FORMAT = "sed_lens.coupling_responses/1"
BASES_FORMAT = "sed_lens.coupling_bases/1"


def probe_count(task: Task, n: int) -> int:
    """``n`` probes, or all a finite task has if fewer (:attr:`~sed_lens.task.Task.max_probes`)."""
    return n if task.max_probes is None else min(n, task.max_probes)


def stream_key(stream: str, align: str, ops: Sequence[str]) -> ScanKey:
    """The :class:`ScanKey` of a captured stream (``update``, ``gradient`` or ``task_gradient/OP`` for one of
    ``ops``) with window alignment ``align``."""
    keys = {k.stream: k for k in (ScanKey("update", align), ScanKey("gradient", align),
                                  *(ScanKey("task_gradient", align, op) for op in ops))}
    check(stream in keys, f"unknown stream {stream!r}; a scan measures {', '.join(keys)}.")
    return keys[stream]


def snapshot_indices(n: int, count: int) -> list[int]:
    """``count`` evenly spaced snapshot indices of ``n`` (``np.linspace(0, n-1, count, dtype=int)``, deduplicated)."""
    return sorted(set(np.linspace(0, n - 1, min(count, n), dtype=int).tolist()))


def random_seed_at(base: int, index: int) -> int:
    """The seed of the random directions at snapshot ``index`` (a fresh draw at every snapshot)."""
    return (base * 1_000_003 + index) % (2**63)


def _as_tuple(x: Any) -> Any:
    """JSON lists back to the tuples a cache key is made of (nested)."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list) else x


def tensor_digest(t: Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def op_seed(base: int, op: str) -> int:
    """The seed of one op's own draw in the per-op variant: ``base`` (the gradient batch's or the probes' seed of the
    config plus the analysis seed) combined with the CRC-32 of the op's name, so each op draws independently of the
    others and of their order: ``(base · 1_000_003 + crc32(op)) mod 2³²``."""
    return (base * 1_000_003 + zlib.crc32(op.encode())) % 2**32


@dataclass(frozen=True)
class OpInputs:
    """The inputs of one op in the per-op variant: its own gradient batch and probe set (``(tokens, {op: labels})``),
    and the probe set's identity (a digest of its tokens and labels) that names it in the response cache."""

    batch: Batch
    probes: Batch
    probe_id: str


def per_op_inputs(task: Task, cfg: ScanConfig, analysis_seed: int = 0) -> dict[str, OpInputs]:
    """The author's per-op inputs of a multitask modular-arithmetic task (see the module docstring), by op: the
    single-op task of each op (same p, split seed and layout) draws its gradient batch and its probes."""
    if not isinstance(task, ModularArithmetic):
        raise SedLensError(f"per-op inputs are defined for modular-arithmetic tasks (a single-op task per op), not "
                           f"{type(task).__name__}.")
    out: dict[str, OpInputs] = {}
    for op in task.ops:
        single = task.single_op(op)
        batch = gradient_batch(single, cfg.grad_batch_size, op_seed(cfg.grad_batch_seed + analysis_seed, op),
                               cfg.grad_batch_split)
        tokens, labels = single.probes(probe_count(single, cfg.n_probes), op_seed(cfg.probe_seed + analysis_seed, op))
        digest = hashlib.sha256(f"{tensor_digest(tokens)}/{op}/{tensor_digest(labels[op])}".encode()).hexdigest()
        out[op] = OpInputs(batch, (tokens, labels), digest[:16])
    return out


def stream_entry_index(stream: str, snapshot: int, align: str) -> int | None:
    """Index into a stream's entries of the window anchor at ``snapshot`` (None: no such window)."""
    if stream == "update" and align == "trailing":
        return snapshot - 1 if snapshot >= 1 else None
    return snapshot


def scan_coupling(model: HookedTransformer, task: Task, snapshots: Iterable[tuple[int, dict[str, Tensor]]],
                  cfg: ScanConfig | None = None, subspace: ParamSubspace | None = None,
                  artifacts: str | Path | None = None, progress: bool = True,
                  bases_out: dict[str, dict[int, Tensor]] | None = None, artifacts_at: str = "measured") -> dict[str, Any]:
    """Measure SED–LCH coupling along a run (see the module docstring); returns a JSON-able dict, whose per-op
    results and summaries are keyed by what was measured as JSON writes it, ``str(ScanKey)`` (read them typed with
    :func:`~sed_lens.analysis.scan_key.parse_keys`).

    ``snapshots``: ``(step, state_dict)`` pairs in training order (e.g. a :class:`~sed_lens.hooks.snapshots.SnapshotStore`).
    ``artifacts``: a directory for one ``snapshot_XXXXXX.pt`` per measured snapshot (format in docs/coupling.md);
    ``artifacts_at="peaks"`` keeps only those the reported values come from (see :meth:`TrajectoryScan.run`).
    ``bases_out``: a dict to fill with the measured SED directions, ``{key: {step: [k, P] float32}}`` (see
    :func:`save_bases`).
    """
    scan = TrajectoryScan(model, task, snapshots, cfg, subspace, progress)
    return scan.run(len(scan.snaps), snapshot_indices(len(scan.snaps), scan.cfg.n_snapshots), analysis_seed=0,
                    artifacts=artifacts, bases_out=bases_out, artifacts_at=artifacts_at)


def extended_indices(measured: Sequence[int], n_total: int) -> list[int]:
    """``measured`` (indices evenly spaced over a prefix of a run) continued at the same mean spacing to the last of
    ``n_total`` snapshots: the snapshots a longer run of the same trajectory adds."""
    if len(measured) < 2 or measured[-1] >= n_total - 1:
        return sorted(set(measured))
    gap = (measured[-1] - measured[0]) / (len(measured) - 1)
    extra = [int(round(measured[-1] + gap * i)) for i in range(1, int((n_total - 1 - measured[-1]) / gap) + 1)]
    return sorted(set(measured) | {i for i in extra if i < n_total} | {n_total - 1})


class Snapshots:
    """The ``(step, state)`` pairs of a trajectory, indexable. A store that can read one state at a time (a
    :class:`~sed_lens.hooks.snapshots.SnapshotStore`: ``steps`` and ``state(i)``) is read lazily — a store on disk
    is never held in memory whole (≈1.2 MB per snapshot of the paper's model); any other iterable of pairs is
    kept as a list."""

    def __init__(self, source: Iterable[tuple[int, dict[str, Tensor]]]) -> None:
        state = getattr(source, "state", None)
        if callable(state) and hasattr(source, "steps"):
            self.steps: list[int] = [int(s) for s in getattr(source, "steps")]  # noqa: B009 - duck-typed store
            self._get: Any = state
        else:
            pairs = list(source)
            self.steps = [int(s) for s, _ in pairs]
            self._get = [st for _, st in pairs].__getitem__

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> tuple[int, dict[str, Tensor]]:
        return self.steps[i], self._get(range(len(self.steps))[i])

    def __iter__(self) -> Iterator[tuple[int, dict[str, Tensor]]]:
        for i in range(len(self.steps)):
            yield self[i]


class TrajectoryScan:
    """The coupling of one trained trajectory, measured for several run lengths and analysis seeds.

    Stream vectors are computed once per gradient batch; centroid responses are cached by (snapshot, analysis
    seed, op, method, ε, directions), where SED directions are named by their stream and window bounds — and, for
    the per-op variant (``cfg.per_op_inputs``, see the module docstring), by the identity of the op's own probe
    set as well. So a scan of a longer run of the same trajectory (``n_snapshots`` larger) re-measures only the
    snapshots it adds and those whose leading window the shorter run clamped; every other response is reused.

    Analysis seed ``a`` shifts the seeds of the gradient batch, the probes and the random directions by ``a``
    (``a = 0`` is the configuration as given).

    ``responses``: a file that keeps the response cache across processes. It is read when the scan starts (if it
    exists and was written for this trajectory and configuration; otherwise it is ignored) and rewritten after
    every measured snapshot that measured something new, so a scan killed part-way continues where it stopped
    and gives the same numbers as an uninterrupted one.

    ``streams``: where the stream vectors (the entries SED windows are built from, :meth:`stream_names`) live —
    the same numbers in every mode:

    * ``"memory"`` (default): computed once per analysis seed and kept in memory (the update stream once for every
      seed), so a scan of several run lengths computes them once; ≈0.5 MB per entry of the paper's model, so a long
      multitask scan holds gigabytes;
    * a directory (``str`` or ``Path``): the same, kept in files there
      (:class:`~sed_lens.analysis.stream_file.StreamFile`: one per stream and analysis seed, deleted by
      :meth:`drop_streams`; what a caller leaves there is its to remove) — little memory, the disk instead;
    * ``"live"``: never stored. Each :meth:`run` walks the snapshots once, computing each entry as the windows reach
      it and pushing it into every key's window (:class:`~sed_lens.analysis.trajectory_bases.BasesFeed`): neither
      memory nor disk beyond the windows themselves, at the price of computing the entries again for every run
      (``python -m benchmarks.scan_memory`` measures all three).
    """

    def __init__(self, model: HookedTransformer, task: Task, snapshots: Iterable[tuple[int, dict[str, Tensor]]],
                 cfg: ScanConfig | None = None, subspace: ParamSubspace | None = None, progress: bool = True,
                 responses: str | Path | None = None, streams: str | Path = "memory") -> None:
        self.cfg = cfg or ScanConfig()
        self.cfg.validate()
        self.model, self.task, self.progress = model, task, progress
        self.subspace = subspace or ParamSubspace.attention(model)
        self.snaps = Snapshots(snapshots)
        check(len(self.snaps) >= 2, f"a coupling scan needs at least 2 snapshots, got {len(self.snaps)}.")
        self.steps = list(self.snaps.steps)
        self._fingerprint: str | None = None
        self.sources = tuple(s for s in self.cfg.sources if s != "task_gradient" or task.multitask)
        self.per_op = self.cfg.per_op_inputs and task.multitask  # also measure the per-op variant
        check(not self.per_op or isinstance(task, ModularArithmetic),
              "per-op inputs (per_op_inputs) are defined for modular-arithmetic tasks only.")
        check(isinstance(streams, (str, Path)) and str(streams) != "",
              f"streams must be 'memory', 'live' or a directory, got {streams!r}.")
        self.live = streams == "live"
        self.streams_dir = None if isinstance(streams, str) and streams in ("memory", "live") else Path(streams)
        self._streams: dict[int, dict[str, Stream]] = {}
        self._update: Stream | None = None  # the update stream: the same for every analysis seed
        self._op_inputs: dict[int, dict[str, OpInputs]] = {}
        self._per_op_streams: dict[int, dict[str, Stream]] = {}
        self._cache: dict[tuple[Any, ...], Tensor] = {}
        self._loaded: int | None = None
        self.timings: dict[str, float] = {}  # seconds: stream vectors, SED bases, responses per method
        self.measured_directions: dict[str, int] = {}  # directions measured per method (cache misses)
        self.responses_path = Path(responses) if responses is not None else None
        self._unsaved = False
        self._started, self.elapsed_before = time.perf_counter(), 0.0
        self.restored = self._restore_responses()  # responses read back from an earlier, interrupted scan

    # --- the response cache on disk ----------------------------------------------------------------------
    def fingerprint(self) -> str:
        """What the cached responses depend on: the scan configuration, the snapshot steps, the task's ops and
        the weights of the last snapshot (so a cache of another trajectory is never reused)."""
        if self._fingerprint is None:
            last = self.snaps[len(self.snaps) - 1][1]
            weights = torch.cat([last[n].detach().flatten().to(torch.float64).cpu() for n in sorted(last)])
            text = repr((self.cfg.to_dict(), self.steps, tuple(self.task.ops), tensor_digest(weights)))
            self._fingerprint = hashlib.sha256(text.encode()).hexdigest()
        return self._fingerprint

    def _restore_responses(self) -> int:
        from sed_lens.serialization import load

        path = self.responses_path
        if path is None or not path.is_file():
            return 0
        try:
            data = load(path)
        except Exception:  # noqa: BLE001 - a torn or foreign file is a cache miss, never an error
            return 0
        if not isinstance(data, dict) or data.get("format") != RESPONSES_FORMAT or data.get("fingerprint") != self.fingerprint():
            return 0
        for key, value in zip(data["keys"], data["values"], strict=True):
            self._cache[_as_tuple(json.loads(key))] = value
        # the work of the earlier attempts counts too: what the scan cost is the sum over its attempts
        for what, secs in dict(data.get("timings", {})).items():
            self.timings[what] = self.timings.get(what, 0.0) + float(secs)
        for method, n in dict(data.get("measured_directions", {})).items():
            self.measured_directions[method] = self.measured_directions.get(method, 0) + int(n)
        self.elapsed_before = float(data.get("elapsed", 0.0))
        return len(data["keys"])

    @property
    def elapsed(self) -> float:
        """Seconds this scan has run, over every attempt (an interrupted scan's included)."""
        return self.elapsed_before + time.perf_counter() - self._started

    def save_responses(self) -> None:
        """Write the response cache to ``responses`` (atomically) if it holds anything not yet written."""
        if self.responses_path is None or not self._unsaved:
            return
        import io

        from sed_lens.serialization import plain
        from sed_lens.tracking import atomic_write_bytes

        buf = io.BytesIO()
        keys = list(self._cache)
        torch.save(plain({"format": RESPONSES_FORMAT, "fingerprint": self.fingerprint(),
              "keys": [json.dumps(list(k)) for k in keys], "values": [self._cache[k] for k in keys],
              "timings": dict(self.timings), "measured_directions": dict(self.measured_directions),
              "elapsed": self.elapsed}), buf)
        atomic_write_bytes(self.responses_path, buf.getvalue())
        self._unsaved = False

    # --- inputs --------------------------------------------------------------------------------------------
    def stream_names(self, seed_streams: bool = True) -> tuple[str, ...]:
        """The streams a scan of this configuration reads: ``update``; ``gradient`` (also when only the window or ε
        ablations need it); ``task_gradient/OP`` of a multitask model; ``per_op/OP`` (the per-op variant's
        ``task_gradient`` stream of each op on its own batch). ``seed_streams=False``: without the per-op ones."""
        names: list[str] = []
        if "update" in self.sources:
            names.append("update")
        if "gradient" in self.sources or self.cfg.ablation_windows or self.cfg.ablation_eps:
            names.append("gradient")
        if "task_gradient" in self.sources:
            names += [f"task_gradient/{op}" for op in self.task.ops]
        if seed_streams and self.per_op and "task_gradient" in self.sources:
            names += [f"per_op/{op}" for op in self.task.ops]
        return tuple(names)

    def snapshot_entries(self, seed: int, names: Iterable[str]) -> Iterator[dict[str, Tensor]]:
        """The entries of the streams ``names`` (:meth:`stream_names`) for analysis seed ``seed``, computed snapshot by
        snapshot (:func:`~sed_lens.analysis.streams.capture_offline`, plus the per-op variant): at snapshot i
        ``{name: entry}`` — the gradient-type entries at snapshot i (on the seed's fixed batch; ``per_op/OP`` on the
        op's own batch) and the update entry i − 1, θ_i − θ_{i−1} (none at i = 0). The model is left holding snapshot
        i's weights. The one computation behind every stream mode."""
        cfg, names = self.cfg, set(names)
        sources = tuple(s for s in SOURCES if s in names or any(n.startswith(f"{s}/") for n in names))
        batch = gradient_batch(self.task, cfg.grad_batch_size, cfg.grad_batch_seed + seed, cfg.grad_batch_split)
        per_op = [op for op in self.task.ops if f"per_op/{op}" in names]
        inputs = self.op_inputs(seed) if per_op else {}
        for i, (_, vecs) in enumerate(capture_offline(self.model, self.task, self.subspace, self.snaps, batch, sources)):
            self._loaded = i  # capture_offline loaded snapshot i
            out = {n: v for n, v in vecs.items() if n in names}
            for op in per_op:
                tokens, labels = inputs[op].batch
                out[f"per_op/{op}"] = task_gradients(self.model, self.subspace, tokens, {op: labels[op]})[op]
            yield out

    def _timed_entries(self, entries: Iterator[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
        """``entries`` with the time spent computing them counted as ``streams``."""
        while True:
            t0 = time.perf_counter()
            out = next(entries, None)
            self._time("streams", t0)
            if out is None:
                return
            yield out

    def _new_stream(self, seed: int, name: str) -> Stream:
        """An empty stream: a list in memory, or a :class:`StreamFile` in the streams directory."""
        if self.streams_dir is None:
            return []
        return StreamFile(self.streams_dir / f"seed{seed}-{name.replace('/', '-')}.bin")

    def _stored(self, seed: int, names: Sequence[str]) -> dict[str, Stream]:
        """The streams ``names`` over the whole trajectory, stored (in memory or in files)."""
        out: dict[str, Stream] = {n: self._new_stream(seed, n) for n in names}
        if names:
            for vecs in tqdm(self._timed_entries(self.snapshot_entries(seed, names)), total=len(self.snaps),
                             desc="stream vectors", disable=not self.progress, leave=False):
                for n, v in vecs.items():
                    out[n].append(v)
        return out

    def streams(self, seed: int) -> dict[str, Stream]:
        """The stored stream entries over the whole trajectory for analysis seed ``seed`` (the update stream is
        computed once and shared by every seed; :meth:`per_op_streams` has the per-op ones)."""
        if seed not in self._streams:
            names = self.stream_names(seed_streams=False)
            out = self._stored(seed, [n for n in names if n != "update" or self._update is None])
            if "update" in names:
                self._update = out["update"] if self._update is None else self._update
                out["update"] = self._update
            self._streams[seed] = out
        return self._streams[seed]

    def op_inputs(self, seed: int) -> dict[str, OpInputs]:
        """The per-op variant's gradient batch and probes of every op for analysis seed ``seed`` (:func:`per_op_inputs`)."""
        if seed not in self._op_inputs:
            self._op_inputs[seed] = per_op_inputs(self.task, self.cfg, seed)
        return self._op_inputs[seed]

    def per_op_streams(self, seed: int) -> dict[str, Stream]:
        """The per-op variant's ``task_gradient`` stream of every op for analysis seed ``seed``, ``{op: entries}``:
        at each snapshot the gradient (in the subspace) of that op's loss alone on that op's own gradient batch."""
        if seed not in self._per_op_streams:
            stored = self._stored(seed, [f"per_op/{op}" for op in self.task.ops])
            self._per_op_streams[seed] = {n.split("/", 1)[1]: v for n, v in stored.items()}
        return self._per_op_streams[seed]

    def _entries(self, seed: int, names: set[str]) -> Iterator[dict[str, Tensor]]:
        """The entries of ``names`` in order, for a :class:`BasesFeed`: computed as they are read (live streams),
        or read from the stored streams."""
        if self.live:
            return self._timed_entries(self.snapshot_entries(seed, names))
        stored = {n: v for n, v in self.streams(seed).items() if n in names}
        if any(n.startswith("per_op/") for n in names):
            stored |= {f"per_op/{op}": v for op, v in self.per_op_streams(seed).items() if f"per_op/{op}" in names}
        n_max = max((len(v) for v in stored.values()), default=0)
        return ({n: v[j] for n, v in stored.items() if j < len(v)} for j in range(n_max))

    def _time(self, what: str, t0: float) -> None:
        self.timings[what] = self.timings.get(what, 0.0) + time.perf_counter() - t0

    def _clock(self) -> tuple[float, float]:
        """Now, and the seconds counted as ``streams`` so far (for :meth:`_time_bases`)."""
        return time.perf_counter(), self.timings.get("streams", 0.0)

    def _time_bases(self, since: tuple[float, float]) -> None:
        """Count the time since ``since`` (:meth:`_clock`) as ``bases``, less what went to stream entries meanwhile."""
        t0, streams0 = since
        spent = time.perf_counter() - t0 - (self.timings.get("streams", 0.0) - streams0)
        self.timings["bases"] = self.timings.get("bases", 0.0) + spent

    def drop_streams(self, seed: int) -> None:
        """Free the stored stream vectors of analysis seed ``seed`` (kept: the update stream, shared by every seed)."""
        for streams in (self._streams.pop(seed, {}), self._per_op_streams.pop(seed, {})):
            for stream in streams.values():
                if isinstance(stream, StreamFile) and stream is not self._update:
                    stream.delete()

    def _load(self, t: int) -> None:
        if self._loaded != t:
            self.model.load_state_dict(self.snaps[t][1], strict=False)
            self._loaded = t

    def _respond(self, t: int, seed: int, op: str, method: str, eps_rel: float,
                 requests: Sequence[tuple[tuple[Any, ...], Tensor]], probes: tuple[Tensor, Any],
                 probe_id: str | None = None) -> list[Tensor]:
        """A for every request ``(id, [n, P] directions)``, measuring only those not in the cache (one call).
        ``probe_id``: the identity of ``probes`` when they are not the scan's standard probe set of this analysis
        seed (the per-op variant's), so that responses on other probes never meet in the cache."""
        key: tuple[Any, ...] = (t, seed, op, method, eps_rel if method == "fd" else None)
        if probe_id is not None:
            key += (("probes", probe_id),)
        todo = [(rid, d) for rid, d in requests if (*key, rid) not in self._cache]
        if todo:
            t0 = time.perf_counter()
            self._load(t)
            dirs = torch.cat([d for _, d in todo])
            cfg = self.cfg
            A = centroid_response(self.model, self.subspace, dirs, probes, method=method, eps_rel=eps_rel,
                                  site=cfg.site, readout=cfg.readout, task=op, chunk_size=cfg.chunk_size)
            i = 0
            for rid, d in todo:
                self._cache[(*key, rid)] = A[i:i + d.shape[0]]
                i += d.shape[0]
            self._unsaved = True
            self._time(f"responses/{method}", t0)
            self.measured_directions[method] = self.measured_directions.get(method, 0) + dirs.shape[0]
        return [self._cache[(*key, rid)] for rid, _ in requests]

    # --- one scan ----------------------------------------------------------------------------------------
    def run(self, n_snapshots: int, measured: Sequence[int], analysis_seed: int = 0, headline_only: bool | None = None,
            fd_compare: bool | None = None, artifacts: str | Path | None = None,
            bases_out: dict[str, dict[int, Tensor]] | None = None, bases_at: str = "measured",
            phases: dict[str, tuple[int | None, int | None]] | None = None,
            artifacts_at: str = "measured") -> dict[str, Any]:
        """The scan of the run's first ``n_snapshots`` snapshots at snapshot indices ``measured``, in the format of
        :func:`scan_coupling`. ``headline_only``: only the first alignment of each source (no ablations; default:
        for analysis seeds other than 0). ``fd_compare``: also the paper's finite difference (ε_rel of the config)
        on every key of the first alignment, as that key's ``fd_eps`` variant (default: the config's ``fd_compare``
        for analysis seed 0). ``phases``: ``{op: (start, end)}`` (:func:`phase_bounds`) adds phase medians.
        ``bases_out`` is filled with SED directions, ``{str(ScanKey): {step: [k, P] float32}}`` (of the per-op
        variant only the ``task_gradient/OP/ALIGN/per_op`` bases: its other keys have the standard directions): at
        every measured snapshot (``bases_at="measured"``), or (``"headline"``) only at the peak and final snapshot
        of each key without an ablation window, per op — what :func:`save_bases` keeps, without holding the rest.
        With ``cfg.per_op_inputs`` on a multitask task, every row also holds the per-op variant's keys of the first
        alignment (whatever ``headline_only``), each with the median random response on its own probes.
        ``artifacts``: a directory for one artifact per measured snapshot (:func:`save_artifact`); with
        ``artifacts_at="peaks"`` only those of the snapshots the reported values come from (:func:`headline_steps`)
        stay: after each snapshot the scan deletes every artifact that is no longer one of a running peak or the
        latest, so at most a few are ever on disk (a snapshot that is not the peak so far can never become it)."""
        cfg, task, subspace = self.cfg, self.task, self.subspace
        check(2 <= n_snapshots <= len(self.snaps), f"n_snapshots must lie in 2..{len(self.snaps)}, got {n_snapshots}.")
        measured = sorted(set(int(t) for t in measured))
        headline_only = analysis_seed > 0 if headline_only is None else headline_only
        fd_compare = cfg.fd_compare and analysis_seed == 0 if fd_compare is None else fd_compare
        check(all(0 <= t < n_snapshots for t in measured), "measured snapshots must lie inside the scanned run.")
        check(bases_at in ("measured", "headline"), f"bases_at must be 'measured' or 'headline', got {bases_at!r}.")
        check(artifacts_at in ("measured", "peaks"), f"artifacts_at must be 'measured' or 'peaks', got {artifacts_at!r}.")
        since = self._clock()
        aligns = cfg.aligns[:1] if headline_only else cfg.aligns
        main_align = "leading" if "leading" in cfg.aligns else cfg.aligns[0]
        # SED bases per key at the measured snapshots, from the entries of the first n_snapshots snapshots: one
        # BasesFeed walks the entries once for every key, as the loop below reaches each snapshot, so only the
        # current snapshot's bases (and those complete ahead of it) are held — all of them at once were ~0.5 GB for a
        # single-task run of the paper's model — and live streams are never stored at all
        bases: dict[ScanKey, KeyBases] = {}
        for name in self.stream_names(seed_streams=False):
            if name == "gradient" and "gradient" not in self.sources:
                continue
            n_entries = n_snapshots - 1 if name == "update" else n_snapshots
            for align in aligns:
                anchors = {t: entry for t in measured if (entry := stream_entry_index(name, t, align)) is not None}
                bases[stream_key(name, align, task.ops)] = KeyBases(name, n_entries, anchors, cfg.window, cfg.k,
                                                                    align, name)
        if not headline_only:
            for w in cfg.ablation_windows:
                for align in cfg.aligns:
                    bases[ScanKey("gradient", align, window=w)] = KeyBases(
                        "gradient", n_snapshots, {t: t for t in measured}, w, 1, align, "gradient")
        # the per-op variant: the first alignment's update and gradient bases as they are, task_gradient SED of each
        # op's gradient on its own batch; measured on each op's own probes
        variant: dict[ScanKey, KeyBases] = {}
        op_inputs = self.op_inputs(analysis_seed) if self.per_op else {}
        if self.per_op:
            first = cfg.aligns[0]
            variant = {k.with_inputs(PER_OP): kb for k, kb in bases.items()
                       if k.align == first and k.is_main and k.source != "task_gradient"}
            if "task_gradient" in self.sources:
                for op in task.ops:
                    variant[ScanKey("task_gradient", first, op, inputs=PER_OP)] = KeyBases(
                        f"per_op/{op}", n_snapshots, {t: t for t in measured}, cfg.window, cfg.k, first,
                        f"task_gradient/{op}", (PER_OP,))
        every = (*bases.values(), *variant.values())
        feed = BasesFeed(self._entries(analysis_seed, {kb.stream for kb in every}), [(kb, None) for kb in every])
        self._time_bases(since)

        def kept(k: ScanKey) -> bool:  # the keys whose bases go to bases_out (sed_bases.pt)
            return k.inputs is None or k.source == "task_gradient"

        probes = task.probes(probe_count(task, cfg.n_probes), cfg.probe_seed + analysis_seed)
        art_dir = Path(artifacts) if artifacts is not None else None
        fd_eps = sorted(set((cfg.ablation_eps if not headline_only else ()) + ((cfg.eps_rel,) if fd_compare else ())))
        rows: list[dict[str, Any]] = []
        for t in tqdm(measured, desc="coupling", disable=not self.progress, leave=False):
            since = self._clock()
            here: dict[int, tuple[SEDBasis, tuple[Any, ...]]] = {}  # this snapshot's basis of each KeyBases
            for kb in every:
                if t in kb.anchors and id(kb) not in here:
                    here[id(kb)] = (feed.at(kb, t), kb.ident(t))
            at = {k: here[id(kb)] for k, kb in bases.items() if t in kb.anchors}
            at_variant = {k: here[id(kb)] for k, kb in variant.items() if t in kb.anchors}
            self._time_bases(since)
            if bases_out is not None and bases_at == "measured":
                for k, (b, _) in (*at.items(), *at_variant.items()):
                    if kept(k):
                        bases_out.setdefault(str(k), {})[self.steps[t]] = b.directions.float()
            self._load(t)
            eps = perturbation_scale(self.model, subspace, cfg.eps_rel)
            seed = random_seed_at(cfg.random_seed + analysis_seed, t)
            rand = subspace.random_directions(cfg.n_random, torch.Generator().manual_seed(seed))
            keys = list(at)
            row: dict[str, Any] = {"index": t, "step": self.steps[t], "eps": eps, "random_seed": seed, "ops": {}}
            for op in task.ops:
                op_keys = [k for k in keys if k.source != "task_gradient" or k.op == op]
                requests = [(at[k][1], at[k][0].directions.float()) for k in op_keys]
                *A_keys, A_rand = self._respond(t, analysis_seed, op, cfg.method, cfg.eps_rel,
                                                requests + [(("random", seed), rand)], probes)
                res: dict[str, Any] = {RANDOM: {"A": A_rand.tolist(), "median": float(A_rand.median())}}
                for k, a in zip(op_keys, A_keys, strict=True):
                    b = at[k][0]
                    r = ratios(a, A_rand)
                    res[str(k)] = {"R": r.tolist(), "R_mean": float(r.mean()), "A": a.tolist(), "rank": b.rank,
                              "sigma": b.singular_values[: b.k + 1].tolist()}
                main_keys = [k for k in op_keys if k.align == main_align and k.is_main]
                for e in fd_eps:
                    # the comparison at the config's ε covers every main key; other ε (the ablation) the gradient only
                    fd_keys = [k for k in main_keys if (fd_compare and e == cfg.eps_rel) or k == ScanKey("gradient", main_align)]
                    reqs = [(at[k][1], at[k][0].directions.float()) for k in fd_keys]
                    *A_fd, A_fd_rand = self._respond(t, analysis_seed, op, "fd", e, reqs + [(("random", seed), rand)], probes)
                    for k, a in zip(fd_keys, A_fd, strict=True):
                        r = ratios(a, A_fd_rand)
                        res[str(k.with_fd_eps(e))] = {"R": r.tolist(), "R_mean": float(r.mean()), "A": a.tolist(),
                                                    "median_random": float(A_fd_rand.median())}
                if op in op_inputs:
                    v_keys = [k for k in at_variant if k.source != "task_gradient" or k.op == op]
                    reqs = [(at_variant[k][1], at_variant[k][0].directions.float()) for k in v_keys]
                    *A_v, A_v_rand = self._respond(t, analysis_seed, op, cfg.method, cfg.eps_rel,
                                                   reqs + [(("random", seed), rand)], op_inputs[op].probes,
                                                   probe_id=op_inputs[op].probe_id)
                    for k, a in zip(v_keys, A_v, strict=True):
                        b = at_variant[k][0]
                        r = ratios(a, A_v_rand)
                        res[str(k)] = {"R": r.tolist(), "R_mean": float(r.mean()), "A": a.tolist(), "rank": b.rank,
                                       "sigma": b.singular_values[: b.k + 1].tolist(),
                                       "median_random": float(A_v_rand.median())}
                row["ops"][op] = res
            rows.append(row)
            self.save_responses()
            if art_dir is not None:
                directions = {str(k): b.directions.float() for k, (b, _) in at.items()}
                directions |= {str(k): b.directions.float() for k, (b, _) in at_variant.items()
                               if k.source == "task_gradient"}
                save_artifact(art_dir, self.model, subspace, t, self.steps[t], directions, rand, seed, probes, eps, cfg,
                              row, {op: inp.probes for op, inp in op_inputs.items()} or None)
                if artifacts_at == "peaks":
                    prune_artifacts(art_dir, headline_steps(summarize(rows, task.ops)))
        summary = summarize(rows, task.ops, phases)
        if bases_out is not None and bases_at == "headline":
            # recomputed for the few snapshots save_bases keeps (every kept key's peak and final, per op), by one more
            # walk over the entries
            since = self._clock()
            index_of = {self.steps[t]: t for t in measured}
            wanted: dict[ScanKey, list[int]] = {}
            for k, kb in (*bases.items(), *variant.items()):
                if k.window is not None or not kept(k):
                    continue
                wanted[k] = sorted({index_of[s[f]] for s in (summary[op].get(str(k)) for op in task.ops) if s
                                    for f in ("peak_step", "final_step")} & set(kb.anchors))
            pick = {k: kb for k, kb in (*bases.items(), *variant.items()) if k in wanted}
            again = BasesFeed(self._entries(analysis_seed, {kb.stream for kb in pick.values()}),
                              [(kb, wanted[k]) for k, kb in pick.items()])
            for k, kb in pick.items():
                bases_out[str(k)] = {self.steps[t]: again.at(kb, t).directions.float() for t in wanted[k]}
            self._time_bases(since)
        return {"config": asdict(cfg), "n_snapshots_total": n_snapshots, "steps_all": self.steps[:n_snapshots],
                "measured": [self.steps[t] for t in measured], "analysis_seed": analysis_seed, "snapshots": rows,
                "phases": {op: list(b) for op, b in (phases or {}).items()}, "summary": summary}


PHASES = ("pre", "transition", "post")
TRANSITION_START_ACC = 0.1
"""Test accuracy at which the transition (grokking) starts; it ends where test accuracy first reaches stop-acc."""


def phase_bounds(history: Sequence[dict[str, Any]], op: str, start_acc: float = TRANSITION_START_ACC,
                 end_acc: float = 0.98) -> tuple[int | None, int | None]:
    """``(start, end)`` steps of an op's transition from its own test-accuracy curve: the first eval with test
    accuracy ≥ ``start_acc`` and the first with ≥ ``end_acc`` (None where the curve never gets there).
    Snapshots before ``start`` are pre-grok, from ``end`` on post-grok, transition in between."""
    key = f"test/acc/{op}"
    evals = [(int(r["step"]), float(r[key])) for r in history if r.get(key) is not None]
    start = next((s for s, a in evals if a >= start_acc), None)
    end = next((s for s, a in evals if a >= end_acc), None)
    return start, end


def phase_of(step: int, bounds: tuple[int | None, int | None]) -> str:
    """``"pre"``, ``"transition"`` or ``"post"`` for a snapshot at ``step`` (by its anchor step)."""
    start, end = bounds
    if start is None or step < start:
        return "pre"
    return "post" if end is not None and step >= end else "transition"


def summarize(rows: Sequence[dict[str, Any]], ops: Sequence[str],
              phases: dict[str, tuple[int | None, int | None]] | None = None) -> dict[str, Any]:
    """Peak and final R̄ (and peak R_1) of every measured key, per op; with ``phases`` (``{op: (start, end)}`` from
    :func:`phase_bounds`) also the median R̄ of the pre-grok, transition and post-grok snapshots."""
    out: dict[str, Any] = {}
    for op in ops:
        keys = sorted({k for r in rows for k in r["ops"][op] if k != "random"})
        out[op] = {}
        for k in keys:
            series = [(r["step"], r["ops"][op][k]) for r in rows if k in r["ops"][op]]
            means = [s["R_mean"] for _, s in series]
            r1 = [s["R"][0] for _, s in series]
            ip, i1 = int(np.argmax(means)), int(np.argmax(r1))
            out[op][k] = {"peak_R_mean": means[ip], "peak_step": series[ip][0], "final_R_mean": means[-1],
                          "final_step": series[-1][0], "peak_R1": r1[i1], "peak_R1_step": series[i1][0],
                          "mean_R_mean": float(np.mean(means))}
            if phases is not None and op in phases:
                by_phase: dict[str, list[float]] = {ph: [] for ph in PHASES}
                for (step, _), m in zip(series, means, strict=True):
                    by_phase[phase_of(step, phases[op])].append(m)
                out[op][k]["phase_median_R_mean"] = {ph: float(np.median(v)) if v else None for ph, v in by_phase.items()}
                out[op][k]["phase_count"] = {ph: len(v) for ph, v in by_phase.items()}
    return out


def save_artifact(directory: Path, model: HookedTransformer, subspace: ParamSubspace, index: int, step: int,
                  directions: dict[str, Tensor], rand: Tensor, seed: int, probes: tuple[Tensor, Any], eps: float,
                  cfg: ScanConfig, row: dict[str, Any], per_op_probes: dict[str, tuple[Tensor, Any]] | None = None) -> Path:
    """Everything needed to recompute the R values of one measured snapshot (see docs/coupling.md); tensors and
    plain Python only, so it loads with ``torch.load(..., weights_only=True)``. ``per_op_probes``: the per-op
    variant's probe set of each op (stored as ``per_op_probes``; its keys' directions are those of ``directions``
    under their own key, else under their main key's)."""
    from sed_lens.serialization import save

    directory.mkdir(parents=True, exist_ok=True)
    tokens, labels = probes
    path = directory / f"snapshot_{step:06d}.pt"
    save({
        "format": ARTIFACT_FORMAT, "step": step, "index": index,
        "model": {"spec": model_spec(model), "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}},
        "subspace": subspace.describe(), "subspace_dim": subspace.dim,
        "directions": directions,
        "random": {"n": rand.shape[0], "seed": seed, "dtype": "float32",
                   "recipe": "ParamSubspace.random_directions(n, torch.Generator().manual_seed(seed)): "
                             "torch.randn(n, P, generator) rows divided by their norms",
                   "sha256": tensor_digest(rand)},
        "probes": {"tokens": tokens, "labels": dict(labels) if isinstance(labels, dict) else labels},
        **({"per_op_probes": {op: {"tokens": t, "labels": dict(y)} for op, (t, y) in per_op_probes.items()}}
           if per_op_probes else {}),
        "eps": eps, "eps_rel": cfg.eps_rel, "method": cfg.method, "site": cfg.site, "readout": cfg.readout,
        "results": row,
    }, path)
    return path


def headline_steps(summary: dict[str, Any]) -> set[int]:
    """The snapshots (steps) a scan's reported values come from: every key's peak R̄, peak R₁ and final snapshot,
    over all ops (``summary``: a scan's ``summary``)."""
    return {s[f] for keys in summary.values() for s in keys.values()
            for f in ("peak_step", "peak_R1_step", "final_step") if f in s}


def prune_artifacts(directory: str | Path, keep: Iterable[int]) -> int:
    """Delete the per-snapshot artifacts in ``directory`` whose step is not in ``keep``; returns how many."""
    wanted = {int(s) for s in keep}
    gone = 0
    for path in Path(directory).glob("snapshot_*.pt"):
        if int(path.stem.split("_")[1]) not in wanted:
            path.unlink()
            gone += 1
    return gone


def save_bases(path: str | Path, bases: dict[str, dict[int, Tensor]], summary: dict[str, Any],
               subspace: ParamSubspace, cfg: ScanConfig) -> Path:
    """Save the SED bases of a scan at each main key's peak and final snapshot (``bases`` from
    :func:`scan_coupling`'s ``bases_out``; ablation keys are left out, and of the per-op variant only its
    ``task_gradient`` keys are there): a few MB instead of every snapshot.

    Format ``sed_lens.coupling_bases/1``: ``bases`` ``{key: {step: [k, P] float32}}``, ``selected``
    ``{op: {key: {"peak": step, "final": step}}}``, ``subspace`` (layout in vector order), ``window``, ``k``.
    """
    selected: dict[str, dict[str, dict[str, int]]] = {}
    keep: dict[str, dict[int, Tensor]] = {}
    for op, keys in summary.items():
        for scan_key, s in parse_keys(keys).items():
            key = str(scan_key)
            if key not in bases or scan_key.window is not None:  # finite-difference ablations reuse the main directions
                continue
            selected.setdefault(op, {})[key] = {"peak": s["peak_step"], "final": s["final_step"]}
            for step in (s["peak_step"], s["final_step"]):
                keep.setdefault(key, {})[step] = bases[key][step]
    from sed_lens.serialization import save

    path = Path(path)
    save({"format": BASES_FORMAT, "window": cfg.window, "k": cfg.k, "subspace": subspace.describe(),
                "subspace_dim": subspace.dim, "selected": selected, "bases": keep}, path)
    return path


def recompute_artifact(path: str | Path, method: str | None = None) -> dict[str, dict[str, list[float]]]:
    """Recompute every R stored in one coupling artifact from its contents alone.

    Rebuilds the model from its TransformerLens config and state, regenerates the random directions from their
    seed (and checks their SHA-256), and measures the stored directions on the stored probes with the stored ε,
    site and readout — the per-op variant's keys (``…/per_op``) on that op's stored probes, with their own stored
    directions or, for ``update`` and ``gradient``, their main key's. Returns ``{op: {key: R list}}`` for the keys
    measured with the artifact's method.
    """
    from sed_lens.models import model_from_spec
    from sed_lens.serialization import load

    art = load(path, map_location="cpu")
    check(isinstance(art, dict) and art.get("format") == ARTIFACT_FORMAT, f"{path} is not a sed_lens coupling artifact.")
    model = model_from_spec(art["model"]["spec"], art["model"]["state_dict"])
    subspace = ParamSubspace(model, [(s["name"], s["heads"]) for s in art["subspace"]])
    rand = subspace.random_directions(art["random"]["n"], torch.Generator().manual_seed(art["random"]["seed"]))
    check(tensor_digest(rand) == art["random"]["sha256"], "the regenerated random directions differ from the stored ones.")
    method = method or art["method"]
    probes = (art["probes"]["tokens"], art["probes"]["labels"])
    per_op = art.get("per_op_probes") or {}
    out: dict[str, dict[str, list[float]]] = {}
    for op, res in art["results"]["ops"].items():
        out[op] = {}
        inputs: dict[str | None, tuple[Tensor, Any]] = {None: probes}
        if op in per_op:
            inputs[PER_OP] = (per_op[op]["tokens"], per_op[op]["labels"])
        for which, on in inputs.items():
            dirs_of: dict[str, Tensor] = {}
            for key in parse_keys(res):
                stored = art["directions"].get(str(key), art["directions"].get(str(key.main)) if key.inputs else None)
                if key.inputs == which and stored is not None:
                    dirs_of[str(key)] = stored
            if not dirs_of:
                continue
            A = centroid_response(model, subspace, torch.cat([*dirs_of.values(), rand]), on, method=method,
                                  eps_rel=art["eps_rel"], site=art["site"], readout=art["readout"], task=op)
            A_rand, i = A[-len(rand):], 0
            for name, d in dirs_of.items():
                out[op][name] = ratios(A[i:i + d.shape[0]], A_rand).tolist()
                i += d.shape[0]
    return out
