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

import fnmatch
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sed_lens.cli import config_from_args, csv, parser_for, run_cli
from sed_lens.configs import GridOptions, ScanConfig, TrackingOptions, TrainConfig, shared
from sed_lens.errors import check
from sed_lens.experiments import coupling as coupling_exp
from sed_lens.experiments import intervention as intervention_exp
from sed_lens.experiments.grokking import TRACKING_KEYS
from sed_lens.experiments.reproduction_report import claim_numbers, output_section, write_report
from sed_lens.experiments.reproduction_results import load_results
from sed_lens.grid import Cell, CellResult, raise_failures, run_grid, same_config
from sed_lens.rendering import Section, json_has
from sed_lens.tracking import atomic_write_bytes, git_commit, write_json


@dataclass(kw_only=True)
class ReproduceConfig(TrackingOptions, GridOptions):
    """The whole reproduction: which seeds, where the runs, kept results and report go, how the runs execute."""

    quick: bool = field(default=False, metadata={"help": "a few-minute version (small p, one seed): qualitative claims only"})
    out: str = field(default="runs/reproduce", metadata={"help": "where the runs and the report go (rerunning skips finished runs)"})
    report: str | None = field(default=None, metadata={
        "help": "write the report here (default OUT/REPRODUCTION.md), figures in a folder beside it named after it "
                "(docs/REPRODUCTION.md → docs/reproduction/figures), and the same as one self-contained .html"})
    report_only: bool = field(default=False, metadata={
        "help": "only write the report from the kept results (--results), without running anything: e.g. "
                "--report-only --results docs/reproduction/runs --report docs/REPRODUCTION.md"})
    seeds: tuple[int, ...] = field(default=(42, 137, 2024), metadata={
        "help": "comma-separated seeds of the coupling and intervention grids (the paper's three by default; runs go "
                "seed by seed, so an interrupted run can be reported for its finished seeds with --seeds 42; every run "
                "is the full protocol's run of its seed, and the window and ε ablations ride on add seed 42 only)",
        "parse": csv(int)})
    multitask_seeds: tuple[int, ...] = field(default=(42,), metadata={"help": "seeds of the multitask coupling runs"})
    only: tuple[str, ...] = field(default=(), metadata={
        "help": "run only the runs whose name (as under OUT, e.g. coupling/cells/add-s137, "
                "intervention/mul-update/B-remove-sed-s42) matches one of these comma-separated shell patterns, e.g. "
                "'coupling/*' or '*-s137'; the report is still written from every kept result", "parse": csv(str)})
    results: str | None = field(default=None, metadata={
        "help": "keep each run's compact results (its cell.json: config and every number the report uses) here as "
                "soon as it finishes, and restore finished runs from here (default: OUT/results; the repository's "
                "are in docs/reproduction/runs)"})
    replicates: str | None = field(default=None, metadata={
        "help": "a folder of replicate result sets — each subfolder the same runs made again elsewhere, e.g. on "
                "another CPU — to set beside the results in the report, number by number (the repository's: "
                "docs/reproduction/replicates)"})
    compile: bool = field(default=False, metadata={
        "help": "compile every run's training step with torch.compile (the experiments' --compile; needs a C++ "
                "compiler): faster steps after a one-off compile cached on disk, reruns bit-identical, but a compiled "
                "run rounds differently from an eager one, so it is another run of the protocol — its config says so, "
                "kept results of eager runs (the repository's) are not restored for it, and with --results pointing "
                "at them it replaces them as it finishes"})

    def validate(self) -> None:
        """The pieces' checks (tracking, grid), then the seeds (the experiments' configs check the rest as
        :func:`plan` makes them)."""
        super().validate()
        check(len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds),
              f"seeds must be distinct and at least one, got {list(self.seeds)} (--seeds).")
        check(len(self.multitask_seeds) > 0, "name at least one multitask seed (--multitask-seeds).")


ANALYSIS_SEEDS = 3
"""Analysis seeds of every coupling scan (gradient batch, probes, random directions): the spread they give is the
uncertainty of a number measured on one trained run."""


def post_grok_steps(scan: ScanConfig, every: int) -> int:
    """How far coupling runs train past the point where test accuracy first reaches 0.98: two SED windows
    (2·W snapshots), so that fully post-grok leading and trailing windows both exist (the stop rule alone ends
    ~20 evals after that point, inside the first window)."""
    return 2 * scan.window * every


ABLATION_SEED = 42
"""Training seed of the run that carries the window and ε ablations (add, as in the paper); a ``--seeds`` without it
has no ablation run."""


def plan(cfg: ReproduceConfig) -> tuple[coupling_exp.CouplingConfig, list[intervention_exp.InterventionConfig]]:
    """The experiments of the reproduction (full protocol, or the quick version)."""
    out = Path(cfg.out)
    common: dict[str, Any] = shared(cfg, GridOptions, TrackingOptions)
    if cfg.quick:
        # Coupling: p 31 with TransformerLens' init groks in ~1,000 steps. Intervention: the speedup needs the
        # paper's slow-grokking PyTorch init; at p 59 its control groks near step 3,100, so runs are capped at
        # 2,000 steps and a control that has not grokked counts as a lower bound (speedups are then lower bounds).
        scan = ScanConfig(n_snapshots=6, n_probes=128, n_random=8, window=10, analysis_seeds=2, fd_compare=True,
                          per_op_inputs=True)
        train = TrainConfig(steps=2500, batch_size=256, stop_patience=4, post_grok_steps=post_grok_steps(scan, 25),
                            compile=cfg.compile)
        coupling = coupling_exp.CouplingConfig(
            ops=("add",), seeds=(42,), multitask=True, multitask_ops=("add", "mul"), multitask_seeds=(42,),
            window_ablation=True, eps_ablation=True, p=31, init="tl", train=train, scan=scan,
            multitask_snapshots=6, artifacts=False, out=str(out / "coupling"), **common)
        interventions = [intervention_exp.InterventionConfig(
            op="add", seeds=(42,), method="gradient", p=59, init="torch", conditions=("A", "C", "E"),
            train=intervention_exp.InterventionTrainConfig(steps=2000, compile=cfg.compile),
            out=str(out / "intervention" / "add-gradient"), **common)]
        return coupling, interventions
    # artifacts_at="peaks": a finished run keeps the artifacts of its reported values only (disk, not numbers).
    # per_op_inputs: the multitask run is also measured with the author's per-op conventions (the single-task cells
    # leave the option off, coupling.cells: their configs, and so the kept results, stay as they were)
    # The ablations ride on the paper's run (add, ABLATION_SEED) whatever --seeds is, so that a run's config never
    # depends on which other seeds were asked for (--seeds 137 runs the full protocol's add-s137, no ablations).
    scan = ScanConfig(analysis_seeds=ANALYSIS_SEEDS, fd_compare=True, per_op_inputs=True)
    ablate = ABLATION_SEED in cfg.seeds
    coupling = coupling_exp.CouplingConfig(seeds=cfg.seeds, multitask=True, multitask_seeds=cfg.multitask_seeds,
                                           window_ablation=ablate, eps_ablation=ablate, ablation_op="add",
                                           ablation_seed=ABLATION_SEED, artifacts_at="peaks",
                                           out=str(out / "coupling"),
                                           train=TrainConfig(post_grok_steps=post_grok_steps(scan, 25),
                                                             compile=cfg.compile), scan=scan,
                                           **common)
    interventions = [intervention_exp.InterventionConfig(op=op, method=m, seeds=cfg.seeds,
                                                         train=intervention_exp.InterventionTrainConfig(compile=cfg.compile),
                                                         out=str(out / "intervention" / f"{op}-{m}"), **common)
                     for op in ("add", "mul") for m in ("gradient", "update")]
    return coupling, interventions


def all_cells(coupling: coupling_exp.CouplingConfig,
              interventions: Sequence[intervention_exp.InterventionConfig]) -> list[tuple[Path, Cell]]:
    """Every run of the reproduction with the directory it belongs in: seed by seed (every run of the first seed,
    then of the next, so an interrupted reproduction has complete experiments for its finished seeds), and
    within a seed longest first: the multitask run (alone ≈ 40 % of seed 42's worker time, so started last it
    would leave the other worker idle at the end), the single-task coupling runs (the one carrying the ablations
    first), then the intervention conditions that train longest: the headline runs finish first when time is short
    (a session, a job's time limit), and the short intervention runs fill the workers at the end. The control runs
    of an op are listed once: the other projection method's grid gets a copy (:func:`share_controls`)."""
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

    def rank(item: tuple[Path, Cell]) -> tuple[int, float]:
        root, c = item
        if "scan" in c.config:
            multitask = len(c.config["grokking"]["ops"]) > 1
            ablation = bool(c.config["scan"]["ablation_windows"] or c.config["scan"]["ablation_eps"])
            kind = -1 if multitask else 0 if ablation else 0.5
        else:
            kind = 2 if c.config["condition"] in ("A", "B", "D") else 3
        return seed_order[int(c.config["grokking"]["seed"])], kind

    return sorted(cells, key=rank)


def select(grid: Sequence[Cell], patterns: Sequence[str]) -> list[Cell]:
    """The runs of ``grid`` (in its order) whose name matches one of the shell ``patterns`` (all without any); a
    pattern that matches no run is an error (a typo would otherwise run nothing)."""
    if not patterns:
        return list(grid)
    for pat in patterns:
        check(any(fnmatch.fnmatchcase(c.name, pat) for c in grid),
              f"--only {pat!r} matches no run of the reproduction; runs are named like coupling/cells/add-s42, "
              "coupling/cells/multitask-s42, intervention/add-gradient/B-remove-sed-s42.")
    return [c for c in grid if any(fnmatch.fnmatchcase(c.name, pat) for pat in patterns)]


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


def keep_result(result: CellResult, root: Path, kept: Path) -> None:
    """Copy a finished run's ``cell.json`` (its config and compact results) to ``kept/NAME.json``."""
    src = root / result.name / "cell.json"
    if result.error is None and src.is_file():
        dst = kept / f"{result.name}.json"
        dst.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(dst, json.dumps(json.loads(src.read_text()), separators=(",", ":")).encode() + b"\n")


def restore_results(grid: Sequence[Cell], root: Path, kept: Path) -> int:
    """Give every run without a run directory whose compact results are kept (``kept/NAME.json``, same config) its
    ``cell.json`` back, so the grid counts it as finished and never retrains it; returns how many."""
    n = 0
    for c in grid:
        src, dst = kept / f"{c.name}.json", root / c.name / "cell.json"
        if src.is_file() and not (root / c.name).exists():
            data = json.loads(src.read_text())
            if same_config(data.get("config"), c.config, TRACKING_KEYS):
                write_json(dst, data)
                n += 1
    return n


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        tl_version = version("transformer-lens")
    except PackageNotFoundError:
        tl_version = "unknown"
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformer_lens": tl_version, "sed_lens_commit": git_commit() or "unknown",
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}


def run(cfg: ReproduceConfig, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run (or complete) every run of the reproduction, keep each run's compact results as it finishes, and write
    the report from them (``report_only``: only the report, from the kept results, no training)."""
    t0 = time.perf_counter()
    cfg.validate()
    coupling, interventions = plan(cfg)  # each experiment's config is validated as plan() makes it
    root = Path(cfg.out)
    kept = Path(cfg.results) if cfg.results else root / "results"
    grid = select([Cell(str((path / c.name).relative_to(root)), c.target, c.config)
                   for path, c in all_cells(coupling, interventions)], cfg.only)
    skipped = 0
    if not cfg.report_only:
        share_controls(interventions)
        restore_results(grid, root, kept)
        results = run_grid(grid, root, backend=cfg.backend, workers=cfg.workers, ray_address=cfg.ray_address,
                           progress=cfg.progress, desc="reproduction runs", on_done=lambda r: keep_result(r, root, kept),
                           ignore_keys=TRACKING_KEYS)
        raise_failures(results)
        skipped = sum(r.skipped for r in results)
    command = " ".join(["python -m sed_lens.experiments.reproduce", *(argv or [])])
    report = Path(cfg.report) if cfg.report else root / "REPRODUCTION.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "source": str(kept),
            "report": str(report), "versions": versions()}
    paths = write_report(kept, report, meta, cfg.replicates)
    summary = {"meta": {**meta, "wall_time_s": time.perf_counter() - t0, "runs": len(grid), "runs_skipped": skipped,
                        "quick": cfg.quick, "seeds": list(coupling.seeds)},
               "report": [str(p) for p in paths], "claims": claim_numbers(load_results(kept))}
    write_json(root / "reproduction.json", summary)
    return summary


def detects(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a reproduction's output directory (its reproduction.json)."""
    return json_has(run_dir / "reproduction.json", "claims")


def report_section(run_dir: Path, figure_dir: Path) -> Section:
    """The report section of an output directory: the reproduction report's blocks, built from its kept results
    (:func:`sed_lens.experiments.reproduction_report.output_section`)."""
    return output_section(run_dir, figure_dir)


def main(argv: Sequence[str] | None = None) -> None:
    ap = parser_for(ReproduceConfig, "python -m sed_lens.experiments.reproduce", __doc__ or "")
    args = list(sys.argv[1:] if argv is None else argv)
    cfg = config_from_args(ReproduceConfig, ap.parse_args(args))
    summary = run(cfg, args)
    print(f"reproduction finished in {summary['meta']['wall_time_s'] / 60:.1f} min; report: {', '.join(summary['report'])}")
    print(json.dumps(summary["claims"], indent=2))


def cli() -> None:
    sys.exit(run_cli(main, prog="reproduce"))


if __name__ == "__main__":
    cli()
