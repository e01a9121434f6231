"""Where the reproduction's worker time goes, phase by phase: ``python -m benchmarks.protocol_profile [--results DIR]``.

Reads the timings every run of the reproduction records in its compact results (``docs/reproduction/runs`` by
default): per coupling run the training (optimizer steps, full train/test evals, checkpoints), the scan (stream
vectors on the fixed gradient batches, SED bases, centroid responses per method — exact HVP and the paper's
finite difference) and the outputs (figures, JSON); per intervention run its training. Prints a Markdown table of
worker-seconds and shares, and the ratio the throughput target is stated in: total worker time / worker time of
the optimizer steps alone. Measured on the real protocol, not a stand-in, so it is exactly as noisy as the machine
the runs shared.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sed_lens.cli import ArgumentParser
from sed_lens.experiments.reproduction_results import cpu_of, load_results, tally
from sed_lens.grid import PROVENANCE_TIME


def profile(results: str | Path, seed: int | None = None) -> tuple[dict[str, float], dict[str, int], int]:
    """``({phase: worker-seconds}, {method: directions measured}, runs)`` over every run in ``results`` (or only
    those of training seed ``seed``)."""
    res = load_results(results)
    coupling = [r for r in res.coupling if seed is None or r.seed == seed]
    interventions = [r for r in res.interventions if seed is None or r.seed == seed]
    t: dict[str, float] = defaultdict(float)
    dirs: dict[str, int] = defaultdict(int)
    for r in coupling:
        tm = r.timings
        train = float(tm.get("train", 0.0))
        tt = r.train.get("timings", {})
        evals, ckpt = float(tt.get("eval", 0.0)), float(tt.get("checkpoint", 0.0))
        t["coupling runs: optimizer steps"] += train - evals - ckpt
        t["coupling runs: evals (full train + test, every 25 steps)"] += evals
        t["coupling runs: checkpoints"] += ckpt
        parts = tm.get("scan_parts", {})
        accounted = 0.0
        for name, secs in parts.items():
            label = {"streams": "scan: stream vectors (gradients on the fixed batches)", "bases": "scan: SED bases",
                     "responses/hvp": "scan: centroid responses, exact (HVP)",
                     "responses/jvp": "scan: centroid responses, exact (JVP)",
                     "responses/fd": "scan: centroid responses, the paper's finite difference"}.get(name, f"scan: {name}")
            t[label] += float(secs)
            accounted += float(secs)
        t["scan: other (bookkeeping, loading snapshots)"] += max(0.0, float(tm.get("scan", 0.0)) - accounted)
        t["coupling runs: outputs (figures, JSON, W&B)"] += float(tm.get("outputs", 0.0))
        for method, n in tm.get("measured_directions", {}).items():
            dirs[method] += int(n)
    for iv in interventions:
        t["intervention runs (training to the grok step)"] += iv.wall_s
    return dict(t), dict(dirs), len(coupling) + len(interventions)


STEP_PHASES = ("coupling runs: optimizer steps", "intervention runs (training to the grok step)")


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="docs/reproduction/runs", help="the reproduction's compact results")
    args = ap.parse_args()
    times, dirs, n = profile(args.results)
    total = sum(times.values())
    steps = times.get("coupling runs: optimizer steps", 0.0) + times.get("intervention runs (training to the grok step)", 0.0)
    print(f"{n} runs of `{args.results}`; worker time {total / 3600:.2f} h\n")
    print("| phase | worker-s | share |\n|---|---|---|")
    for name, secs in sorted(times.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {secs:.0f} | {secs / total:.1%} |")
    print(f"| **total** | {total:.0f} | 100% |\n")
    if dirs:
        print("directions measured: " + ", ".join(f"{m} {k:,}" for m, k in sorted(dirs.items())))
    if steps:
        print(f"\nworker time / optimizer steps (interventions counted whole, evals included): {total / steps:.2f}×")
    res = load_results(args.results)
    seeds = sorted({r.seed for r in res.coupling} | {r.seed for r in res.interventions})
    if len(seeds) > 1:  # seeds may have run on different code: the table says which
        per = {s: profile(args.results, s) for s in seeds}
        print("\nPer training seed (coupling runs differ in what they measure: the ablations and the multitask run "
              "ride on seed 42). *code*, *CPU*: the sed_lens commit and the CPU (with the SIMD level of PyTorch's kernels) its runs "
              "recorded; *wall span*: first start to last "
              "finish of its runs, which is the seed's wall time when it ran by itself in one go:\n")
        print("| seed | runs | code | CPU | wall span | worker h | coupling train | coupling scan | interventions "
              "| worker / optimizer steps |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for s_, (tm, _, k) in per.items():
            tot = sum(tm.values())
            st = sum(tm.get(ph, 0.0) for ph in STEP_PHASES)
            train = sum(v for ph, v in tm.items() if ph.startswith("coupling runs:") and "outputs" not in ph)
            scan = sum(v for ph, v in tm.items() if ph.startswith("scan:"))
            iv = tm.get(STEP_PHASES[1], 0.0)
            provs = [r.provenance for r in res.coupling if r.seed == s_]
            provs += [r.provenance for r in res.interventions if r.seed == s_]
            code, cpu, span = tally(p.get("sed_lens_commit") for p in provs), tally(cpu_of(p) for p in provs), wall_span(provs)
            print(f"| {s_} | {k} | {code} | {cpu} | {f'{span / 60:.0f} min' if span is not None else '—'} | {tot / 3600:.2f} "
                  f"| {train:.0f} | {scan:.0f} | {iv:.0f} | {f'{tot / st:.2f}×' if st else '—'} |")


def wall_span(provenances: Sequence[Mapping[str, Any]]) -> float | None:
    """Seconds from the first start to the last finish of a set of runs (None unless every run recorded both)."""
    if not provenances or not all(p.get("started") and p.get("finished") for p in provenances):
        return None
    when = [datetime.strptime(p[k], PROVENANCE_TIME) for p in provenances for k in ("started", "finished")]
    return (max(when) - min(when)).total_seconds()


if __name__ == "__main__":
    main()
