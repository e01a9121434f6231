"""The reproduction's compact results, read back typed: one JSON file per run (its ``cell.json``), as kept in
``docs/reproduction/runs/`` by ``python -m sed_lens.experiments.reproduce``.

A coupling run holds its training summary and curves and, per run length (``stop_rule``: the published protocol,
stopped by its stop rule; ``post_grok``: the same trajectory trained on past it) and per analysis seed, the R_j and
R̄ series over the measured snapshots and their summary (peak, final, phase medians), per op and measured key
(a :class:`~sed_lens.analysis.scan_key.ScanKey`, read from its JSON string once, here). An intervention run holds
its condition, projection method, grok step and accuracy curve. What a run is comes from its config, never from its
name.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sed_lens.analysis.scan_key import ScanKey, parse_keys
from sed_lens.errors import SedLensError, check
from sed_lens.experiments.intervention import matched_speedup

LENGTHS = ("stop_rule", "post_grok")
LEAD = "leading"
GRADIENT, UPDATE = ScanKey("gradient", LEAD), ScanKey("update", LEAD)
"""The headline keys: gradient and update SED, leading windows (the paper's code)."""
LENGTH_LABELS = {"stop_rule": "stop-rule run", "post_grok": "post-grok run"}


@dataclass(frozen=True)
class Spread:
    """Values of one number over seeds: the per-seed values, their median, range, mean and sample sd."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Spread:
        return cls(tuple(float(v) for v in values if v is not None))

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def sd(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else (0.0 if self.values else None)

    @property
    def lo(self) -> float | None:
        return min(self.values) if self.values else None

    @property
    def hi(self) -> float | None:
        return max(self.values) if self.values else None


@dataclass(frozen=True)
class CouplingRun:
    """One coupling run's compact results."""

    path: Path
    ops: tuple[str, ...]
    seed: int
    config: dict[str, Any]
    train: dict[str, Any]
    scans: dict[str, dict[int, dict[str, Any]]]  # length → analysis seed → compact scan, series and summary typed
    history: dict[str, list[Any]]
    timings: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)  # commit, versions, start, end ({} if not recorded)

    @property
    def multitask(self) -> bool:
        return len(self.ops) > 1

    @property
    def op(self) -> str:
        return self.ops[0]

    @property
    def ablation(self) -> bool:
        scan = self.config["scan"]
        return bool(scan.get("ablation_windows") or scan.get("ablation_eps"))

    @property
    def lengths(self) -> list[str]:
        return [length for length in LENGTHS if length in self.scans]

    @property
    def analysis_seeds(self) -> list[int]:
        return sorted(self.scans.get("stop_rule", {}))

    def stat(self, length: str, op: str, key: ScanKey, what: str = "peak_R_mean", seed: int = 0) -> float | None:
        """One summary number (``peak_R_mean``, ``peak_R1``, ``final_R_mean``, …) of a key, or None if not measured."""
        s = self.scans.get(length, {}).get(seed, {}).get("summary", {}).get(op, {}).get(key)
        return None if s is None else s.get(what)

    def over_seeds(self, length: str, op: str, key: ScanKey, what: str = "peak_R_mean") -> Spread:
        """The number over every analysis seed that measured the key."""
        return Spread.of(self.stat(length, op, key, what, a) for a in self.scans.get(length, {}))

    def phase_medians(self, length: str, op: str, key: ScanKey, seed: int = 0) -> dict[str, float | None]:
        s = self.scans.get(length, {}).get(seed, {}).get("summary", {}).get(op, {}).get(key) or {}
        return dict(s.get("phase_median_R_mean") or {})

    def series(self, length: str, op: str, key: ScanKey, seed: int = 0) -> tuple[list[int], list[float]]:
        s = self.scans.get(length, {}).get(seed, {}).get("series", {}).get(op, {}).get(key)
        return ([], []) if s is None else (list(s["step"]), list(s["R_mean"]))

    def phases(self, op: str) -> tuple[int | None, int | None]:
        p = self.scans["stop_rule"][0].get("phases", {}).get(op) or [None, None]
        return p[0], p[1]

    def last_step(self, length: str) -> int | None:
        s = self.scans.get(length, {}).get(0)
        return None if s is None else s.get("last_step")

    @property
    def grok_step(self) -> dict[str, int | None]:
        return dict(self.train.get("grok_step", {}))

    @property
    def worker_s(self) -> float:
        t = self.timings
        return float(t.get("train", 0) + t.get("scan", 0) + t.get("outputs", 0))


@dataclass(frozen=True)
class InterventionRun:
    """One run of the intervention grid."""

    path: Path
    op: str
    seed: int
    condition: str
    method: str  # "gradient" or "update" (the control is shared by both)
    grok_step: int | None
    steps: int
    history: dict[str, list[Any]]
    wall_s: float
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def grok_or_last(self) -> float:
        return float(self.grok_step if self.grok_step is not None else self.steps)


@dataclass
class Results:
    coupling: list[CouplingRun]
    interventions: list[InterventionRun]

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.coupling if not r.multitask} | {r.seed for r in self.interventions})

    def missing(self) -> dict[int, list[str]]:
        """Per training seed, the runs some other seed has and it lacks (``"coupling OP"``,
        ``"intervention OP-METHOD C"``): the seeds whose protocol is not complete yet (absent when it is)."""
        have: dict[int, set[str]] = {s: set() for s in self.seeds}
        for r in self.coupling:
            if not r.multitask:
                have[r.seed].add(f"coupling {r.op}")
        for i in self.interventions:
            have[i.seed].add(f"intervention {i.op}-{i.method} {i.condition}")
        every = set().union(*have.values()) if have else set()
        return {s: sorted(every - runs) for s, runs in have.items() if every - runs}

    def single(self, op: str | None = None) -> list[CouplingRun]:
        return sorted((r for r in self.coupling if not r.multitask and (op is None or r.op == op)), key=lambda r: r.seed)

    @property
    def ops(self) -> list[str]:
        order = ("add", "sub", "mul", "sq")
        ops = {r.op for r in self.coupling if not r.multitask}
        return sorted(ops, key=lambda o: (order.index(o) if o in order else len(order), o))

    @property
    def multitask(self) -> list[CouplingRun]:
        return sorted((r for r in self.coupling if r.multitask), key=lambda r: r.seed)

    @property
    def ablation(self) -> CouplingRun | None:
        return next((r for r in self.coupling if r.ablation), None)

    def intervention_grids(self) -> list[tuple[str, str]]:
        """(op, method) of every intervention grid with a non-control run."""
        seen = {(r.op, r.method) for r in self.interventions if r.condition != "A"}
        return sorted(seen, key=lambda g: (g[0] != "add", g[0], g[1] != "gradient"))

    def grid(self, op: str, method: str) -> list[InterventionRun]:
        """The runs of one grid: its own conditions and the op's controls."""
        return [r for r in self.interventions if r.op == op and (r.method == method or r.condition == "A")]

    @property
    def worker_s(self) -> float:
        return sum(r.worker_s for r in self.coupling) + sum(r.wall_s for r in self.interventions)


def _typed_scan(scan: dict[str, Any]) -> dict[str, Any]:
    """A compact scan as read from JSON with its per-op series and summaries keyed by :class:`ScanKey`."""
    return {**scan, "series": {op: parse_keys(by_key) for op, by_key in scan.get("series", {}).items()},
            "summary": {op: parse_keys(by_key) for op, by_key in scan.get("summary", {}).items()}}


def _coupling(path: Path, data: dict[str, Any]) -> CouplingRun:
    s = data["summary"]
    check("scans" in s, f"{path} holds coupling results written before sed_lens kept every scan (no 'scans'); "
                        "rerun the reproduction to regenerate it.")
    g = data["config"]["grokking"]
    scans = {length: {int(a): _typed_scan(scan) for a, scan in by_seed.items()} for length, by_seed in s["scans"].items()}
    train, extra = s["train"], g.get("train", {}).get("post_grok_steps", 0)
    if ("post_grok" not in scans and extra and train.get("stop_step") is not None and train.get("cross_step") is not None
            and train["stop_step"] >= train["cross_step"] + extra):
        # The stop rule fired only after the post-grok stretch had passed (accuracy dips reset its count): the
        # stop-rule run already is the post-grok run.
        scans["post_grok"] = scans["stop_rule"]
    return CouplingRun(path, tuple(g["ops"]), int(g["seed"]), data["config"], s["train"], scans, s.get("history", {}),
                       s.get("timings", {}), data.get("provenance", {}))


def _intervention(path: Path, data: dict[str, Any]) -> InterventionRun:
    c, s = data["config"], data["summary"]
    return InterventionRun(path, c["grokking"]["ops"][0], int(c["grokking"]["seed"]), c["condition"],
                           c["projection"]["apply_to"], s.get("grok_step", {}).get(c["grokking"]["ops"][0]),
                           int(s["steps"]), s.get("history", {}), float(s.get("wall_time_s", 0.0)),
                           data.get("provenance", {}))


def cpu_of(provenance: Mapping[str, Any]) -> str | None:
    """The CPU a run recorded, with the SIMD level of PyTorch's kernels (None if it recorded no CPU)."""
    if not provenance.get("cpu"):
        return None
    return f"{provenance['cpu']} ({provenance.get('cpu_capability') or 'kernel level not recorded'})"


def tally(values: Iterable[str | None]) -> str:
    """One value if all agree, else each with its count of runs, most first, ties by name (None: ``not recorded``)."""
    counts = Counter(v or "not recorded" for v in values)
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{c} ({n} run{'s' if n != 1 else ''})" for c, n in sorted(counts.items(), key=lambda cn: (-cn[1], cn[0])))


def load_results(directory: str | Path) -> Results:
    """Every run's compact results under ``directory`` (``**/*.json``, each a run's ``cell.json``)."""
    root = Path(directory)
    check(root.is_dir(), f"{root} does not exist: no reproduction results to report.")
    coupling, interventions = [], []
    for path in sorted(root.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SedLensError(f"{path} is not valid JSON (line {e.lineno}).") from None
        config = data.get("config", {}) if isinstance(data, dict) else {}
        if "scan" in config:
            coupling.append(_coupling(path, data))
        elif "condition" in config:
            interventions.append(_intervention(path, data))
    check(bool(coupling or interventions), f"{root} holds no reproduction results (cell JSON files).")
    return Results(coupling, interventions)


def speedups(runs: Sequence[InterventionRun], conditions: Sequence[str] = ("A", "B", "C", "D", "E")) -> dict[str, dict[str, Any]]:
    """Per condition: grok steps per seed, their mean, and the speedup (mean control / mean condition, both over
    the seeds that have the control and the condition: a grid whose seeds are not all finished never compares a
    control of one seed with a condition of another) with the per-seed speedups (control seed s / condition seed s);
    ``censored``: runs that never grokked (counted at their last step, so the mean is a lower bound)."""
    by = {c: {r.seed: r for r in runs if r.condition == c} for c in conditions}
    ctrl = by.get("A", {})
    out: dict[str, dict[str, Any]] = {}
    for c, rs in by.items():
        if not rs:
            continue
        steps = {s: r.grok_or_last for s, r in sorted(rs.items())}
        mean = statistics.fmean(steps.values())
        per_seed = {s: ctrl[s].grok_or_last / v for s, v in steps.items() if s in ctrl and v > 0}
        out[c] = {"steps": steps, "mean": mean, "censored": sum(r.grok_step is None for r in rs.values()),
                  "speedup": matched_speedup({s: r.grok_or_last for s, r in ctrl.items()}, steps),
                  "per_seed": per_seed, "spread": Spread.of(per_seed.values())}
    return out
