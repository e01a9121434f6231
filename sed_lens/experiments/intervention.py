"""Does constraining attention updates to a rank-k subspace speed up grokking? ``python -m sed_lens.experiments.intervention``

The intervention of Xu (2026, §3): five conditions × seeds, each a normal grokking run directory under --out,
run through the grid runner (reruns with the same --out skip finished runs):
  A control · B remove SED · C keep only SED · D remove a random rank-k subspace · E keep only a random one,
with the projection applied to the attention gradient after clipping (--method gradient, the paper's correct
method) or to the applied update after the optimizer step (--method update, the flawed one). Grok step = first
eval with test accuracy ≥ grok-acc; speedup = mean control grok step / mean condition grok step. By default
each run stops at its grok step (--no-stop-at-grok trains to the paper's stop rule).

Writes to --out: intervention.json (every run's grok step; per condition the mean, std, min and max over
seeds and the speedup, with the per-seed spread), intervention.md (the table beside the paper's numbers),
accuracy.png (test accuracy vs step, one colour per condition, one thin line per seed) and speedup.png.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Only torch-free modules at the top: flags are parsed (and --help answered) before torch, TransformerLens or
# matplotlib are imported; the functions below import what they need when they run.
from sed_lens.cli import config_from_args, config_from_dict, csv, parser_for, run_cli
from sed_lens.configs import ApplyTo, GridOptions, ModelOptions, TrackingOptions, TrainConfig, get_preset, shared
from sed_lens.errors import check
from sed_lens.experiments import grokking
from sed_lens.experiments.cell_id import CellId
from sed_lens.experiments.grokking import TRACKING_KEYS, GrokkingConfig
from sed_lens.grid import Cell, raise_failures, resumable, run_grid
from sed_lens.rendering import (
    Block,
    Details,
    Heading,
    Panels,
    Section,
    Table,
    Text,
    figure,
    flatten,
    json_has,
    load_json,
    metric_keys,
    metric_plots,
    other_figures,
    render_markdown_blocks,
    wandb_ids,
)
from sed_lens.tracking import log_summary_run, read_jsonl, to_jsonable, write_json

TARGET = "sed_lens.experiments.intervention:grid_cell"


@dataclass(frozen=True)
class Condition:
    code: str
    label: str
    mode: str  # SubspaceProjection mode
    basis: str  # SubspaceProjection basis

    @property
    def slug(self) -> str:
        return self.label.lower().replace(" ", "-")


CONDITIONS: dict[str, Condition] = {c.code: c for c in (
    Condition("A", "control", "none", "sed"),
    Condition("B", "remove SED", "remove", "sed"),
    Condition("C", "keep SED", "keep", "sed"),
    Condition("D", "remove random", "remove", "random"),
    Condition("E", "keep random", "keep", "random"),
)}

# Xu (2026) §4: grok step (mean of seeds 42, 137, 2024) and speedup, k = 3, W = 20, p = 97, PyTorch-default init.
# The update-projection artefact (remove SED 1.21×) is reported without grok steps; the paper does not publish
# the mul numbers.
PAPER_SETUP = "p = 97, k = 3, W = 20, seeds 42, 137, 2024, PyTorch-default init"
PAPER: dict[tuple[str, str], dict[str, tuple[int | None, float]]] = {
    ("add", "gradient"): {"A": (3358, 1.00), "B": (3300, 1.02), "C": (1525, 2.20), "D": (3358, 1.00), "E": (1425, 2.36)},
    ("add", "update"): {"B": (None, 1.21)},
}


@dataclass
class InterventionTrainConfig(TrainConfig):
    """The paper's protocol, except that a run stops at its grok step (all this experiment measures)."""

    stop_at_grok: bool = field(default=True, metadata={
        "help": "stop each run at its grok step (--no-stop-at-grok: train to the paper's stop rule)"})


@dataclass(kw_only=True)
class InterventionConfig(ModelOptions, TrackingOptions, GridOptions):
    """The five-condition intervention grid for one op and one projection method."""

    op: str = field(default="add", metadata={"help": "op (add, sub, mul, sq or a registered op)"})
    seeds: tuple[int, ...] = field(default=(42, 137, 2024), metadata={
        "help": "comma-separated seeds (split, initialisation, batches and random bases)", "parse": csv(int),
        "metavar": "SEEDS"})
    method: ApplyTo = field(default="gradient", metadata={
        "help": "where the projection acts: gradient (after clipping, before the optimizer step; the paper's "
                "correct method) or update (the applied update, after the step; the flawed method)"})
    conditions: tuple[str, ...] = field(default=tuple(CONDITIONS), metadata={
        "help": "comma-separated conditions: A control, B remove SED, C keep SED, D remove random, E keep random",
        "parse": csv(str.upper), "metavar": "CODES"})
    k: int = field(default=3, metadata={"help": "rank of the subspace kept or removed"})
    window: int = field(default=20, metadata={"help": "SED window W: the last W applied attention vectors"})
    warmup: int | None = field(default=None, metadata={
        "help": "steps without projection at the start (default: the window, i.e. until it is full)"})
    train: InterventionTrainConfig = field(default_factory=InterventionTrainConfig)
    out: str | None = field(default=None, metadata={
        "help": "output directory: one run directory per run, the JSON, table and figures "
                "(default: runs/intervention/OP-pP-METHOD)"})

    def validate(self) -> None:
        """The pieces' checks (task and model, tracking, grid), the training protocol's, then the grid's own (the
        projection's k, window and warm-up, as :class:`sed_lens.hooks.interventions.SubspaceProjection` takes
        them). The op is checked against the registered ops before the grid runs (:func:`run`)."""
        super().validate()
        check(len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds),
              f"seeds must be distinct and at least one, got {list(self.seeds)} (--seeds).")
        bad = [c for c in self.conditions if c not in CONDITIONS]
        check(not bad, f"unknown condition {bad[0] if bad else ''} (--conditions); choose from {', '.join(CONDITIONS)}.")
        check(len(self.conditions) > 0 and len(set(self.conditions)) == len(self.conditions),
              "conditions must be distinct and at least one (--conditions).")
        check(self.k >= 1, f"k must be a positive integer, got {self.k} (--k).")
        check(self.window >= self.k, f"the window must hold at least k={self.k} vectors, got window={self.window} (--window).")
        warmup = self.window if self.warmup is None else self.warmup
        check(warmup >= 0, f"warmup must be non-negative, got {warmup} (--warmup).")
        projects_sed = any(CONDITIONS[c].basis == "sed" and CONDITIONS[c].mode != "none" for c in self.conditions)
        check(not projects_sed or warmup >= 1,
              "the SED basis needs at least one applied vector before projecting: use --warmup 1 or more.")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / "intervention" / f"{self.op}-p{self.p}-{self.method}"


# --- the grid ---------------------------------------------------------------------------------------------
def cell_name(code: str, seed: int) -> str:
    """The run directory of condition ``code`` with ``seed`` (``A-control-s42``)."""
    return CellId.intervention(code, CONDITIONS[code].slug, seed).name


def cells(cfg: InterventionConfig) -> list[Cell]:
    """One grid cell per (condition, seed): a grokking config plus the projection's settings."""
    out = []
    for code in cfg.conditions:
        cond = CONDITIONS[code]
        for seed in cfg.seeds:
            grok = GrokkingConfig(ops=(cfg.op,), seed=seed, train=TrainConfig(**asdict(cfg.train)), sed=(),
                                  **shared(cfg, ModelOptions), wandb_mode=cfg.wandb_mode,
                                  wandb_project=cfg.wandb_project)
            grok_dict = {k: v for k, v in grok.to_dict().items() if k not in ("run_dir", "progress")}
            # The control changes nothing, whatever it would act on: one canonical config, so the gradient and
            # update grids of the same op can share their control runs.
            apply_to = cfg.method if cond.mode != "none" else "gradient"
            projection = {"k": cfg.k, "mode": cond.mode, "basis": cond.basis, "apply_to": apply_to,
                          "window": cfg.window, "warmup": cfg.warmup, "seed": seed}
            config = {"condition": code, "grokking": grok_dict, "projection": projection}
            out.append(Cell(cell_name(code, seed), TARGET, to_jsonable(config)))
    return out


@resumable
def grid_cell(config: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Grid target: one grokking run with a :class:`SubspaceProjection` callback, in ``run_dir``. Resumable: an
    interrupted run continues from its last checkpoint (the projection's SED window included) with the same
    result as an uninterrupted one. A finished cell is never continued (the grid skips it), so its last checkpoint
    is written ``final``: model, optimizer and step, without the projection's window (≈ 3.5 MB instead of 14 MB for
    the paper's model, W = 20); continuing from it is refused."""
    from sed_lens.hooks.interventions import SubspaceProjection
    from sed_lens.training import curves

    grok = config_from_dict(GrokkingConfig, {**config["grokking"], "run_dir": run_dir, "progress": False})
    grok = grokking.resolved(grok)
    resume = grokking.prepare_resume(run_dir, {"experiment": "grokking", **grok.to_dict()})
    projection = SubspaceProjection(**config["projection"])
    result, _ = grokking.run(grok, [projection], resume=resume, final=True)
    return {**result.summary(), "condition": config["condition"], "intervention": projection.describe(),
            "history": curves(result.history, grok.ops)}


# --- aggregation ------------------------------------------------------------------------------------------
def matched_speedup(control: Mapping[int, float], condition: Mapping[int, float]) -> float | None:
    """Mean control grok step / mean condition grok step over the seeds both have (None without any, or when the
    condition's mean is 0)."""
    seeds = [s for s in condition if s in control]
    if not seeds:
        return None
    cond = statistics.fmean(condition[s] for s in seeds)
    return statistics.fmean(control[s] for s in seeds) / cond if cond > 0 else None


def aggregate(runs: Sequence[Mapping[str, Any]], conditions: Sequence[str], control: str = "A") -> dict[str, Any]:
    """Per-condition statistics of the grok steps of ``runs`` (``{"condition", "seed", "grok_step", "steps"}``).

    A run that never grokked counts at its last step and marks the condition ``censored`` (its mean is then a
    lower bound). ``std`` is the sample standard deviation over seeds (0 for one seed). ``speedup`` = mean control
    grok step / mean condition grok step, both over the seeds that have the control and the condition;
    ``speedup_per_seed`` pairs the runs by seed (control seed s / condition seed s) and gives the spread.
    """
    by: dict[str, dict[int, float]] = {c: {} for c in conditions}
    censored: dict[str, int] = dict.fromkeys(conditions, 0)
    for r in runs:
        g = r["grok_step"]
        by[r["condition"]][int(r["seed"])] = float(g if g is not None else r["steps"])
        censored[r["condition"]] += g is None
    out: dict[str, Any] = {}
    ctrl = by.get(control, {})
    for c in conditions:
        vals = list(by[c].values())
        check(len(vals) > 0, f"condition {c} has no finished runs.")
        mean = statistics.fmean(vals)
        per_seed = [ctrl[s] / v for s, v in sorted(by[c].items()) if s in ctrl and v > 0]
        out[c] = {"grok_steps": [by[c][s] for s in sorted(by[c])], "seeds": sorted(by[c]), "mean": mean,
                  "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "min": min(vals), "max": max(vals),
                  "n_runs": len(vals), "censored": censored[c],
                  "speedup": matched_speedup(ctrl, by[c]),
                  "speedup_per_seed": per_seed,
                  "speedup_min": min(per_seed) if per_seed else None,
                  "speedup_max": max(per_seed) if per_seed else None,
                  "speedup_std": statistics.stdev(per_seed) if len(per_seed) > 1 else (0.0 if per_seed else None)}
    return out


def accuracy_curve(run_dir: str | Path, op: str) -> tuple[list[int], list[float]]:
    """(steps, test accuracies of ``op``) logged in a run's ``metrics.jsonl``."""
    rows = [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if f"test/acc/{op}" in r]
    return [int(r["step"]) for r in rows], [float(r[f"test/acc/{op}"]) for r in rows]


# --- reporting --------------------------------------------------------------------------------------------
def _fmt_steps(s: Mapping[str, Any]) -> str:
    lower = "≥ " if s["censored"] else ""
    return f"{lower}{s['mean']:.0f} ± {s['std']:.0f} ({s['min']:.0f}–{s['max']:.0f})"


def _fmt_speedup(s: Mapping[str, Any]) -> str:
    if s["speedup"] is None:
        return "—"
    spread = f" ({s['speedup_min']:.2f}–{s['speedup_max']:.2f})" if s["speedup_min"] is not None else ""
    return f"{s['speedup']:.2f}×{spread}"


def result_blocks(result: Mapping[str, Any], level: int = 2) -> list[Block]:
    """The results table beside the paper's numbers, under a heading at ``level``, with notes."""
    cfg = result["config"]
    paper = PAPER.get((cfg["op"], cfg["method"]), {})
    init = cfg["init"] or get_preset(cfg["preset"]).default_init
    rows = []
    for code, s in result["conditions"].items():
        pg, ps = paper.get(code, (None, None))
        rows.append([f"{code} {CONDITIONS[code].label}", _fmt_steps(s), _fmt_speedup(s),
                     str(pg) if pg is not None else "—", f"{ps:.2f}×" if ps is not None else "—"])
    notes = [f"Grok step: first eval (every {cfg['train']['eval_every']} steps) with test accuracy ≥ "
             f"{cfg['train']['grok_acc']}. Speedup: mean control grok step / mean condition grok step; the range "
             "is over seeds (control seed s / condition seed s). std: sample standard deviation over seeds.",
             f"Projection: k = {cfg['k']}, window W = {cfg['window']}, warm-up {result['warmup']} steps, on the "
             f"{'attention gradient after clipping' if cfg['method'] == 'gradient' else 'applied attention update'}; "
             f"initialisation {init}" + (" (the paper's: step counts comparable)." if init == "torch"
                                         else " (not the paper's: compare speedups, not step counts).")]
    if any(s["censored"] for s in result["conditions"].values()):
        notes.append(f"≥: some runs of that condition did not grok within {cfg['train']['steps']} steps and count at "
                     "their last step (the mean is a lower bound).")
    if not paper:
        notes.append("The paper publishes no numbers for this op and method (— in the paper columns).")
    else:
        notes.append(f"Paper columns: Xu (2026) §4, {PAPER_SETUP}.")
    if paper and cfg["method"] == "update":
        notes.append("The paper reports only the remove-SED speedup for the update projection (an optimizer-pipeline "
                     "artefact, 1.21×); it does not state the op, shown here for add.")
    return [Heading(f"Rank-{cfg['k']} attention {cfg['method']} projection: {cfg['op']} mod {cfg['p']}, "
                    f"seeds {', '.join(map(str, cfg['seeds']))}", level),
            Table(["condition", "grok step: mean ± std (min–max)", "speedup (per-seed range)", "paper grok step",
                   "paper speedup"], rows),
            *[Text(n) for n in notes]]


def result_markdown(result: Mapping[str, Any]) -> str:
    """intervention.md: :func:`result_blocks` as Markdown."""
    return render_markdown_blocks(result_blocks(result), None) + "\n"


def detects(run_dir: Path) -> bool:
    """Whether ``run_dir`` is this experiment's output directory (its intervention.json)."""
    return json_has(run_dir / "intervention.json", "conditions")


def report_section(run_dir: Path, figure_dir: Path) -> Section:
    """The output directory: the results table beside the paper's with its notes, the runs, the accuracy and
    speedup figures (redrawn into ``figure_dir`` when the directory lacks them), the configuration."""
    result = load_json(run_dir / "intervention.json")
    blocks = result_blocks(result, level=3)
    runs = result.get("runs", [])
    if runs:
        blocks += [Heading("Runs"),
                   Table(["condition", "seed", "grok step", "steps", "directory"],
                         [[f"{r['condition']} {CONDITIONS[r['condition']].label}", str(r["seed"]),
                           str(r["grok_step"]) if r["grok_step"] is not None else "—", str(r["steps"]),
                           str(r.get("run_dir", "—"))] for r in runs])]

    def redraw(key: str) -> Any:
        return lambda path: Path(figures(result, path.parent)[key])

    figs = [figure(run_dir, "accuracy.png", figure_dir, "test accuracy over training, one line per run", redraw("accuracy")),
            figure(run_dir, "speedup.png", figure_dir, "speedup per condition (whiskers: range over seeds)", redraw("speedup"))]
    blocks += figs + other_figures(run_dir, figs)
    blocks.append(Details("configuration", flatten(result.get("config", {}))))
    subdirs = [d for d in sorted(run_dir.iterdir()) if d.is_dir()]
    panels = Panels(wandb_ids(run_dir, *subdirs),
                    metric_plots(metric_keys(run_dir / "metrics.jsonl", *(d / "metrics.jsonl" for d in subdirs))))
    return Section(f"Intervention: {run_dir.name}", "intervention", run_dir, blocks, panels)


def figures(result: Mapping[str, Any], out: Path) -> dict[str, str]:
    """accuracy.png (test accuracy vs step per run) and speedup.png (speedup per condition, seed spread)."""
    from sed_lens import plots

    cfg = result["config"]
    where = f"{cfg['op']} mod {cfg['p']}, rank-{cfg['k']} {cfg['method']} projection"
    colors = {f"{c} {CONDITIONS[c].label}": plots.color(i) for i, c in enumerate(CONDITIONS)}
    groups: dict[str, list[plots.Curve]] = {}
    for r in result["runs"]:
        groups.setdefault(f"{r['condition']} {CONDITIONS[r['condition']].label}", []).append(
            (r["curve"]["step"], r["curve"]["test_acc"]))
    fig = plots.curve_overlay(groups, f"Test accuracy: {where}", "optimizer step", "test accuracy",
                              hline=cfg["train"]["grok_acc"], hline_label="grok threshold", colors=colors)
    acc = plots.save_figure(fig, out / "accuracy.png")
    codes = list(result["conditions"])
    stats = [result["conditions"][c] for c in codes]
    paper = PAPER.get((cfg["op"], cfg["method"]), {})
    fig = plots.bar_chart([f"{c}\n{CONDITIONS[c].label}" for c in codes], [s["speedup"] for s in stats],
                          f"Grokking speedup: {where}", "speedup (mean control / mean condition grok step)",
                          lower=[s["speedup_min"] for s in stats], upper=[s["speedup_max"] for s in stats],
                          reference=[paper.get(c, (None, None))[1] for c in codes],
                          reference_label="paper (p = 97, k = 3, W = 20)",
                          baseline=1.0, colors=[colors[f"{c} {CONDITIONS[c].label}"] for c in codes],
                          xlabel="condition (error bars: range over seeds)")
    sp = plots.save_figure(fig, out / "speedup.png")
    return {"accuracy": str(acc), "speedup": str(sp)}


# --- the experiment ---------------------------------------------------------------------------------------
def run(cfg: InterventionConfig) -> dict[str, Any]:
    """Run (or complete) the grid of ``cfg`` and write the JSON, table and figures; returns the JSON's content."""
    from sed_lens.tasks import ModularArithmetic

    cfg.validate()
    ModularArithmetic(cfg.p, (cfg.op,), cfg.train_frac, cfg.seeds[0])  # the op is registered (p prime if it needs)
    out = cfg.out_dir
    cell_list = cells(cfg)
    results = run_grid(cell_list, out, backend=cfg.backend, workers=cfg.workers, threads=1,
                       ray_address=cfg.ray_address, progress=cfg.progress, desc=f"intervention {cfg.op} {cfg.method}",
                       ignore_keys=TRACKING_KEYS)
    raise_failures(results)
    runs = []
    for c, r in zip(cell_list, results, strict=True):
        assert r.summary is not None
        steps, accs = accuracy_curve(r.run_dir, cfg.op)
        runs.append({"condition": c.config["condition"], "seed": c.config["grokking"]["seed"],
                     "grok_step": r.summary["grok_step"][cfg.op], "steps": r.summary["steps"],
                     "wall_time_s": r.summary.get("wall_time_s"), "run_dir": r.run_dir, "skipped": r.skipped,
                     "projected_steps": r.summary.get("intervention", {}).get("projected_steps"),
                     "mean_kept_fraction": r.summary.get("intervention", {}).get("mean_kept_fraction"),
                     "curve": {"step": steps, "test_acc": accs}})
    warmup = cfg.window if cfg.warmup is None else cfg.warmup
    paper = PAPER.get((cfg.op, cfg.method), {})
    result: dict[str, Any] = {
        "config": asdict(cfg), "warmup": warmup, "runs": runs,
        "conditions": aggregate(runs, cfg.conditions),
        "paper": {c: {"grok_step": g, "speedup": s} for c, (g, s) in paper.items()},
    }
    for code, s in result["conditions"].items():
        s["label"] = CONDITIONS[code].label
        s["mode"], s["basis"] = CONDITIONS[code].mode, CONDITIONS[code].basis
    result["figures"] = figures(result, out)
    table = result_markdown(result)
    (out / "intervention.md").write_text(table)
    result["table"] = str(out / "intervention.md")
    write_json(out / "intervention.json", result)
    runs_table = (["condition", "label", "seed", "grok_step", "steps", "run_dir"],
                  [[r["condition"], CONDITIONS[r["condition"]].label, r["seed"], r["grok_step"], r["steps"], r["run_dir"]]
                   for r in runs])
    stats_table = (["condition", "label", "mean_grok_step", "std", "min", "max", "speedup", "speedup_min", "speedup_max",
                    "paper_grok_step", "paper_speedup"],
                   [[c, s["label"], s["mean"], s["std"], s["min"], s["max"], s["speedup"], s["speedup_min"],
                     s["speedup_max"], *paper.get(c, (None, None))] for c, s in result["conditions"].items()])
    log_summary_run(out, f"intervention-{cfg.op}-{cfg.method}", asdict(cfg), wandb_mode=cfg.wandb_mode,
                    project=cfg.wandb_project, job_type="intervention-summary",
                    tables={"intervention/runs": runs_table, "intervention/conditions": stats_table},
                    images={f"figures/{k}": v for k, v in result["figures"].items()},
                    files=[out / "intervention.json", out / "intervention.md"],
                    summary={c: s["speedup"] for c, s in result["conditions"].items()})
    return result


def main(argv: Sequence[str] | None = None) -> None:
    ap = parser_for(InterventionConfig, "python -m sed_lens.experiments.intervention", __doc__ or "")
    cfg = config_from_args(InterventionConfig, ap.parse_args(argv))
    result = run(cfg)
    print(Path(result["table"]).read_text())
    skipped = sum(r["skipped"] for r in result["runs"])
    print(f"{len(result['runs'])} runs in {cfg.out_dir}" + (f" ({skipped} already finished)" if skipped else ""))
    print(f"results: {cfg.out_dir / 'intervention.json'}; figures: {result['figures']['accuracy']}, "
          f"{result['figures']['speedup']}")


def cli() -> None:
    sys.exit(run_cli(main, prog="intervention"))


if __name__ == "__main__":
    cli()
