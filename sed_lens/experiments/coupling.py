"""SED–LCH coupling along grokking runs: ``python -m sed_lens.experiments.coupling``.

Single task (default): ops add, sub, mul, sq × seeds 42, 137, 2024; each run trains the paper's model with a
snapshot every 25 steps, then measures at 40 evenly spaced snapshots the coupling R_k of update SED and
gradient SED (W 20, k 3), with the paper's leading window and the causal trailing window. ``--multitask``:
the shared-encoder model with four heads, aggregated update and gradient SED vs per-op gradient SED at 30
snapshots (``--per-op-inputs`` also measures them with the author's per-op gradient batches and probe sets, beside
the shared ones; the reproduction turns it on). ``--window-ablation`` (W ∈ {1, 2, 5, 10, 20, 40}) and
``--eps-ablation`` (finite differences at ε_rel ∈ {0.001, 0.005, 0.05}, JVP as the ε → 0 limit) on add, seed 42.
Every run is a run directory under OUT/cells (rerunning skips finished runs); OUT gets coupling.json, coupling.md
(ours beside the paper's) and plots.
``--no-aggregate`` only runs the cells (one ``wandb agent`` job per cell, see experiments/sweeps/); a later run
with the same flags and OUT skips them and aggregates. W&B: each run logs a table of every R (``coupling/R``), its
figures and an artifact (coupling.json, the SED bases at the peaks, summary); the aggregate is a small run of job
type ``coupling-summary`` (local directory OUT/summary/) with the summary tables, figures and an artifact.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

# Only torch-free modules at the top: flags are parsed (and --help answered) before torch, TransformerLens or
# matplotlib are imported; the functions below import what they need when they run.
from sed_lens.analysis.scan_key import PER_OP, RANDOM, ScanKey, parse_keys
from sed_lens.cli import config_from_args, config_from_dict, parser_for, run_cli
from sed_lens.configs import GridOptions, ModelOptions, ScanConfig, TrackingOptions, TrainConfig, shared
from sed_lens.errors import check
from sed_lens.experiments.cell_id import SINGLE, CellId, parse_cells
from sed_lens.experiments.grokking import TRACKING_KEYS, GrokkingConfig, build, open_run, prepare_resume, train
from sed_lens.grid import Cell, raise_failures, resumable, run_grid
from sed_lens.rendering import (
    Block,
    Details,
    Figure,
    Heading,
    LinePanel,
    Panels,
    Section,
    Table,
    Text,
    figure,
    fixed,
    flatten,
    fmt,
    json_has,
    load_json,
    metric_keys,
    metric_plots,
    other_figures,
    render_markdown_blocks,
    wandb_ids,
)
from sed_lens.tracking import Run, log_summary_run, read_jsonl, to_jsonable, write_json

if TYPE_CHECKING:
    from sed_lens.hooks.snapshots import SnapshotStore
    from sed_lens.subspace import ParamSubspace

WINDOWS = (1, 2, 5, 10, 20, 40)
EPSILONS = (0.001, 0.005, 0.05)
ArtifactsAt = Literal["measured", "peaks"]
"""Which per-snapshot artifacts a finished coupling run keeps (:attr:`CouplingConfig.artifacts_at`)."""

PAPER: dict[str, Any] = {
    "single_update": "≈3–9× (add highest)",
    "single_gradient": "100–330× (4 ops × 3 seeds)",
    "single_gradient_mul": {42: 327, 137: 101, 2024: 217},
    "window": {1: 648, 20: 212, 40: 140},
    "eps": {0.001: 221, 0.005: 212, 0.05: 74},
    "multitask_update": "≤ 1 for every task",
    "multitask_per_op": {"add": 31.5, "sub": 44.9, "mul": 23.8, "sq": 21.8},
}


@dataclass(kw_only=True)
class CouplingConfig(ModelOptions, TrackingOptions, GridOptions):
    """The coupling experiment: which runs, how they train, what is measured, where results go."""

    ops: tuple[str, ...] = field(default=("add", "sub", "mul", "sq"), metadata={
        "help": "ops of the single-task runs", "aliases": ("--op",)})
    seeds: tuple[int, ...] = field(default=(42, 137, 2024), metadata={"help": "seeds", "aliases": ("--seed",)})
    single: bool = field(default=True, metadata={"help": "run the single-task runs (--no-single: only what else is asked)"})
    multitask: bool = field(default=False, metadata={"help": "also run the shared-encoder model with a head per op (all --ops)"})
    window_ablation: bool = field(default=False, metadata={"help": "window-size ablation W in 1,2,5,10,20,40 on the ablation run"})
    eps_ablation: bool = field(default=False, metadata={"help": "finite-difference eps ablation 0.001,0.005,0.05 on the ablation run"})
    ablation_op: str | None = field(default=None, metadata={"help": "op of the ablation run (default: the first op, add)"})
    ablation_seed: int | None = field(default=None, metadata={"help": "seed of the ablation run (default: the first seed, 42)"})
    every: int = field(default=25, metadata={"help": "snapshot interval (steps)"})
    multitask_snapshots: int = field(default=30, metadata={"help": "measured snapshots of a multitask run"})
    multitask_seeds: tuple[int, ...] | None = field(default=None, metadata={
        "help": "seeds of the multitask runs (default: --seeds)"})
    multitask_ops: tuple[str, ...] | None = field(default=None, metadata={
        "help": "ops of the multitask model (default: --ops)"})
    train: TrainConfig = field(default_factory=TrainConfig)
    scan: ScanConfig = field(default_factory=ScanConfig)
    artifacts: bool = field(default=True, metadata={"help": "save per measured snapshot what recomputes its R values"})
    artifacts_at: ArtifactsAt = field(default="measured", metadata={
        "help": "which artifacts a finished run keeps: every measured snapshot's, or (peaks) only those of the "
                "snapshots its reported values come from (each key's peak R̄, peak R₁ and final; ~5× less disk)"})
    aggregate: bool = field(default=True, metadata={
        "help": "after the runs, write the tables, figures and W&B summary run to OUT (--no-aggregate: only run "
                "the cells, e.g. one per wandb agent job; a later run with the same flags aggregates)"})
    out: str = field(default="runs/coupling", metadata={"help": "output directory (rerunning skips finished runs)"})
    from_run: str | None = field(default=None, metadata={
        "help": "analyse an existing grokking run directory saved with --snapshot-every instead of training"})

    def validate(self) -> None:
        """The pieces' checks (task and model, tracking, grid), the training protocol's and the scan's, then the
        grid's own. The op names are checked against the registered ops before the grid runs (:func:`check_ops`)."""
        super().validate()
        check(len(self.seeds) > 0 and len(self.ops) > 0, "name at least one op and one seed (--ops, --seeds).")
        check(not self.multitask or len(self.multitask_ops or self.ops) >= 2,
              "a multitask model needs at least two ops (--multitask-ops or --ops).")
        check(self.every >= 1, f"the snapshot interval must be at least 1, got {self.every} (--every).")
        check(self.multitask_snapshots >= 1,
              f"multitask snapshots must be at least 1, got {self.multitask_snapshots} (--multitask-snapshots).")


# --- one run ------------------------------------------------------------------------------------------------
@resumable
def coupling_cell(config: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Grid target: train one run with snapshots, measure the coupling along it, write the run directory.

    Resumable: the snapshots go to ``RUN_DIR/snapshots`` and training writes checkpoints (every
    ``train.checkpoint_every`` steps), and the scan keeps its measured responses in ``RUN_DIR/responses.pt``. So
    an interrupted cell continues training from its last checkpoint, or its scan from the last measured
    snapshot, and returns the same summary as an uninterrupted one. The snapshots and the responses file are
    deleted when the cell is complete (the per-snapshot artifacts keep what recomputes every reported R).

    With ``train.post_grok_steps`` the run goes on past the stop rule and is scanned twice from the same
    trajectory: as the stop-rule run (its snapshots up to the stop step, the published protocol) and as the
    post-grok run (the same measured snapshots continued at the same spacing to the end). Each length is scanned
    for every analysis seed. ``coupling.json`` holds the main scan (stop-rule run, analysis seed 0); the returned
    summary (``cell.json``) holds every scan in compact form (:func:`compact_scan`)."""
    from sed_lens.analysis.trajectory import save_bases
    from sed_lens.hooks.snapshots import SnapshotStore
    from sed_lens.subspace import ParamSubspace
    from sed_lens.training import curves

    gcfg = config_from_dict(GrokkingConfig, {**config["grokking"], "run_dir": run_dir, "progress": False})
    scan = config_from_dict(ScanConfig, config["scan"])
    path = Path(run_dir)
    logged = {"experiment": "coupling", **config}
    resume = prepare_resume(path, logged)
    store = SnapshotStore(config["every"], path / "snapshots")
    with open_run(gcfg, logged, job_type="coupling", resume=resume) as tracker:
        result, task, model = train(gcfg, tracker, [store], resume=resume)
        subspace = ParamSubspace.attention(model)
        scans = scan_lengths(model, task, store, scan, result, subspace, stop_acc=gcfg.train.stop_acc,
                             artifacts=path / "artifacts" if config["artifacts"] else None,
                             artifacts_at=config.get("artifacts_at", "measured"),
                             responses=path / "responses.pt", streams="live")
        main = scans["stop_rule"][0]
        t_scanned = time.perf_counter()
        figs = write_outputs(tracker.dir, main, result.history, task.ops)
        save_bases(tracker.dir / "sed_bases.pt", scans["bases"], main["summary"], subspace, scan)
        tracker.summary({"coupling": main["summary"]})
        log_run(tracker, main, figs, gcfg.seed)
    shutil.rmtree(path / "snapshots", ignore_errors=True)  # ≈1.2 MB per snapshot: only an interrupted cell needs them
    shutil.rmtree(path / "streams", ignore_errors=True)  # stream files an interrupted cell of an older sed_lens left
    (path / "responses.pt").unlink(missing_ok=True)
    # over every attempt of an interrupted cell: the trainer's wall time and the scan's own clock carry across resumes
    timings = {"train": result.wall_time, "scan": scans["elapsed"], "outputs": time.perf_counter() - t_scanned,
               "scan_parts": scans["timings"], "measured_directions": scans["measured_directions"]}
    return {"timings": to_jsonable(timings), "train": result.summary(), "coupling": main["summary"], "measured": main["measured"],
            "scans": {length: {str(a): compact_scan(out) for a, out in scans[length].items()}
                      for length in ("stop_rule", "post_grok") if length in scans},
            "history": curves(result.history, task.ops)}


def scan_lengths(model: Any, task: Any, store: SnapshotStore, scan: ScanConfig, result: Any, subspace: ParamSubspace,
                 stop_acc: float = 0.98, artifacts: Path | None = None, responses: Path | None = None,
                 streams: str | Path = "memory", artifacts_at: str = "measured") -> dict[str, Any]:
    """Scans of one trained trajectory: ``{"stop_rule": {seed: scan}, "post_grok": {seed: scan}, "bases": …}``
    (``post_grok`` only when the run trained past its stop rule). The stop-rule run is the snapshots up to the step
    at which the stop rule fired (all of them when it never fired or training stopped there). ``streams``: where the
    scan's stream vectors live (:class:`~sed_lens.analysis.trajectory.TrajectoryScan`; a grid cell uses ``"live"``)."""
    from sed_lens.analysis.trajectory import TrajectoryScan, extended_indices, phase_bounds, snapshot_indices

    steps = list(store.steps)
    n_stop = len(steps) if result.stop_step is None else sum(1 for s in steps if s <= result.stop_step)
    measured = snapshot_indices(n_stop, scan.n_snapshots)
    lengths = {"stop_rule": (n_stop, measured)}
    if n_stop < len(steps):
        lengths["post_grok"] = (len(steps), extended_indices(measured, len(steps)))
    phases = {op: phase_bounds(result.history, op, end_acc=stop_acc) for op in task.ops}
    engine = TrajectoryScan(model, task, store, scan, subspace, progress=False, responses=responses, streams=streams)
    out: dict[str, Any] = {name: {} for name in lengths}
    bases: dict[str, Any] = {}
    for a in range(scan.analysis_seeds):
        for name, (n, idx) in lengths.items():
            main = a == 0 and name == "stop_rule"
            out[name][a] = engine.run(n, idx, analysis_seed=a, artifacts=artifacts if main else None,
                                      bases_out=bases if main else None, bases_at="headline", phases=phases,
                                      artifacts_at=artifacts_at)
        engine.drop_streams(a)
    out["bases"] = bases
    out["timings"], out["measured_directions"] = engine.timings, engine.measured_directions
    out["elapsed"] = engine.elapsed
    return out


def compact_scan(out: dict[str, Any]) -> dict[str, Any]:
    """A scan without what the reports do not read (per-direction responses, spectra, artifacts' inputs): per op and
    key the R_j and R̄ series over the measured snapshots, the median random response, the summary. A_j is
    R_j × the median random response — for the keys of the author's per-op inputs (``…/per_op``), × the median
    random response on that op's own probes (``random_median_per_op_inputs``, only when they were measured)."""
    series: dict[str, dict[str, dict[str, list[Any]]]] = {}
    medians: dict[str, list[float]] = {}
    own_medians: dict[str, list[float]] = {}
    for row in out["snapshots"]:
        for op, keys in row["ops"].items():
            medians.setdefault(op, []).append(keys["random"]["median"])
            own = [res["median_random"] for key, res in parse_keys(keys).items() if key.inputs is not None]
            if own:
                own_medians.setdefault(op, []).append(own[0])
            for key, res in keys.items():
                if key == "random":
                    continue
                s = series.setdefault(op, {}).setdefault(key, {"step": [], "R": [], "R_mean": []})
                s["step"].append(row["step"])
                s["R"].append([round(float(x), 5) for x in res["R"]])
                s["R_mean"].append(round(float(res["R_mean"]), 5))
    return {"measured": out["measured"], "n_snapshots_total": out["n_snapshots_total"],
            "last_step": out["steps_all"][-1], "analysis_seed": out.get("analysis_seed", 0),
            "phases": out.get("phases", {}), "random_median": medians,
            **({"random_median_per_op_inputs": own_medians} if own_medians else {}), "series": series,
            "summary": out["summary"]}


def write_outputs(run_dir: Path, out: dict[str, Any], history: Sequence[dict[str, Any]], ops: Sequence[str]) -> dict[str, Path]:
    """``coupling.json`` and one ``coupling_OP.png`` per op; returns the figures by op."""
    from sed_lens import plots

    write_json(run_dir / "coupling.json", out)
    return {op: plots.coupling_trajectory(out, history, op, run_dir / f"coupling_{op}.png",
                                          title=f"SED–LCH coupling, {op} ({run_dir.name})") for op in ops}


def log_run(tracker: Run, out: dict[str, Any], figs: dict[str, Path], seed: int) -> None:
    """W&B side of one coupling run: R̄ and R_1 of every main key and per-op-inputs key as metrics over
    ``coupling/step`` (the training step of each measured snapshot), the table of every R (ablations included), the
    figures, and an artifact with coupling.json, the SED bases at the peaks (sed_bases.pt) and the summary — not the
    per-snapshot artifacts (large; kept locally)."""
    tracker.define_metric("coupling/*", "coupling/step")
    for row in out["snapshots"]:
        metrics: dict[str, Any] = {"coupling/step": row["step"]}
        for op, keys in row["ops"].items():
            for key, res in parse_keys(keys).items():
                if key.is_main or key.inputs is not None:  # ablation variants go to the table only
                    metrics[f"coupling/{op}/{key}/R_mean"] = res["R_mean"]
                    metrics[f"coupling/{op}/{key}/R_1"] = res["R"][0]
        tracker.log_wandb(metrics)
    columns, rows = coupling_table(out, seed)
    tracker.log_table("coupling/R", columns, rows)
    tracker.log_images({f"figures/coupling_{op}": path for op, path in figs.items()})
    files = [tracker.dir / f for f in ("coupling.json", "sed_bases.pt", "summary.json", "config.json")]
    tracker.log_artifact(f"coupling-{tracker.dir.name}-{tracker.wandb_id}", "coupling", [f for f in files if f.is_file()],
                         {"measured": out["measured"], "summary": out["summary"]})


def coupling_table(coupling: dict[str, Any], seed: int) -> tuple[list[str], list[list[Any]]]:
    """Every R of one run's ``coupling.json`` as table rows, one per (snapshot, op, key): op, seed, step, key,
    source, align, variant (ablation), R_1..R_k (None where a key has fewer directions), R̄ and the median
    random response."""
    k = max((len(res["R"]) for row in coupling["snapshots"] for keys in row["ops"].values()
             for key, res in keys.items() if key != RANDOM), default=0)
    columns = ["op", "seed", "step", "key", "source", "align", "variant", *[f"R_{j + 1}" for j in range(k)],
               "R_mean", "A_random_median"]
    rows: list[list[Any]] = []
    for row in coupling["snapshots"]:
        for op, keys in row["ops"].items():
            for key, res in parse_keys(keys).items():
                R = list(res["R"]) + [None] * (k - len(res["R"]))
                rows.append([op, seed, row["step"], str(key), key.stream, key.align, key.variant, *R, res["R_mean"],
                             keys[RANDOM]["median"]])
    return columns, rows


def paper_for(op: str, key: ScanKey, seed: int | None, multitask: bool) -> str:
    """The paper's number for a key of one run's coupling summary (what it measures, and its value), or "—"."""
    lead = "leading"
    if key.window is not None and key.main == ScanKey("gradient", lead):
        return f"peak R₁ {PAPER['window'][key.window]}" if key.window in PAPER["window"] else "—"
    if key.fd_eps is not None:
        return f"peak R₁ {PAPER['eps'][key.fd_eps]}" if key.fd_eps in PAPER["eps"] else "—"
    if multitask:
        key = key.main if key.inputs is not None else key  # the per-op inputs read the same claims
        if key == ScanKey("task_gradient", lead, op) and op in PAPER["multitask_per_op"]:
            return f"peak R̄ {PAPER['multitask_per_op'][op]}"
        return f"peak R̄ {PAPER['multitask_update']}" if key == ScanKey("update", lead) else "—"
    if key == ScanKey("gradient", lead):
        if op == "mul" and seed in PAPER["single_gradient_mul"]:
            return f"peak R̄ {PAPER['single_gradient_mul'][seed]}"
        return "peak R̄ 100–330 (range over 4 ops × 3 seeds)"
    return "R̄ ≈3–9 (add highest)" if key == ScanKey("update", lead) else "—"


def analyse_existing(cfg: CouplingConfig) -> dict[str, Any]:
    """``--from-run``: the coupling of a grokking run saved with ``--snapshot-every``."""
    from sed_lens.analysis.trajectory import scan_coupling
    from sed_lens.hooks.snapshots import SnapshotStore

    src = Path(cfg.from_run or "")
    check((src / "config.json").is_file(), f"{src} is not a grokking run directory (no config.json).")
    snap_dir = src / "snapshots"
    check(snap_dir.is_dir() and any(snap_dir.glob("step_*.pt")),
          f"{src} has no saved snapshots; train it with --snapshot-every 25 to analyse it afterwards.")
    saved = json.loads((src / "config.json").read_text())
    gcfg = config_from_dict(GrokkingConfig, {k: v for k, v in saved.items() if k != "experiment"})
    task, model = build(gcfg)
    store = SnapshotStore.load(snap_dir, gcfg.snapshot_every)
    out_dir = Path(cfg.out) / f"from-{src.name}"
    scan = replace(cfg.scan, n_snapshots=cfg.multitask_snapshots if task.multitask else cfg.scan.n_snapshots)
    out = scan_coupling(model, task, store, scan, artifacts=out_dir / "artifacts" if cfg.artifacts else None,
                        progress=cfg.progress, artifacts_at=cfg.artifacts_at)
    write_outputs(out_dir, out, read_jsonl(src / "metrics.jsonl"), task.ops)
    print(f"coupling of {src}: {out_dir / 'coupling.json'}")
    for op in task.ops:
        for key, s in out["summary"][op].items():
            print(f"  {op:>4} {key:<28} peak R̄ {s['peak_R_mean']:8.2f} at step {s['peak_step']:5d}, final {s['final_R_mean']:8.2f}")
    return out


# --- the grid -----------------------------------------------------------------------------------------------
def ablation_run(cfg: CouplingConfig) -> tuple[str, int]:
    """(op, seed) of the run that carries the ablations."""
    return (cfg.ablation_op or cfg.ops[0], cfg.ablation_seed if cfg.ablation_seed is not None else cfg.seeds[0])


def cells(cfg: CouplingConfig) -> list[Cell]:
    """One cell per single-task (op, seed), per multitask seed; ablations ride on the ablation run. A cell's scan
    config is :meth:`ScanConfig.to_dict`, and ``per_op_inputs`` (which only a multitask run measures) is left off
    the single-task cells, so their configs are those of runs kept before the option existed."""
    ab_op, ab_seed = ablation_run(cfg)
    target = "sed_lens.experiments.coupling:coupling_cell"

    def gconfig(ops: tuple[str, ...], seed: int) -> dict[str, Any]:
        # --progress is not handed on (a cell never shows a bar): cell configs stay the same whatever it was.
        g = GrokkingConfig(ops=ops, seed=seed, train=cfg.train, sed=(), **shared(cfg, ModelOptions),
                           wandb_mode=cfg.wandb_mode, wandb_project=cfg.wandb_project)
        return g.to_dict()

    out: list[Cell] = []
    single_scan = replace(cfg.scan, per_op_inputs=False)
    if cfg.single:
        for op in cfg.ops:
            for seed in cfg.seeds:
                scan = single_scan
                if op == ab_op and seed == ab_seed:
                    scan = replace(scan, ablation_windows=WINDOWS if cfg.window_ablation else (),
                                   ablation_eps=EPSILONS if cfg.eps_ablation else ())
                out.append(Cell(CellId.single(op, seed).name, target, {
                    "grokking": gconfig((op,), seed), "scan": scan.to_dict(), "every": cfg.every,
                    "artifacts": cfg.artifacts, "artifacts_at": cfg.artifacts_at}))
    elif cfg.window_ablation or cfg.eps_ablation:
        scan = replace(single_scan, ablation_windows=WINDOWS if cfg.window_ablation else (),
                       ablation_eps=EPSILONS if cfg.eps_ablation else ())
        out.append(Cell(CellId.single(ab_op, ab_seed).name, target, {
            "grokking": gconfig((ab_op,), ab_seed), "scan": scan.to_dict(), "every": cfg.every,
            "artifacts": cfg.artifacts, "artifacts_at": cfg.artifacts_at}))
    if cfg.multitask:
        for seed in cfg.multitask_seeds or cfg.seeds:
            scan = replace(cfg.scan, n_snapshots=cfg.multitask_snapshots)
            out.append(Cell(CellId.multitask(seed).name, target, {
                "grokking": gconfig(tuple(cfg.multitask_ops or cfg.ops), seed), "scan": scan.to_dict(),
                "every": cfg.every, "artifacts": cfg.artifacts, "artifacts_at": cfg.artifacts_at}))
    return out


def tables(cfg: CouplingConfig, results: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The Markdown report (the blocks of :func:`table_blocks` under one title) and the aggregate numbers."""
    blocks, agg = table_blocks(cfg, results)
    return render_markdown_blocks([Heading("SED–LCH coupling", 1), *blocks], None) + "\n", agg


def table_blocks(cfg: CouplingConfig, results: dict[str, dict[str, Any]],
                 level: int = 2) -> tuple[list[Block], dict[str, Any]]:
    """The coupling tables, ours beside the paper's, as blocks (headings at ``level``, notes, tables), and the
    aggregate numbers."""
    blocks: list[Block] = []
    agg: dict[str, Any] = {"single": {}, "multitask": {}, "window_ablation": {}, "eps_ablation": {}}
    lead, trail = "leading", "trailing"
    runs = parse_cells(results)
    single = {c: v for c, v in runs.items() if c.kind == SINGLE}
    if single:
        blocks += [Heading("Single task: update SED vs gradient SED", level),
                   Text(f"Peak and mean R̄ over {cfg.scan.n_snapshots} evenly spaced snapshots; leading window (paper's "
                        "code) and trailing (causal). Paper: update-SED R̄ " + PAPER["single_update"] + "; gradient-SED "
                        "peak R̄ " + PAPER["single_gradient"] + ", mul per seed 327, 101, 217.")]
        rows: list[list[str]] = []
        for cell, res in single.items():
            op = str(cell.op)
            s = parse_keys(res["coupling"][op])
            u, g, gt = s.get(ScanKey("update", lead), {}), s.get(ScanKey("gradient", lead), {}), s.get(ScanKey("gradient", trail), {})
            ratio = g.get("peak_R_mean", np.nan) / u.get("peak_R_mean", np.nan) if u else np.nan
            paper = PAPER["single_gradient_mul"].get(cell.seed) if op == "mul" else None
            rows.append([op, str(cell.seed), str(res["train"]["grok_step"].get(op)), fixed(u.get("peak_R_mean")),
                         fixed(u.get("mean_R_mean")), fixed(g.get("peak_R_mean")), fixed(gt.get("peak_R_mean")),
                         f"{fixed(ratio)}×", str(paper) if paper is not None else "100–330 (range)"])
            agg["single"][cell.name] = {"update_peak": u.get("peak_R_mean"), "update_mean": u.get("mean_R_mean"),
                                   "gradient_peak": g.get("peak_R_mean"), "gradient_peak_trailing": gt.get("peak_R_mean"),
                                   "ratio": ratio}
        blocks.append(Table(["op", "seed", "grok step", "update peak R̄ (lead)", "update mean R̄ (lead)",
                             "gradient peak R̄ (lead)", "gradient peak R̄ (trail)", "gradient / update (peak, lead)",
                             "paper gradient peak"], rows))
        by_op: dict[str, list[dict[str, Any]]] = {}
        for cell in single:
            by_op.setdefault(str(cell.op), []).append(agg["single"][cell.name])
        per_op: list[list[str]] = []
        for op, op_rows in by_op.items():
            up = np.array([r["update_peak"] for r in op_rows], float)
            gp = np.array([r["gradient_peak"] for r in op_rows], float)
            per_op.append([op, f"{np.nanmean(up):.1f} ± {np.nanstd(up):.1f}", f"{np.nanmean(gp):.1f} ± {np.nanstd(gp):.1f}",
                           f"{np.nanmean(gp / up):.1f}×"])
        blocks.append(Table(["op", "update peak R̄ (mean ± sd over seeds)", "gradient peak R̄ (mean ± sd)", "ratio (mean)"],
                            per_op))
    ab_op, ab_seed = ablation_run(cfg)
    ab_cell = CellId.single(ab_op, ab_seed)
    if ab_cell in runs:
        s = parse_keys(runs[ab_cell]["coupling"][ab_op])
        if any(k.window is not None for k in s):
            window_rows: list[list[str]] = []
            for w in WINDOWS:
                lw, tw = s.get(ScanKey("gradient", lead, window=w), {}), s.get(ScanKey("gradient", trail, window=w), {})
                window_rows.append([str(w), fixed(lw.get("peak_R1")), fixed(tw.get("peak_R1")), str(PAPER["window"].get(w, "—"))])
                agg["window_ablation"][w] = {"leading": lw.get("peak_R1"), "trailing": tw.get("peak_R1")}
            blocks += [Heading(f"Window ablation ({ab_op}, seed {ab_seed}): peak R₁ of gradient SED", level),
                       Table(["W", "ours, leading", "ours, trailing", "paper"], window_rows)]
        if any(k.fd_eps is not None for k in s):
            eps_rows: list[list[str]] = []
            for e in EPSILONS:
                fe = s.get(ScanKey("gradient", lead, fd_eps=e), {})
                eps_rows.append([f"{e:g}", fixed(fe.get("peak_R1")), str(PAPER["eps"].get(e, "—"))])
                agg["eps_ablation"][e] = fe.get("peak_R1")
            jv = s.get(ScanKey("gradient", lead), {}).get("peak_R1")
            eps_rows.append(["→ 0 (exact JVP)", fixed(jv), "—"])
            agg["eps_ablation"]["jvp"] = jv
            blocks += [Heading(f"ε ablation ({ab_op}, seed {ab_seed}): peak R₁ of gradient SED (W {cfg.scan.window}, "
                               "leading)", level),
                       Table(["ε_rel", "ours (finite difference)", "paper"], eps_rows)]
    multi = {c: v for c, v in runs.items() if c.is_multitask}
    if multi:
        blocks += [Heading("Multitask: aggregated vs per-op SED", level),
                   Text(f"Peak R̄ over {cfg.multitask_snapshots} snapshots, leading window, each op's own centroids; "
                        "the median R̄ of the aggregated update SED per phase (pre-grok / transition / post-grok). Two "
                        "readings where measured: *standard* — one gradient batch and one probe set shared by all ops; "
                        "*per-op inputs* — the author's conventions (`--per-op-inputs`): each op's own gradient batch "
                        "(for its per-op gradient SED) and probe set, drawn as a single-op task of that op would (pairs "
                        "from 1..p-1 for mul only). Paper: aggregated update SED " + PAPER["multitask_update"]
                        + "; per-op gradient SED add 31.5, sub 44.9, mul 23.8, sq 21.8.")]
        multi_rows: list[list[str]] = []
        for cell, res in multi.items():
            for op, by_key in res["coupling"].items():
                s = parse_keys(by_key)
                entry: dict[str, Any] = {"seed": cell.seed}
                for reading, inputs in (("standard", None), ("per-op inputs", PER_OP)):
                    u, g, t = (s.get(multitask_key(k, inputs), {}) for k in (
                        ScanKey("update", lead), ScanKey("gradient", lead), ScanKey("task_gradient", lead, op)))
                    if inputs is not None and not (u or g or t):
                        continue  # the variant was not measured
                    ph = u.get("phase_median_R_mean") or {}
                    multi_rows.append([str(cell.seed), op, str(res["train"]["grok_step"].get(op)), reading,
                                       fixed(u.get("peak_R_mean"), 2),
                                       " / ".join(fixed(ph.get(x), 2) for x in ("pre", "transition", "post")),
                                       fixed(g.get("peak_R_mean"), 2), fixed(t.get("peak_R_mean"), 2),
                                       f"update {PAPER['multitask_update']}; per-op {PAPER['multitask_per_op'].get(op, '—')}"])
                    numbers = {"update_peak": u.get("peak_R_mean"), "update_phase_median": ph or None,
                               "gradient_peak": g.get("peak_R_mean"), "per_op_peak": t.get("peak_R_mean")}
                    entry.update(numbers if inputs is None else {"per_op_inputs": numbers})
                agg["multitask"].setdefault(op, []).append(entry)
        blocks.append(Table(["seed", "op", "grok step", "reading", "aggregated update peak R̄",
                             "aggregated update median R̄ pre / transition / post", "aggregated gradient peak R̄",
                             "per-op gradient peak R̄", "paper"], multi_rows))
    return blocks, agg


def multitask_key(key: ScanKey, inputs: str | None) -> ScanKey:
    """``key`` under the standard inputs (``inputs`` None) or as its ``per_op`` variant."""
    return key if inputs is None else key.with_inputs(inputs)


def figures(cfg: CouplingConfig, out: Path, couplings: dict[str, dict[str, Any]], agg: dict[str, Any],
            reuse: Path | None = None) -> list[Path]:
    """The aggregate figures, drawn into ``out``; with ``reuse``, a figure that directory already holds is
    returned as it is instead of being drawn again (the report regenerates only what a directory lacks)."""
    from sed_lens import plots

    figs: list[Path] = []

    def draw(name: str, make: Any) -> None:
        kept = reuse / name if reuse is not None else None
        figs.append(kept if kept is not None and kept.is_file() else make(out / name))

    runs = parse_cells(couplings)
    lead = "leading"

    def multitask_keys(op: str) -> list[ScanKey]:
        return [ScanKey("update", lead), ScanKey("gradient", lead), ScanKey("task_gradient", lead, op)]

    single = {cell: c for cell, c in runs.items() if cell.kind == SINGLE}
    if single:
        panels: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for cell, c in single.items():
            panels.setdefault(str(cell.op), []).append((cell.name, c))
        single_keys = [ScanKey("update", lead), ScanKey("gradient", lead), ScanKey("gradient", "trailing")]
        draw("coupling_single.png", lambda path: plots.coupling_panels(
            panels, path, lambda op: single_keys, "Single task: R̄ of update vs gradient SED (seeds overlaid)"))
    for cell, c in runs.items():
        if cell.is_multitask:
            name = cell.name
            mt_panels = {op: [(name, c)] for op in c["summary"]}
            draw(f"coupling_{name}.png", lambda path, mt_panels=mt_panels, name=name: plots.coupling_panels(
                mt_panels, path, multitask_keys, f"Multitask ({name}): aggregated vs per-op SED"))
    if agg["window_ablation"]:
        ws = sorted(agg["window_ablation"])
        draw("window_ablation.png", lambda path: plots.ablation(
            ws, [agg["window_ablation"][w]["leading"] for w in ws], path, "window W (snapshots)",
            "Window ablation: peak R₁ of gradient SED", paper={float(k): v for k, v in PAPER["window"].items()}))
    if agg["eps_ablation"]:
        es = [e for e in EPSILONS if e in agg["eps_ablation"]]
        jv = agg["eps_ablation"].get("jvp")
        draw("eps_ablation.png", lambda path: plots.ablation(
            es, [agg["eps_ablation"][e] for e in es], path, "ε_rel", "ε ablation: finite differences vs exact JVP",
            paper=PAPER["eps"], reference=("exact JVP (ε → 0)", jv) if jv is not None else None))
    return figs


def aggregate_tables(agg: dict[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """The aggregate numbers of :func:`tables` as W&B tables (ours beside the paper's), by name; empty ones left out."""
    out: dict[str, tuple[list[str], list[list[Any]]]] = {}
    if agg["single"]:
        rows = []
        for cell, a in parse_cells(agg["single"]).items():  # keyed by run name: agg is the aggregate's JSON
            op, seed = cell.op, cell.seed
            paper = PAPER["single_gradient_mul"].get(seed) if op == "mul" else None
            rows.append([cell.name, op, seed, a["update_peak"], a["update_mean"], a["gradient_peak"],
                         a["gradient_peak_trailing"], a["ratio"], str(paper) if paper is not None else "100–330"])
        out["single"] = (["run", "op", "seed", "update_peak_R_mean", "update_mean_R_mean", "gradient_peak_R_mean",
                          "gradient_peak_R_mean_trailing", "gradient_over_update", "paper_gradient_peak"], rows)
    if agg["multitask"]:
        def variant(r: dict[str, Any], what: str) -> Any:
            return (r.get("per_op_inputs") or {}).get(what)

        out["multitask"] = (["seed", "op", "update_peak_R_mean", "gradient_peak_R_mean", "per_op_gradient_peak_R_mean",
                             "per_op_inputs/update_peak_R_mean", "per_op_inputs/gradient_peak_R_mean",
                             "per_op_inputs/per_op_gradient_peak_R_mean", "paper_per_op_peak"],
                            [[r["seed"], op, r["update_peak"], r["gradient_peak"], r["per_op_peak"],
                              variant(r, "update_peak"), variant(r, "gradient_peak"), variant(r, "per_op_peak"),
                              PAPER["multitask_per_op"].get(op)] for op, rs in agg["multitask"].items() for r in rs])
    if agg["window_ablation"]:
        out["window_ablation"] = (["W", "peak_R1_leading", "peak_R1_trailing", "paper"],
                                  [[int(w), a["leading"], a["trailing"], PAPER["window"].get(int(w))]
                                   for w, a in agg["window_ablation"].items()])
    if agg["eps_ablation"]:
        out["eps_ablation"] = (["eps_rel", "peak_R1", "paper"],
                               [["→ 0 (exact JVP)" if e == "jvp" else f"{float(e):g}", v,
                                 None if e == "jvp" else PAPER["eps"].get(float(e))] for e, v in agg["eps_ablation"].items()])
    return out


def log_coupling_summary(cfg: CouplingConfig, out: Path, agg: dict[str, Any], figs: Sequence[Path],
                    runs: Sequence[str]) -> Run | None:
    """The aggregate's own small W&B run (job type ``coupling-summary``, local directory OUT/summary/coupling-TIME):
    the summary tables, the figures, and coupling.json + coupling.md as an artifact. None when W&B is disabled."""
    tables = {f"coupling/summary/{name}": t for name, t in aggregate_tables(agg).items()}
    return log_summary_run(out, "coupling-summary", asdict(cfg), wandb_mode=cfg.wandb_mode,
                                project=cfg.wandb_project, job_type="coupling-summary", tables=tables,
                                images={f"figures/{f.stem}": f for f in figs},
                                files=[out / "coupling.json", out / "coupling.md"], summary={"runs": sorted(runs)})


# --- the report section -------------------------------------------------------------------------------------
def _is_output_dir(run_dir: Path) -> bool:
    return json_has(run_dir / "coupling.json", "aggregate") and (run_dir / "cells").is_dir()


def detects(run_dir: Path) -> bool:
    """Whether ``run_dir`` is this experiment's OUT (coupling.json with the aggregate, and cells/) or one coupling
    run (a coupling.json with its snapshots)."""
    return _is_output_dir(run_dir) or json_has(run_dir / "coupling.json", "snapshots")


def report_section(run_dir: Path, figure_dir: Path) -> Section:
    """The report section of an OUT (:func:`output_section`) or of one coupling run (:func:`run_section`); figures
    the directory lacks are regenerated into ``figure_dir``."""
    return output_section(run_dir, figure_dir) if _is_output_dir(run_dir) else run_section(run_dir, figure_dir)


def coupling_plots(ops_keys: dict[str, Sequence[str]]) -> list[LinePanel]:
    """Per op, R̄ of its SED streams over the training step of the measured snapshots (as coupling runs log it)."""
    from sed_lens.analysis.scan_key import ScanKey

    return [LinePanel(f"coupling R̄, {op}", [f"coupling/{op}/{k}/R_mean" for k in keys
                                             if ScanKey.parse(k).is_main or ScanKey.parse(k).inputs is not None],
                      log_y=True, x="coupling/step") for op, keys in ops_keys.items()]


def output_section(run_dir: Path, figure_dir: Path) -> Section:
    """The experiment's OUT: the tables of coupling.md (ours beside the paper's, recomputed from coupling.json), the
    aggregate figures, and the runs."""
    data = load_json(run_dir / "coupling.json")
    cfg = config_from_dict(CouplingConfig, data["config"])
    runs: dict[str, Any] = data["runs"]
    table, agg = table_blocks(cfg, runs, level=3)
    blocks: list[Block] = [Text(f"{len(runs)} run{'' if len(runs) == 1 else 's'} under {run_dir / 'cells'}, each a run "
                                "directory of its own (pass one to the report for its R̄ trajectories)."), *table]
    cells = [run_dir / "cells" / name for name in runs]
    blocks.append(Heading("Runs"))
    blocks.append(Table(["run", "grok step", "steps", "measured snapshots", "directory"],
                        [[name, ", ".join(f"{op} {fmt(g)}" for op, g in res["train"]["grok_step"].items()),
                          fmt(res["train"]["steps"]), fmt(len(res.get("measured", []))), str(run_dir / "cells" / name)]
                         for name, res in runs.items()]))
    couplings = {c.name: load_json(c / "coupling.json") for c in cells if (c / "coupling.json").is_file()}
    figs = [Figure(p, p.stem.replace("_", " ") + ("" if p.parent == run_dir else " (regenerated from the runs' data)"))
            for p in figures(cfg, figure_dir, couplings, agg, reuse=run_dir)]
    blocks += figs + other_figures(run_dir, figs)
    blocks.append(Details("configuration", flatten(data["config"])))
    summaries = sorted((run_dir / "summary").glob("*/run.json"))
    panels = Panels(run_ids=wandb_ids(*cells, *(p.parent for p in summaries[-1:])),
                    line_plots=metric_plots(metric_keys(*(c / "metrics.jsonl" for c in cells))) + coupling_plots(
                        {op: sorted({k for c in couplings.values() for k in c["summary"].get(op, {})})
                         for op in sorted({op for c in couplings.values() for op in c["summary"]})}),
                    tables=[f"coupling/summary/{n}" for n, v in agg.items() if v] + ["coupling/R"],
                    images=[f"figures/{f.path.stem}" for f in figs if f.path.parent == run_dir])
    return Section(f"SED–LCH coupling: {run_dir.name}", "coupling", run_dir, blocks, panels)


def run_section(run_dir: Path, figure_dir: Path) -> Section:
    """One coupling run: peak / final R̄ of every SED stream per op beside the paper, the R̄ trajectories."""
    from sed_lens import plots  # here, not at the top: `--help` stays fast

    coupling = load_json(run_dir / "coupling.json")
    config = load_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else {"scan": coupling["config"]}
    summary = load_json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else {}
    history = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    ops = list(coupling["summary"])
    seed = config.get("grokking", {}).get("seed")
    blocks: list[Block] = [Text(f"Coupling R̄ = mean of R_1..R_k (A(SED direction) / median A(random)) at "
                                f"{len(coupling['measured'])} of {coupling['n_snapshots_total']} snapshots; "
                                "leading window = the paper's code, trailing = causal.")]
    if "grok_step" in summary:
        blocks.append(Table(["op", "grok step", "final train acc", "final test acc"],
                            [[op, fmt(summary["grok_step"].get(op)), fmt(summary["final"].get(f"train/acc/{op}")),
                              fmt(summary["final"].get(f"test/acc/{op}"))] for op in ops], "training"))
    blocks.append(Table(["op", "SED stream", "peak R̄", "at step", "final R̄", "mean R̄", "peak R₁", "paper"],
                        [[op, str(key), fmt(s["peak_R_mean"]), fmt(s["peak_step"]), fmt(s["final_R_mean"]),
                          fmt(s["mean_R_mean"]), fmt(s["peak_R1"]), paper_for(op, key, seed, len(ops) > 1)]
                         for op in ops for key, s in parse_keys(coupling["summary"][op]).items()],
                        "coupling per op and SED stream, ours beside the paper's"))

    def trajectory(op: str) -> Callable[[Path], Path]:
        return lambda path: plots.coupling_trajectory(coupling, history, op, path)

    figs = [figure(run_dir, f"coupling_{op}.png", figure_dir, f"R̄ over training, {op}", trajectory(op)) for op in ops]
    blocks += figs + other_figures(run_dir, figs)
    blocks.append(Details("configuration", flatten(config)))
    panels = Panels(wandb_ids(run_dir), metric_plots(metric_keys(run_dir / "metrics.jsonl"))
                    + coupling_plots({op: list(coupling["summary"][op]) for op in ops}), ["coupling/R"],
                    [f"figures/coupling_{op}" for op in ops])
    return Section(f"Coupling run: {run_dir.name}", "coupling-run", run_dir, blocks, panels)


def check_ops(cfg: CouplingConfig) -> None:
    """Every op ``cfg`` names is registered (:func:`sed_lens.tasks.available_ops`; it imports torch, so it is not
    part of :meth:`CouplingConfig.validate`, which runs when a config is made)."""
    from sed_lens.tasks import available_ops

    for op in (*cfg.ops, *(cfg.multitask_ops or ()), *([cfg.ablation_op] if cfg.ablation_op else [])):
        check(op in available_ops(), f"unknown op {op!r}; choose from {', '.join(available_ops())}.")


def run(cfg: CouplingConfig) -> dict[str, Any]:
    """Run (or complete) the grid of ``cfg``; write OUT/coupling.json, coupling.md and the figures."""
    cfg.validate()
    check_ops(cfg)
    grid = cells(cfg)
    check(len(grid) > 0, "nothing to run: --no-single without --multitask or an ablation.")
    out = Path(cfg.out)
    results = run_grid(grid, out / "cells", backend=cfg.backend, workers=cfg.workers, ray_address=cfg.ray_address,
                       progress=cfg.progress, desc="coupling runs", ignore_keys=TRACKING_KEYS)
    raise_failures(results)
    if not cfg.aggregate:
        return {"config": asdict(cfg), "runs": {r.name: r.summary for r in results}, "aggregated": False,
                "skipped": sum(r.skipped for r in results)}
    done = {r.name: r.summary for r in results if r.summary is not None}
    couplings = {r.name: json.loads((Path(r.run_dir) / "coupling.json").read_text()) for r in results}
    md, agg = tables(cfg, done)
    figs = figures(cfg, out, couplings, agg)
    md += "\n## Figures\n\n" + "\n".join(f"![{f.stem}]({f.name})" for f in figs) + "\n"
    (out / "coupling.md").write_text(md)
    result = {"config": asdict(cfg), "runs": done, "aggregate": agg, "figures": [str(f) for f in figs],
              "table": str(out / "coupling.md"), "skipped": sum(r.skipped for r in results), "aggregated": True}
    write_json(out / "coupling.json", result)
    summary_run = log_coupling_summary(cfg, out, agg, figs, list(done))
    result["summary_run"] = str(summary_run.dir) if summary_run is not None else None
    result["sync_hint"] = summary_run.sync_hint() if summary_run is not None else None
    return result


def main(argv: Sequence[str] | None = None) -> None:
    ap = parser_for(CouplingConfig, "python -m sed_lens.experiments.coupling", __doc__ or "")
    cfg = config_from_args(CouplingConfig, ap.parse_args(argv))
    if cfg.from_run:
        analyse_existing(cfg)
        return
    result = run(cfg)
    out = Path(cfg.out)
    done = f" ({result['skipped']} already finished)" if result["skipped"] else ""
    if not result["aggregated"]:
        print(f"{len(result['runs'])} runs complete in {out / 'cells'}{done} (not aggregated: --no-aggregate)")
        return
    print(Path(result["table"]).read_text())
    print(f"results: {out / 'coupling.md'}, {out / 'coupling.json'}; runs in {out / 'cells'}{done}")
    if result["summary_run"] is not None:
        hint = result["sync_hint"]
        print(f"W&B summary run: {result['summary_run']}"
              + (f" (upload: {hint}; each run: wandb sync {out / 'cells'}/*/wandb/offline-run-*)" if hint else ""))


def cli() -> None:
    sys.exit(run_cli(main, prog="coupling"))


if __name__ == "__main__":
    cli()
