"""Reproduce Xu (2026) on a CPU with one command: ``python -m sed_lens.experiments.reproduce``.

Runs every experiment of the paper's headline table (PAPER.md §4) — the single-task coupling table (4 ops × 3
seeds, update vs gradient SED), the window and ε ablations, the multitask table, the intervention grids for add
and mul with both projection methods — as ONE grid of runs (so the workers stay busy across experiments;
rerunning skips finished runs), then writes the reproduction report: REPRODUCTION.md with our number beside the
paper's for every row, the seeds' spread, a discussion of every difference, and the figures.

``--quick`` shrinks everything (coupling at p 31 with TransformerLens' init, the intervention at p 59 capped at
2,000 steps, one seed, fewer snapshots and probes) to run in a few minutes; it checks the paper's qualitative
claims rather than its numbers (CI runs it).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from sed_lens.analysis.trajectory import ScanConfig
from sed_lens.cli import config_from_args, csv, parser_for, run_cli
from sed_lens.errors import check
from sed_lens.experiments import coupling as coupling_exp
from sed_lens.experiments import intervention as intervention_exp
from sed_lens.experiments.reproduction_report import write_report
from sed_lens.grid import BACKENDS, Cell, raise_failures, run_grid
from sed_lens.tracking import WANDB_MODES, write_json
from sed_lens.training import TrainConfig


@dataclass
class ReproduceConfig:
    quick: bool = field(default=False, metadata={"help": "a few-minute version (small p, one seed): qualitative claims only"})
    out: str = field(default="runs/reproduce", metadata={"help": "where the runs and the report go (rerunning skips finished runs)"})
    report: str | None = field(default=None, metadata={
        "help": "also write the report here, figures in a folder beside it (e.g. docs/REPRODUCTION.md)"})
    seeds: tuple[int, ...] = field(default=(42, 137, 2024), metadata={
        "help": "comma-separated seeds of the coupling and intervention grids (the paper's three by default; runs go "
                "seed by seed, so an interrupted run can be reported for its finished seeds with --seeds 42)",
        "parse": csv(int)})
    multitask_seeds: tuple[int, ...] = field(default=(42,), metadata={"help": "seeds of the multitask coupling runs"})
    backend: str = field(default="local", metadata={"help": "where runs execute", "choices": BACKENDS})
    workers: int | None = field(default=None, metadata={"help": "parallel runs (default: one per core)"})
    ray_address: str | None = field(default=None, metadata={"help": "Ray cluster address (default: a local Ray)"})
    wandb_mode: str = field(default="offline", metadata={"help": "W&B mode of every run", "choices": WANDB_MODES})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


def plan(cfg: ReproduceConfig) -> tuple[coupling_exp.CouplingConfig, list[intervention_exp.InterventionConfig]]:
    """The experiments of the reproduction (full protocol, or the quick version)."""
    out = Path(cfg.out)
    common: dict[str, Any] = {"backend": cfg.backend, "workers": cfg.workers, "ray_address": cfg.ray_address,
              "wandb_mode": cfg.wandb_mode, "progress": cfg.progress}
    if cfg.quick:
        # Coupling: p 31 with TransformerLens' init groks in ~1,000 steps. Intervention: the speedup needs the
        # paper's slow-grokking PyTorch init; at p 59 its control groks near step 3,100, so runs are capped at
        # 2,000 steps and a control that has not grokked counts as a lower bound (speedups are then lower bounds).
        train = TrainConfig(steps=2500, batch_size=256, stop_patience=4)
        coupling = coupling_exp.CouplingConfig(
            ops=("add",), seeds=(42,), multitask=True, multitask_ops=("add", "mul"), multitask_seeds=(42,),
            window_ablation=True, eps_ablation=True, p=31, init="tl", train=train,
            scan=ScanConfig(n_snapshots=8, n_probes=256, n_random=10, window=10),
            multitask_snapshots=8, artifacts=False, out=str(out / "coupling"), **common)
        interventions = [intervention_exp.InterventionConfig(
            op="add", seeds=(42,), method="gradient", p=59, init="torch", conditions=("A", "C", "E"),
            train=intervention_exp.InterventionTrainConfig(steps=2000),
            out=str(out / "intervention" / "add-gradient"), **common)]
        return coupling, interventions
    coupling = coupling_exp.CouplingConfig(seeds=cfg.seeds, multitask=True, multitask_seeds=cfg.multitask_seeds,
                                           window_ablation=True, eps_ablation=True, out=str(out / "coupling"), **common)
    interventions = [intervention_exp.InterventionConfig(op=op, method=m, seeds=cfg.seeds,
                                                         out=str(out / "intervention" / f"{op}-{m}"), **common)
                     for op in ("add", "mul") for m in ("gradient", "update")]
    return coupling, interventions


def all_cells(coupling: coupling_exp.CouplingConfig,
              interventions: Sequence[intervention_exp.InterventionConfig]) -> list[tuple[Path, Cell]]:
    """Every run of the reproduction with the directory it belongs in: seed by seed (every run of the first seed,
    then of the next, so an interrupted reproduction has complete experiments for its finished seeds), and
    within a seed longest first (multitask, single-task coupling, then the intervention conditions that train
    longest). The control runs of an op are listed once: the other projection method's grid gets a copy
    (:func:`share_controls`)."""
    cells = [(Path(coupling.out) / "cells", c) for c in coupling_exp.cells(coupling)]
    seen_controls: set[str] = set()
    for iv in interventions:
        for c in intervention_exp.cells(iv):
            if c.config["condition"] == "A":
                key = json.dumps(c.config, sort_keys=True)
                if key in seen_controls:
                    continue
                seen_controls.add(key)
            cells.append((iv.out_dir, c))

    seed_order: dict[int, int] = {}
    for _, c in cells:
        seed_order.setdefault(int(c.config["grokking"]["seed"]), len(seed_order))

    def rank(item: tuple[Path, Cell]) -> tuple[int, int]:
        root, c = item
        if root.name == "cells":
            kind = 0 if c.name.startswith("multitask") else 1
        else:
            kind = 2 if c.config["condition"] in ("A", "B", "D") else 3
        return seed_order[int(c.config["grokking"]["seed"])], kind

    return sorted(cells, key=rank)


def share_controls(interventions: Sequence[intervention_exp.InterventionConfig]) -> None:
    """Copy finished control runs between the gradient and update grids of one op (their configs are equal)."""
    by_op: dict[str, list[intervention_exp.InterventionConfig]] = {}
    for iv in interventions:
        by_op.setdefault(iv.op, []).append(iv)
    for ivs in by_op.values():
        for src in ivs:
            for c in intervention_exp.cells(src):
                if c.config["condition"] != "A" or not (src.out_dir / c.name / "cell.json").is_file():
                    continue
                for dst in ivs:
                    if dst is not src and not (dst.out_dir / c.name).exists():
                        shutil.copytree(src.out_dir / c.name, dst.out_dir / c.name)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        tl_version = version("transformer-lens")
    except PackageNotFoundError:
        tl_version = "unknown"
    commit = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformer_lens": tl_version, "sed_lens_commit": commit,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}


def run_times(root: Path, names: Sequence[str]) -> dict[str, float | None]:
    """How long the runs ``names`` (under ``root``) took, whichever invocations trained them: ``worker_s``, the sum
    of each run's time from its start (``created`` in run.json) to its finish (cell.json written), and
    ``span_s``, from the first start to the last finish (None when no run has both files)."""
    spans = []
    for name in names:
        run_json, cell_json = root / name / "run.json", root / name / "cell.json"
        if run_json.is_file() and cell_json.is_file():
            start = time.mktime(time.strptime(json.loads(run_json.read_text())["created"], "%Y-%m-%d %H:%M:%S"))
            spans.append((start, cell_json.stat().st_mtime))
    if not spans:
        return {"worker_s": None, "span_s": None}
    return {"worker_s": sum(end - start for start, end in spans),
            "span_s": max(end for _, end in spans) - min(start for start, _ in spans)}


def run(cfg: ReproduceConfig, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run (or complete) every run of the reproduction, aggregate each experiment, write the report."""
    t0 = time.perf_counter()
    coupling, interventions = plan(cfg)
    coupling_exp.validate(coupling)
    for iv in interventions:
        iv.validate()
    root = Path(cfg.out)
    share_controls(interventions)
    grid = [Cell(str((path / c.name).relative_to(root)), c.target, c.config) for path, c in all_cells(coupling, interventions)]
    results = run_grid(grid, root, backend=cfg.backend, workers=cfg.workers, ray_address=cfg.ray_address,
                       progress=cfg.progress, desc="reproduction runs")
    raise_failures(results)
    share_controls(interventions)
    # Every run is finished: the experiments' own aggregation only reads and summarises.
    coupling_res = coupling_exp.run(replace(coupling, progress=False))
    iv_res = [intervention_exp.run(replace(iv, progress=False)) for iv in interventions]
    meta = {"command": " ".join(["python -m sed_lens.experiments.reproduce", *(argv or [])]),
            "wall_time_s": time.perf_counter() - t0, "runs": len(grid),
            "runs_skipped": sum(r.skipped for r in results), "versions": versions(), "quick": cfg.quick,
            "seeds": list(coupling.seeds), "run_times": run_times(root, [c.name for c in grid]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    found = claims(coupling_res, iv_res)
    paths = write_report(root, coupling_res, iv_res, meta, found, Path(cfg.report) if cfg.report else None)
    summary = {"meta": meta, "report": [str(p) for p in paths], "claims": found}
    write_json(root / "reproduction.json", summary)
    return summary


def claims(coupling_res: dict[str, Any], iv_res: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The paper's qualitative claims, checked on our numbers."""
    agg = coupling_res["aggregate"]
    ratios = [r["ratio"] for r in agg["single"].values() if r.get("ratio") is not None and np.isfinite(r["ratio"])]
    multi = [(r["per_op_peak"], r["update_peak"]) for rows in agg["multitask"].values() for r in rows
             if r["per_op_peak"] is not None and r["update_peak"] is not None]
    speed = {}
    for res in iv_res:
        c = res["conditions"]
        speed[f"{res['config']['op']}-{res['config']['method']}"] = {k: c[k]["speedup"] for k in c}
    keep = [v for s in speed.values() for k, v in s.items() if k in ("C", "E") and v is not None]
    return {
        "gradient_over_update_min": min(ratios) if ratios else None,
        "gradient_over_update_median": float(np.median(ratios)) if ratios else None,
        "per_op_over_aggregated_min": min(p / u for p, u in multi) if multi else None,
        "keep_speedup_min": min(keep) if keep else None,
        "speedups": speed,
    }


def main(argv: Sequence[str] | None = None) -> None:
    ap = parser_for(ReproduceConfig, "python -m sed_lens.experiments.reproduce", __doc__ or "")
    args = list(sys.argv[1:] if argv is None else argv)
    cfg = config_from_args(ReproduceConfig, ap.parse_args(args))
    check(cfg.workers is None or cfg.workers >= 1, f"workers must be at least 1, got {cfg.workers}.")
    summary = run(cfg, args)
    print(f"reproduction finished in {summary['meta']['wall_time_s'] / 60:.1f} min; report: {', '.join(summary['report'])}")
    print(json.dumps(summary["claims"], indent=2))


def cli() -> None:
    sys.exit(run_cli(main, prog="reproduce"))


if __name__ == "__main__":
    cli()
