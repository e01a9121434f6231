"""SED at the induction-head phase change: ``python -m sed_lens.experiments.induction``.

Olsson et al. (2022)'s 2-layer attention-only transformer (preset ``olsson2022``) trained on repeated random
segments (:class:`sed_lens.induction.InductionTask`: the repeat's length and start vary per sequence, so only a
previous-token head feeding an induction head can copy) forms its induction circuit suddenly: the second-copy
loss drops. Per seed this experiment

1. trains with live update and gradient SED (``GradientCapture``) and in-memory snapshots, recording every head's
   previous-token and induction score at each eval and the phase change (first eval with the second-copy test
   loss at half its starting value) and its bounds (10 % and 90 % of the way of the strongest layer-1 induction
   score to its peak) from the run's own curves;
2. measures the coupling R̄ of the update and gradient SED bases at evenly spaced snapshots
   (:class:`sed_lens.analysis.trajectory.TrajectoryScan`, leading and trailing windows) with the median R̄ before,
   during and after the phase change;
3. shows which heads the SED directions live in (``ParamSubspace.head_view``) beside the heads that become the
   previous-token and induction heads;
4. trains again under a rank-k projection of the attention gradient (remove SED, remove a random subspace; keep
   variants on request) and compares the phase-change step with the control (the main run: its capture
   callbacks do not change the trajectory). Projected runs stop at their phase change.

Every run is a run directory under --out (the seed's main run ``sS``, the projected runs ``sS-CONDITION``), run
through the grid runner (reruns skip finished runs). Writes to --out: induction.json (compact typed results),
induction.md, losses.png (second- and first-copy loss, ICL score, phase change marked), head_scores.png (per-head
scores over training), coupling.png (R̄ of update and gradient SED over training, phases shaded) and
intervention.png (phase-change step per condition); the aggregate is logged to W&B like the other experiments.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Only torch-free modules at the top: flags are parsed (and --help answered) before torch is imported.
from sed_lens.cli import config_from_args, config_from_dict, csv, parser_for, run_cli
from sed_lens.configs import SEQUENCE_PRESETS, TRACKING_FIELDS, GridOptions, Source, TrackingOptions, TrainConfig
from sed_lens.errors import check
from sed_lens.experiments.intervention import CONDITIONS
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
    fmt,
    json_has,
    load_json,
    metric_keys,
    metric_plots,
    other_figures,
    render_markdown_blocks,
    wandb_ids,
)
from sed_lens.tracking import log_summary_run, to_jsonable, write_json

TARGET = "sed_lens.experiments.induction:grid_cell"
OP = "next"
PHASES = ("pre", "transition", "post")
PHASE_LABELS = {"pre": "before", "transition": "during", "post": "after"}
STREAMS: tuple[Source, ...] = ("gradient", "update")
INDUCTION_RISE = 0.2
"""The strongest layer-1 induction score must rise more than this for a phase change to have bounds."""


@dataclass
class InductionTrainConfig(TrainConfig):
    """Training on the induction task: AdamW with a small weight decay, fresh batches every step, no stop rule."""

    steps: int = field(default=2000, metadata={"help": "optimizer steps of the main runs (and the most a projected run takes)"})
    batch_size: int = field(default=32, metadata={"help": "fresh sequences per step"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW decoupled weight decay"})
    eval_every: int = field(default=25, metadata={"help": "evaluate (losses, head scores) every N steps"})
    stop_patience: int = field(default=0, metadata={"help": "early stop after this many evals at stop-acc (0 disables)"})
    checkpoint_every: int = field(default=0, metadata={"help": "write a resumable checkpoint every N steps (0 disables)"})


@dataclass(kw_only=True)
class InductionConfig(TrackingOptions, GridOptions):
    """Seeds × (a main run with SED, coupling and head views + projected runs) on the induction task."""

    seeds: tuple[int, ...] = field(default=(42, 137, 2024), metadata={
        "help": "comma-separated seeds (data, initialisation, batches, random bases)", "parse": csv(int),
        "metavar": "SEEDS"})
    vocab: int = field(default=64, metadata={"help": "content tokens"})
    half_len: int = field(default=16, metadata={"help": "L, the longest repeated segment"})
    min_len: int | None = field(default=None, metadata={"help": "shortest repeated segment (default max(2, L // 2))"})
    pad: int | None = field(default=None, metadata={"help": "filler tokens beyond two copies of the longest segment (default L)"})
    n_eval: int = field(default=256, metadata={"help": "sequences in the fixed train and test sets"})
    preset: str = field(default="olsson2022", metadata={"help": "sequence model preset"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, mps or auto"})
    train: InductionTrainConfig = field(default_factory=InductionTrainConfig)
    sed_window: int = field(default=20, metadata={"help": "SED window W (snapshots)"})
    sed_k: int = field(default=3, metadata={"help": "SED directions k"})
    sed_every: int = field(default=25, metadata={"help": "SED / snapshot interval (steps)"})
    grad_batch: int = field(default=256, metadata={"help": "sequences in the fixed gradient batch"})
    n_snapshots: int = field(default=40, metadata={"help": "evenly spaced snapshots at which the coupling is measured"})
    n_probes: int = field(default=128, metadata={"help": "probe sequences of the centroids"})
    n_random: int = field(default=12, metadata={"help": "random directions per measured snapshot"})
    conditions: tuple[str, ...] = field(default=("A", "B", "D"), metadata={
        "help": "comma-separated projection conditions: A control (the main run), B remove SED, C keep SED, "
                "D remove random, E keep random", "parse": csv(str.upper), "metavar": "CODES"})
    k: int = field(default=3, metadata={"help": "rank of the subspace kept or removed"})
    window: int = field(default=20, metadata={"help": "projection SED window: the last W applied gradients"})
    out: str | None = field(default=None, metadata={"help": "output directory (default: runs/induction/vV-LL)"})

    def validate(self) -> None:
        super().validate()
        check(len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds) and min(self.seeds) >= 0,
              f"seeds must be distinct, non-negative and at least one, got {list(self.seeds)} (--seeds).")
        check(self.preset in SEQUENCE_PRESETS, f"unknown preset {self.preset!r} (--preset); choose "
                                               f"{', '.join(SEQUENCE_PRESETS)}.")
        check(self.device.split(":")[0] in ("auto", "cpu", "cuda", "mps"), f"unknown device {self.device!r} (--device).")
        check(self.half_len >= 2, f"half-len must be at least 2, got {self.half_len} (--half-len).")
        check(self.n_eval >= 1, f"n-eval must be positive, got {self.n_eval} (--n-eval).")
        check(self.train.steps >= 1, f"steps must be positive, got {self.train.steps} (--steps).")
        check(1 <= self.sed_k <= self.sed_window, f"need 1 <= sed-k <= sed-window, got {self.sed_k}, {self.sed_window}.")
        check(self.sed_every >= 1, f"sed-every must be at least 1, got {self.sed_every} (--sed-every).")
        check(self.train.steps // self.sed_every >= 1, "training must span at least two snapshots: raise --steps or "
                                                       "lower --sed-every.")
        check(self.n_snapshots >= 2, f"n-snapshots must be at least 2, got {self.n_snapshots} (--n-snapshots).")
        for name in ("grad_batch", "n_probes", "n_random"):
            check(getattr(self, name) >= 1, f"{name.replace('_', '-')} must be positive (--{name.replace('_', '-')}).")
        bad = [c for c in self.conditions if c not in CONDITIONS]
        check(not bad, f"unknown condition {bad[0] if bad else ''} (--conditions); choose from {', '.join(CONDITIONS)}.")
        check(len(self.conditions) > 0 and len(set(self.conditions)) == len(self.conditions),
              "conditions must be distinct and at least one (--conditions).")
        check(1 <= self.k <= self.window, f"need 1 <= k <= window, got k={self.k}, window={self.window} (--k, --window).")

    def task_args(self) -> dict[str, Any]:
        return {"vocab": self.vocab, "half_len": self.half_len, "n_eval": self.n_eval, "min_len": self.min_len,
                "pad": self.pad}

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / "induction" / f"v{self.vocab}-L{self.half_len}"


# --- the grid ---------------------------------------------------------------------------------------------
def cell_name(code: str, seed: int) -> str:
    """``s42`` (the main run: SED, coupling, head views; the control) or ``s42-remove-sed``."""
    return f"s{seed}" if code == "A" else f"s{seed}-{CONDITIONS[code].slug}"


def cells(cfg: InductionConfig) -> list[Any]:
    """Per seed the main run, then every projected condition (the control is the main run)."""
    from sed_lens.grid import Cell

    common = {"task": cfg.task_args(), "preset": cfg.preset, "device": cfg.device, "train": cfg.train.to_dict(),
              "wandb_mode": cfg.wandb_mode, "wandb_project": cfg.wandb_project, "progress": False}
    out = []
    for seed in cfg.seeds:
        main = {**common, "kind": "main", "seed": seed,
                "sed": {"window": cfg.sed_window, "k": cfg.sed_k, "every": cfg.sed_every, "batch": cfg.grad_batch},
                "scan": {"n_snapshots": cfg.n_snapshots, "n_probes": cfg.n_probes, "n_random": cfg.n_random}}
        out.append(Cell(cell_name("A", seed), TARGET, to_jsonable(main)))
        for code in cfg.conditions:
            if code == "A":
                continue
            cond = CONDITIONS[code]
            proj = {"k": cfg.k, "mode": cond.mode, "basis": cond.basis, "apply_to": "gradient", "window": cfg.window,
                    "warmup": None, "seed": seed}
            out.append(Cell(cell_name(code, seed), TARGET,
                            to_jsonable({**common, "kind": "projected", "condition": code, "seed": seed, "projection": proj})))
    return out


def head_names(n_layers: int, n_heads: int) -> list[str]:
    return [f"L{layer}H{h}" for layer in range(n_layers) for h in range(n_heads)]


def score_curves(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The eval curves the results keep: step, second-/first-copy test loss, ICL score, accuracy, head scores."""
    rows = [r for r in history if "test/loss/second_half" in r]
    heads = sorted({k.split("/")[-1] for r in rows for k in r if k.startswith("test/prev_token_score/")})
    return {"step": [int(r["step"]) for r in rows],
            "second_half": [float(r["test/loss/second_half"]) for r in rows],
            "first_half": [float(r["test/loss/first_half"]) for r in rows],
            "icl_score": [float(r["test/icl_score"]) for r in rows],
            "acc": [float(r[f"test/acc/{OP}"]) for r in rows],
            "prev_token": {h: [float(r[f"test/prev_token_score/{h}"]) for r in rows] for h in heads},
            "induction": {h: [float(r[f"test/induction_score/{h}"]) for r in rows] for h in heads},
            "induction_max": [float(r["test/induction_score"]) for r in rows]}


class StopAtPhaseChange:
    """A training callback (the :class:`sed_lens.training.Callback` hooks, duck-typed so that this module imports
    no torch at ``--help``) that stops a run at the first eval at which the task reports its phase change."""

    def __init__(self) -> None:
        self.step: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state.get("step")

    def on_train_start(self, trainer: Any) -> None: ...
    def on_before_step(self, trainer: Any) -> None: ...
    def on_after_step(self, trainer: Any) -> None: ...
    def on_train_end(self, trainer: Any) -> None: ...

    def on_eval(self, trainer: Any, metrics: dict[str, Any]) -> None:
        step = trainer.task.milestones([*trainer.history, {"step": trainer.step, **metrics}]).get("phase_change")
        if step is not None:
            self.step = step
            trainer.stopped_early = True


def head_shares(subspace: Any, directions: Any, heads: Sequence[str]) -> dict[str, float]:
    """Mean over the directions of each head's share of the squared norm (W_Q, W_K, W_V, W_O together)."""
    out = dict.fromkeys(heads, 0.0)
    for v in directions:
        view = subspace.head_view(v)
        for (layer, _mat, head, _norm), share in zip(view.rows, view.share(), strict=True):
            if layer is not None and head is not None:
                out[f"L{layer}H{head}"] += share / len(directions)
    return out


def grid_cell(config: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Grid target: one run of the induction task in ``run_dir`` (``kind`` main or projected)."""
    from sed_lens.devices import resolve_device
    from sed_lens.induction import InductionTask, phase_change_bounds
    from sed_lens.models import build_model
    from sed_lens.subspace import ParamSubspace
    from sed_lens.tracking import Run
    from sed_lens.training import Trainer

    seed = int(config["seed"])
    task = InductionTask(seed=seed, **config["task"])
    model = build_model(config["preset"], task, seed=seed, device=resolve_device(config["device"]))
    subspace = ParamSubspace.attention(model)
    train = config_from_dict(InductionTrainConfig, config["train"])
    name = Path(run_dir).name
    callbacks: list[Any] = []
    if config["kind"] == "main":
        from sed_lens.hooks.capture import GradientCapture
        from sed_lens.hooks.snapshots import SnapshotStore

        sed = config["sed"]
        capture = GradientCapture(subspace, STREAMS, window=sed["window"], k=sed["k"], every=sed["every"],
                                  batch_size=sed["batch"], batch_split="train")
        store = SnapshotStore(sed["every"])
        callbacks = [capture, store]
    else:
        from sed_lens.hooks.interventions import SubspaceProjection

        projection = SubspaceProjection(subspace, **config["projection"])
        callbacks = [projection, StopAtPhaseChange()]
    with Run(run_dir, {"experiment": "induction-run", **config}, wandb_mode=config["wandb_mode"],
             project=config["wandb_project"], name=f"induction-{name}", job_type="induction") as tracker:
        result = Trainer(model, task, train, callbacks, run=tracker, progress=config["progress"]).fit()
        curves = score_curves(result.history)
        summary: dict[str, Any] = {"kind": config["kind"], "seed": seed, "steps": result.steps,
                                   "wall_time_s": result.wall_time, "phase_change": result.milestones.get("phase_change"),
                                   "curves": curves}
        if config["kind"] == "projected":
            summary["condition"] = config["condition"]
            summary["intervention"] = projection.describe()
            return summary
        bounds = phase_change_bounds(curves["step"], curves["induction_max"], min_change=INDUCTION_RISE)
        summary["phase_bounds"] = list(bounds)
        summary["final"] = {k: result.final[k] for k in (f"test/loss/{OP}", "test/loss/second_half",
                                                         "test/loss/first_half", "test/icl_score", f"test/acc/{OP}")}
        # coupling along the trajectory
        from sed_lens.analysis.trajectory import TrajectoryScan, snapshot_indices
        from sed_lens.configs import ScanConfig

        sc = config["scan"]
        scan_cfg = ScanConfig(n_snapshots=sc["n_snapshots"], window=sed["window"], k=sed["k"], sources=STREAMS,
                              n_probes=sc["n_probes"], n_random=sc["n_random"], grad_batch_size=sed["batch"],
                              grad_batch_split="train", probe_seed=seed, random_seed=seed)
        bases: dict[str, dict[int, Any]] = {}
        scan = TrajectoryScan(model, task, store, scan_cfg, subspace, progress=False)
        n = len(scan.snaps)
        coupling = scan.run(n, snapshot_indices(n, scan_cfg.n_snapshots), phases={OP: bounds}, bases_out=bases)
        summary["coupling"] = compact_coupling(coupling)
        summary["coupling_timings_s"] = dict(scan.timings)
        # the per-head view: the SED directions at the phase change (leading window) and at the end (live bases)
        heads = head_names(model.cfg.n_layers, model.cfg.n_heads)
        pc = summary["phase_change"]
        view: dict[str, Any] = {}
        for stream in STREAMS:
            key = f"{stream}/leading"
            view[stream] = {"final": head_shares(subspace, capture.bases()[stream]["directions"], heads)}
            if pc is not None and key in bases:
                at = min(bases[key], key=lambda s: abs(s - pc))
                view[stream]["phase_change"] = head_shares(subspace, bases[key][at], heads)
                view[stream]["phase_change_step"] = at
        summary["head_view"] = view
        last = {h: (curves["prev_token"][h][-1], curves["induction"][h][-1]) for h in heads}
        summary["heads"] = {"prev_token_head": max((h for h in heads if h.startswith("L0")), key=lambda h: last[h][0]),
                            "induction_head": max((h for h in heads if not h.startswith("L0")), key=lambda h: last[h][1]),
                            "final_prev_token": {h: v[0] for h, v in last.items()},
                            "final_induction": {h: v[1] for h, v in last.items()}}
        for row in coupling["snapshots"]:
            tracker.log_wandb({f"coupling/{k}/R_mean": v["R_mean"] for k, v in row["ops"][OP].items() if "R_mean" in v}
                              | {"coupling/step": row["step"]})
        tracker.save_json("coupling.json", coupling)
    return summary


def compact_coupling(scan: Mapping[str, Any]) -> dict[str, Any]:
    """What the results keep of a scan: per key the R̄ series, peak, final and phase medians."""
    rows = scan["snapshots"]
    keys = [k for k in scan["summary"][OP]]
    return {"steps": [r["step"] for r in rows],
            "R_mean": {k: [r["ops"][OP][k]["R_mean"] if k in r["ops"][OP] else None for r in rows] for k in keys},
            "summary": scan["summary"][OP], "phases": scan["phases"].get(OP)}


# --- aggregation ------------------------------------------------------------------------------------------
def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"median": None, "mean": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "mean": statistics.fmean(vals), "min": min(vals), "max": max(vals),
            "n": len(vals)}


def aggregate(mains: Sequence[Mapping[str, Any]], projected: Sequence[Mapping[str, Any]],
              conditions: Sequence[str], steps: int) -> dict[str, Any]:
    """Across seeds: phase-change steps, the coupling's phase medians per stream, the gradient / update ratio, and
    per condition the phase-change steps (a run without one counts at its last step: ``censored``) and the delay
    against the control (condition − control, per seed)."""
    out: dict[str, Any] = {"phase_change": {m["seed"]: m["phase_change"] for m in mains}}
    coupling: dict[str, Any] = {}
    for key in ("gradient/leading", "update/leading", "gradient/trailing", "update/trailing"):
        per_phase = {ph: _stats([m["coupling"]["summary"].get(key, {}).get("phase_median_R_mean", {}).get(ph)
                                 for m in mains]) for ph in PHASES}
        coupling[key] = {"phase_median": per_phase,
                         "peak": _stats([m["coupling"]["summary"].get(key, {}).get("peak_R_mean") for m in mains]),
                         "peak_step": [m["coupling"]["summary"].get(key, {}).get("peak_step") for m in mains]}
    ratio: dict[str, Any] = {}
    for align in ("leading", "trailing"):
        ratio[align] = {}
        for ph in PHASES:
            vals = []
            for m in mains:
                s = m["coupling"]["summary"]
                g = s.get(f"gradient/{align}", {}).get("phase_median_R_mean", {}).get(ph)
                u = s.get(f"update/{align}", {}).get("phase_median_R_mean", {}).get(ph)
                vals.append(g / u if g is not None and u else None)
            ratio[align][ph] = _stats(vals)
    out["coupling"], out["gradient_over_update"] = coupling, ratio
    control = {m["seed"]: (m["phase_change"], m["steps"]) for m in mains}
    conds: dict[str, Any] = {}
    for code in conditions:
        runs = [{"seed": m["seed"], "phase_change": m["phase_change"], "steps": m["steps"]} for m in mains] if code == "A" \
            else [{"seed": r["seed"], "phase_change": r["phase_change"], "steps": r["steps"]}
                  for r in projected if r["condition"] == code]
        at = {r["seed"]: r["phase_change"] if r["phase_change"] is not None else steps for r in runs}
        delays = [at[s] - (c if c is not None else steps) for s, (c, _) in control.items() if s in at]
        conds[code] = {"label": CONDITIONS[code].label, "mode": CONDITIONS[code].mode, "basis": CONDITIONS[code].basis,
                       "seeds": sorted(at), "phase_change": [at[s] for s in sorted(at)],
                       "censored": sum(r["phase_change"] is None for r in runs), **_stats(list(at.values())),
                       "delay": _stats(delays), "delay_per_seed": delays}
    out["conditions"] = conds
    return out


# --- figures ----------------------------------------------------------------------------------------------
def _subplots(n: int, title: str, size: tuple[float, float]) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from sed_lens.plots import InlineFigure

    fig = InlineFigure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 1, sharex=True)
    axes[0].set_title(title)
    for ax in axes:
        ax.grid(True, alpha=0.3, linewidth=0.6)
    return fig, axes


def figures(result: Mapping[str, Any], out: Path) -> dict[str, str]:
    """losses.png, head_scores.png, coupling.png and intervention.png from the results alone."""
    from sed_lens import plots

    mains = result["runs"]["main"]
    paths: dict[str, str] = {}
    # losses + ICL score, phase change marked
    fig, (a0, a1) = _subplots(2, "Induction task: test loss by copy and ICL score (dotted: phase change)", (7.5, 6))
    for i, m in enumerate(mains):
        c, cv = plots.color(i), m["curves"]
        a0.plot(cv["step"], cv["second_half"], color=c, label=f"seed {m['seed']}: second copy")
        a0.plot(cv["step"], cv["first_half"], color=c, ls="--", alpha=0.6, label=f"seed {m['seed']}: first copy")
        a1.plot(cv["step"], cv["icl_score"], color=c, label=f"seed {m['seed']}")
        if m["phase_change"] is not None:
            for ax in (a0, a1):
                ax.axvline(m["phase_change"], color=c, ls=":", lw=1)
    a0.set_ylabel("test loss")
    a1.set_ylabel("ICL score (first − second)")
    a1.set_xlabel("step")
    a0.legend(fontsize=7, ncol=2)
    a1.legend(fontsize=7)
    paths["losses"] = str(plots.save_figure(fig, out / "losses.png"))
    # per-head scores
    fig, (b0, b1) = _subplots(2, "Per-head scores over training (one panel row per score; dotted: phase change)", (7.5, 6.5))
    styles = ["-", "--", "-.", ":"]
    for i, m in enumerate(mains):
        cv = m["curves"]
        for j, h in enumerate(sorted(cv["prev_token"])):
            layer = int(h[1:h.index("H")])
            ax, score = (b0, "prev_token") if layer == 0 else (b1, "induction")
            ax.plot(cv["step"], cv[score][h], color=plots.color(i), ls=styles[j % len(styles)], lw=1,
                    label=f"s{m['seed']} {h}" if i == 0 or j == 0 else None)
        if m["phase_change"] is not None:
            for ax in (b0, b1):
                ax.axvline(m["phase_change"], color=plots.color(i), ls=":", lw=1)
    b0.set_ylabel("previous-token score (layer 0)")
    b1.set_ylabel("induction score (layer 1)")
    b1.set_xlabel("step")
    b0.legend(fontsize=6, ncol=3)
    b1.legend(fontsize=6, ncol=3)
    paths["head_scores"] = str(plots.save_figure(fig, out / "head_scores.png"))
    # coupling over training
    fig, ax = plots.new_figure("R̄ of update and gradient SED over training (shaded: the phase change)", "step",
                               "R̄ = mean_j A(v_j) / median A(random)", (7.5, 4.8))
    for i, m in enumerate(mains):
        cp = m["coupling"]
        for key, ls in (("gradient/leading", "-"), ("update/leading", "--")):
            ys = cp["R_mean"].get(key)
            if ys:
                pts = [(s, y) for s, y in zip(cp["steps"], ys, strict=True) if y is not None]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker="o", ms=2.5, color=plots.color(i),
                        label=f"seed {m['seed']}: {key.split('/')[0]} SED")
        lo, hi = m.get("phase_bounds", [None, None])
        if lo is not None and hi is not None:
            ax.axvspan(lo, hi, color=plots.color(i), alpha=0.1)
    ax.axhline(1.0, color="gray", ls=":", lw=1)
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    paths["coupling"] = str(plots.save_figure(fig, out / "coupling.png"))
    # intervention
    conds = result["aggregate"]["conditions"]
    codes = list(conds)
    fig = plots.bar_chart([f"{c}\n{conds[c]['label']}" for c in codes], [conds[c]["mean"] for c in codes],
                          f"Phase-change step under a rank-{result['config']['k']} attention-gradient projection",
                          "phase-change step (mean over seeds)", lower=[conds[c]["min"] for c in codes],
                          upper=[conds[c]["max"] for c in codes], value_format="{:.0f}",
                          baseline=conds["A"]["mean"] if "A" in conds else None,
                          xlabel="condition (error bars: range over seeds)")
    paths["intervention"] = str(plots.save_figure(fig, out / "intervention.png"))
    return paths


# --- the report -------------------------------------------------------------------------------------------
def _top(shares: Mapping[str, float], n: int = 3) -> str:
    return ", ".join(f"{h} {v:.0%}" for h, v in sorted(shares.items(), key=lambda kv: -kv[1])[:n])


def result_blocks(result: Mapping[str, Any], level: int = 2) -> list[Block]:
    """The findings as blocks: phase change and heads per seed, coupling per phase, head view, intervention."""
    cfg, agg, mains = result["config"], result["aggregate"], result["runs"]["main"]
    t = cfg["train"]
    blocks: list[Block] = [Heading(f"Induction heads: SED at the phase change (seeds {', '.join(map(str, cfg['seeds']))})", level),
                           Text(f"Preset {cfg['preset']}, vocab {cfg['vocab']}, repeats of length {result['task']['min_len']}–"
                                f"{cfg['half_len']} at a random start in {result['task']['n_ctx']}-token sequences; AdamW lr "
                                f"{t['lr']}, weight decay {t['weight_decay']}, batch {t['batch_size']}, {t['steps']} steps. "
                                f"SED W = {cfg['sed_window']}, k = {cfg['sed_k']}, every {cfg['sed_every']} steps; "
                                "phase change = first eval with the second-copy test loss at half its first value; "
                                "before / during / after = snapshots before the strongest layer-1 induction score has "
                                "risen 10 % of its way to its peak, between, from 90 % on.")]
    blocks.append(Table(["seed", "phase change", "during (10–90 % of the induction-score rise)", "final 2nd-copy loss", "final ICL score",
                         "prev-token head (score)", "induction head (score)", "wall time (s)"],
                        [[str(m["seed"]), fmt(m["phase_change"]), f"{fmt(m['phase_bounds'][0])}–{fmt(m['phase_bounds'][1])}",
                          fmt(m["final"]["test/loss/second_half"]), fmt(m["final"]["test/icl_score"]),
                          f"{m['heads']['prev_token_head']} ({fmt(m['heads']['final_prev_token'][m['heads']['prev_token_head']])})",
                          f"{m['heads']['induction_head']} ({fmt(m['heads']['final_induction'][m['heads']['induction_head']])})",
                          fmt(m["wall_time_s"], 4)] for m in mains], "phase change and heads per seed"))
    rows = []
    for key, c in agg["coupling"].items():
        pm = c["phase_median"]
        rows.append([key, *[f"{fmt(pm[ph]['median'])} ({fmt(pm[ph]['min'])}–{fmt(pm[ph]['max'])})" for ph in PHASES],
                     f"{fmt(c['peak']['median'])}", ", ".join(fmt(s) for s in c["peak_step"])])
    blocks.append(Table(["SED (window)", *[f"R̄ {PHASE_LABELS[ph]}" for ph in PHASES], "peak R̄", "peak step per seed"], rows,
                        "median over seeds of each run's phase median of R̄ (range over seeds)"))
    ratio = agg["gradient_over_update"]
    blocks.append(Table(["window", *[f"gradient / update R̄ {PHASE_LABELS[ph]}" for ph in PHASES]],
                        [[a, *[f"{fmt(r[ph]['median'])} ({fmt(r[ph]['min'])}–{fmt(r[ph]['max'])})" for ph in PHASES]]
                         for a, r in ratio.items()], "per seed the ratio of the phase medians; median (range) over seeds"))
    hv = []
    for m in mains:
        for stream in STREAMS:
            v = m["head_view"][stream]
            hv.append([str(m["seed"]), stream, _top(v["phase_change"]) if "phase_change" in v else "—", _top(v["final"]),
                       m["heads"]["prev_token_head"], m["heads"]["induction_head"]])
    blocks.append(Table(["seed", "SED", "top heads at the phase change", "top heads at the end", "prev-token head",
                         "induction head"], hv, "share of the SED directions' squared norm per head (W_Q, W_K, W_V, W_O)"))
    conds = agg["conditions"]
    blocks.append(Table(["condition", "phase change per seed", "mean", "delay vs control: median (range)", "censored"],
                        [[f"{c} {s['label']}", ", ".join(fmt(v) for v in s["phase_change"]), fmt(s["mean"]),
                          f"{fmt(s['delay']['median'])} ({fmt(s['delay']['min'])}–{fmt(s['delay']['max'])})",
                          str(s["censored"])] for c, s in conds.items()],
                        f"rank-{cfg['k']} projection of the attention gradient (W = {cfg['window']}); positive delay = "
                        "the phase change comes later; a censored run had none within the steps and counts at the last"))
    return blocks


def result_markdown(result: Mapping[str, Any]) -> str:
    return render_markdown_blocks(result_blocks(result), None) + "\n"


def detects(run_dir: Path) -> bool:
    """Whether ``run_dir`` is this experiment's output directory (its induction.json)."""
    return json_has(run_dir / "induction.json", "aggregate")


def report_section(run_dir: Path, figure_dir: Path) -> Section:
    """The output directory: the findings' tables, the four figures (redrawn into ``figure_dir`` when missing),
    the configuration."""
    result = load_json(run_dir / "induction.json")
    blocks = result_blocks(result, level=3)

    def redraw(key: str) -> Any:
        return lambda path: Path(figures(result, path.parent)[key])

    figs = [figure(run_dir, "losses.png", figure_dir, "test loss per copy and ICL score, phase change marked", redraw("losses")),
            figure(run_dir, "head_scores.png", figure_dir, "previous-token (layer 0) and induction (layer 1) scores per head",
                   redraw("head_scores")),
            figure(run_dir, "coupling.png", figure_dir, "R̄ of update and gradient SED over training", redraw("coupling")),
            figure(run_dir, "intervention.png", figure_dir, "phase-change step per projection condition",
                   redraw("intervention"))]
    blocks += figs + other_figures(run_dir, figs)
    blocks.append(Details("configuration", flatten(result.get("config", {}))))
    subdirs = [d for d in sorted(run_dir.iterdir()) if d.is_dir()]
    panels = Panels(wandb_ids(*subdirs), metric_plots(metric_keys(*(d / "metrics.jsonl" for d in subdirs))))
    return Section(f"Induction: {run_dir.name}", "induction", run_dir, blocks, panels)


# --- the experiment ---------------------------------------------------------------------------------------
def run(cfg: InductionConfig) -> dict[str, Any]:
    """Run (or complete) every run of ``cfg`` and write the JSON, Markdown and figures; returns the JSON's content."""
    from sed_lens.grid import raise_failures, run_grid
    from sed_lens.induction import InductionTask

    cfg.validate()
    task = InductionTask(seed=cfg.seeds[0], **cfg.task_args())  # bad task settings fail here, before any run
    out = cfg.out_dir
    cell_list = cells(cfg)
    results = run_grid(cell_list, out, backend=cfg.backend, workers=cfg.workers, threads=1,
                       ray_address=cfg.ray_address, progress=cfg.progress, desc="induction",
                       ignore_keys=TRACKING_FIELDS)
    raise_failures(results)
    mains: list[dict[str, Any]] = []
    projected: list[dict[str, Any]] = []
    for r in results:
        assert r.summary is not None
        row = {**r.summary, "run_dir": r.run_dir, "skipped": r.skipped}
        (mains if r.summary["kind"] == "main" else projected).append(row)
    result: dict[str, Any] = {"format": "sed_lens.induction/1", "config": asdict(cfg), "task": task.describe(),
                              "runs": {"main": mains, "projected": projected},
                              "aggregate": aggregate(mains, projected, cfg.conditions, cfg.train.steps)}
    result["figures"] = figures(result, out)
    (out / "induction.md").write_text(result_markdown(result))
    write_json(out / "induction.json", result)
    agg = result["aggregate"]
    log_summary_run(out, "induction", asdict(cfg), wandb_mode=cfg.wandb_mode, project=cfg.wandb_project,
                    job_type="induction-summary",
                    tables={"induction/phase_change": (["seed", "phase_change"], [[s, v] for s, v in agg["phase_change"].items()]),
                            "induction/conditions": (["condition", "label", "mean_phase_change", "delay_median"],
                                                     [[c, s["label"], s["mean"], s["delay"]["median"]]
                                                      for c, s in agg["conditions"].items()])},
                    images={f"figures/{k}": v for k, v in result["figures"].items()},
                    files=[out / "induction.json", out / "induction.md"],
                    summary={f"R_{k}_{ph}": c["phase_median"][ph]["median"] for k, c in agg["coupling"].items()
                             for ph in PHASES})
    return result


def main(argv: Sequence[str] | None = None) -> None:
    ap = parser_for(InductionConfig, "python -m sed_lens.experiments.induction", __doc__ or "")
    cfg = config_from_args(InductionConfig, ap.parse_args(argv))
    result = run(cfg)
    print(Path(cfg.out_dir / "induction.md").read_text())
    wall = sum(r.get("wall_time_s") or 0 for rs in result["runs"].values() for r in rs)
    print(f"{sum(len(v) for v in result['runs'].values())} runs in {cfg.out_dir} (training {wall:.0f} s in all); "
          f"results: {cfg.out_dir / 'induction.json'}; figures: {', '.join(Path(p).name for p in result['figures'].values())}")


def cli() -> None:
    sys.exit(run_cli(main, prog="induction"))


if __name__ == "__main__":
    cli()
