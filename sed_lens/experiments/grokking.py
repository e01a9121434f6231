"""Train a modular-arithmetic HookedTransformer until it groks: ``python -m sed_lens.experiments.grokking``.

With no flags: preset xu2026, op add, p 97, seed 42, the paper's protocol, W&B offline. ``--ops add,sub,mul,sq``
trains one shared encoder with a head per op. Update and gradient SED are captured live by default (``--sed none``
turns them off) and the coupling R̄ of the final SED bases is measured at the end. Prints the grok step, final
accuracies, the SED spectra, the final coupling, wall time and run dir. The run directory gets grokking.png
(accuracy and loss, grok step marked), sed_spectra.png (singular values, gaps and basis overlap over training)
and coupling.png (R_j and R̄ of the final bases); W&B gets them as images and the run's config, summary and SED
bases as an artifact.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Only torch-free modules at the top: the flags are parsed (and --help answered) before torch, TransformerLens,
# W&B or matplotlib are imported; the functions below import them when they run.
from sed_lens.cli import config_from_args, config_from_dict, csv, parser_for, run_cli
from sed_lens.configs import OUTPUT_FIELDS, TRACKING_FIELDS, ModelOptions, Source, TrackingOptions, TrainConfig, get_preset
from sed_lens.devices import resolve_device
from sed_lens.errors import SedLensError, check
from sed_lens.rendering import (
    Block,
    Details,
    Panels,
    Section,
    Table,
    Text,
    figure,
    flatten,
    fmt,
    load_json,
    metric_keys,
    metric_plots,
    other_figures,
    wandb_ids,
)
from sed_lens.tracking import Run, default_run_dir, read_jsonl, to_jsonable, write_json

if TYPE_CHECKING:
    from sed_lens.tasks import ModularArithmetic
    from sed_lens.training import Callback, TrainResult

# The paper's grok step of a plain (control) run: mean over seeds 42, 137, 2024 with the PyTorch-default init
# (Xu 2026, intervention table, condition A). Comparable only on the paper's setup, see :func:`matches_paper`.
PAPER: dict[str, Any] = {"grok_step": {"add": 3358}}


def sed_sources_arg(text: str) -> tuple[str, ...]:
    """``--sed``: comma-separated SED sources; ``none`` (or nothing) turns SED capture off."""
    return () if text.strip().lower() in ("", "none") else csv()(text)


sed_sources_arg.__name__ = "list"


@dataclass(kw_only=True)
class GrokkingConfig(ModelOptions, TrackingOptions):
    """One grokking run: task, model, training protocol, SED capture, tracking."""

    ops: tuple[str, ...] = field(default=("add",), metadata={
        "help": "op, or comma-separated ops for a multitask model (add, sub, mul, sq or a registered op)",
        "aliases": ("--op",), "parse": csv(), "metavar": "OPS"})
    seed: int = field(default=42, metadata={"help": "seed of the split, the initialisation and the batch sampler"})
    train: TrainConfig = field(default_factory=TrainConfig)
    sed: tuple[Source, ...] = field(default=("update", "gradient"), metadata={
        "help": "capture rolling SED while training from these sources: update, gradient, task_gradient "
                "(comma-separated; none turns it off), and measure the coupling of the final bases",
        "parse": sed_sources_arg, "metavar": "SOURCES", "what": "SED source"})
    sed_window: int = field(default=20, metadata={"help": "SED window W (snapshots)"})
    sed_k: int = field(default=3, metadata={"help": "SED directions k"})
    sed_every: int = field(default=25, metadata={"help": "SED snapshot interval (steps)"})
    snapshot_every: int = field(default=0, metadata={
        "help": "save the model state every N steps to RUN_DIR/snapshots for offline analyses, "
                "e.g. python -m sed_lens.experiments.coupling --from-run (0: off)"})
    run_dir: str | None = field(default=None, metadata={"help": "run directory (default: runs/grokking/NAME-TIME)"})
    resume: str | None = field(default=None, metadata={
        "help": "continue the run in this directory from its last checkpoint, with its saved settings "
                "(e.g. after it was killed); the only other flag it takes is --steps N, which extends a run "
                "to N steps (also a finished one)"})

    def validate(self) -> None:
        """The pieces' checks (task and model, tracking), the training protocol's, then the run's own. The op
        names are checked against the registered ops when the task is built (:func:`run`)."""
        super().validate()
        check(len(self.ops) > 0, "name at least one op (--ops).")
        check(len(set(self.ops)) == len(self.ops), f"ops must not repeat, got {', '.join(self.ops)} (--ops).")
        if self.sed:
            check(self.sed_window >= 1, f"the SED window must be at least 1, got {self.sed_window} (--sed-window).")
            check(1 <= self.sed_k <= self.sed_window, f"need 1 <= sed-k <= sed-window, got sed-k={self.sed_k}, "
                                                      f"sed-window={self.sed_window} (--sed-k, --sed-window).")
            check(self.sed_every >= 1, f"the SED snapshot interval must be at least 1, got {self.sed_every} (--sed-every).")
        check(self.snapshot_every >= 0, f"snapshot-every must be non-negative, got {self.snapshot_every} (--snapshot-every).")

    @property
    def name(self) -> str:
        return f"{'+'.join(self.ops)}-p{self.p}-s{self.seed}"


TRACKING_KEYS = frozenset(TRACKING_FIELDS + OUTPUT_FIELDS)
"""Fields of :class:`GrokkingConfig` (and of the experiments built on it) that change where a run is logged or which
of its files it keeps, not what it computes: grids of such runs ignore them when matching finished cells
(``run_grid(ignore_keys=...)``)."""


def matches_paper(cfg: GrokkingConfig) -> bool:
    """Whether ``cfg`` is the paper's setup (model, init, p, split and optimizer protocol), so its grok step
    compares with :data:`PAPER`."""
    paper, t = TrainConfig(), cfg.train
    same_train = all(getattr(t, f) == getattr(paper, f) for f in (
        "batch_size", "lr", "weight_decay", "beta1", "beta2", "grad_clip", "eval_every", "grok_acc"))
    init = cfg.init or get_preset(cfg.preset).default_init
    return (cfg.preset == "xu2026" and init == "torch" and cfg.p == 97 and cfg.train_frac == 0.5
            and len(cfg.ops) == 1 and same_train)


def build(cfg: GrokkingConfig) -> tuple[ModularArithmetic, Any]:
    """The task and model of ``cfg``."""
    from sed_lens.models import build_model
    from sed_lens.tasks import ModularArithmetic

    preset = get_preset(cfg.preset)
    task = ModularArithmetic(cfg.p, cfg.ops, cfg.train_frac, cfg.seed, layout=preset.layout)
    model = build_model(cfg.preset, task, init=cfg.init, seed=cfg.seed, device=resolve_device(cfg.device))
    return task, model


def capture_callbacks(cfg: GrokkingConfig, run_dir: Path | None = None) -> list[Callback]:
    """The SED capture asked for by ``--sed`` and the snapshots asked for by ``--snapshot-every``."""
    from sed_lens.hooks.capture import GradientCapture
    from sed_lens.hooks.snapshots import SnapshotStore

    out: list[Callback] = []
    if cfg.sed:
        out.append(GradientCapture(sources=cfg.sed, window=cfg.sed_window, k=cfg.sed_k, every=cfg.sed_every))
    if cfg.snapshot_every and run_dir is not None:
        out.append(SnapshotStore(cfg.snapshot_every, run_dir / "snapshots"))
    return out


def open_run(cfg: GrokkingConfig, config: dict[str, Any] | None = None, job_type: str = "grokking",
             resume: bool = False) -> Run:
    """The run directory (and W&B run) of ``cfg``; ``config`` is logged (default: ``cfg``). ``resume`` reopens
    an existing run directory (and its W&B run)."""
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(job_type, cfg.name)
    return Run(run_dir, config if config is not None else {"experiment": "grokking", **cfg.to_dict()},
               wandb_mode=cfg.wandb_mode, project=cfg.wandb_project, name=cfg.name, job_type=job_type, resume=resume)


def prepare_resume(run_dir: str | Path, config: Mapping[str, Any]) -> bool:
    """For a resumable grid cell: whether ``run_dir`` holds an interrupted run of ``config`` (its ``config.json``,
    compared without :data:`TRACKING_KEYS`) that can be continued. Anything else there — a run killed before it
    wrote its settings, or one with other settings — is deleted, so the cell starts over."""
    from sed_lens.grid import same_config

    path = Path(run_dir)
    saved = path / "config.json"
    try:
        ok = saved.is_file() and same_config(json.loads(saved.read_text()), to_jsonable(dict(config)), TRACKING_KEYS)
    except json.JSONDecodeError:
        ok = False
    if path.exists() and not ok:
        shutil.rmtree(path)
    return ok


def train(cfg: GrokkingConfig, tracker: Run | None, callbacks: Sequence[Callback] = (),
          resume: bool = False, final: bool = False) -> tuple[TrainResult, ModularArithmetic, Any]:
    """Build and train ``cfg``'s model, logging to ``tracker``; returns the result, the task and the model.

    ``resume``: continue from the tracker's last checkpoint (from the start if it has none yet). ``final``: the
    finished run will not be continued, so its last checkpoint keeps only what reading it back needs
    (:meth:`sed_lens.training.Trainer.fit`)."""
    from sed_lens.models import model_spec
    from sed_lens.training import Trainer

    cfg.validate()
    callbacks = [*capture_callbacks(cfg, tracker.dir if tracker is not None else None), *callbacks]
    task, model = build(cfg)
    if tracker is not None:
        tracker.save_json("model.json", {"task": task.describe(), "model": model_spec(model)})
    trainer = Trainer(model, task, cfg.train, callbacks, run=tracker, progress=cfg.progress)
    resume_from = None
    if resume and tracker is not None:
        resume_from = trainer.checkpoint_path if trainer.checkpoint_path.is_file() else None
        if resume_from is None:
            tracker.truncate_metrics(-1)  # killed before its first checkpoint: start over
    result = trainer.fit(resume_from=resume_from, final=final)
    return result, task, model


def resolved(cfg: GrokkingConfig) -> GrokkingConfig:
    """``cfg`` with the defaults that depend on other settings filled in (the preset's init, the run
    directory), as ``config.json`` records them."""
    return replace(cfg, init=cfg.init or get_preset(cfg.preset).default_init,
                   run_dir=cfg.run_dir or str(default_run_dir("grokking", cfg.name)))


def resume_command(run_dir: str | Path) -> str:
    """The command that continues the grokking run in ``run_dir``."""
    return f"python -m sed_lens.experiments.grokking --resume {shlex.quote(str(run_dir))}"


def run(cfg: GrokkingConfig, callbacks: Sequence[Callback] = (), resume: bool = False,
        announce: bool = False, final: bool = False) -> tuple[TrainResult, Run]:
    """Train ``cfg`` in a new run directory (or continue it, ``resume``); returns the result and the finished run.

    ``announce``: print the run directory and the W&B run (one line on stdout) when it starts. ``final``: the
    finished run will not be continued (:func:`train`). Training stopped by SIGINT or SIGTERM raises
    :class:`sed_lens.training.TrainingInterrupted` carrying the command that resumes it."""
    from sed_lens.tasks import ModularArithmetic
    from sed_lens.training import TrainingInterrupted

    cfg.validate()
    # Before the run directory exists: the registered ops (and a prime modulus where an op needs one) ...
    ModularArithmetic(cfg.p, cfg.ops, cfg.train_frac, cfg.seed, layout=get_preset(cfg.preset).layout)
    resolve_device(cfg.device)  # ... and the device: an unavailable one is one line
    cfg = resolved(cfg)
    with open_run(cfg, resume=resume) as tracker:
        if announce:
            print(f"grokking {cfg.name}: {'resuming' if resume else 'run directory'} {tracker.dir}; "
                  f"{tracker.describe_wandb()}", flush=True)
        try:
            result, _, _ = train(cfg, tracker, callbacks, resume=resume, final=final)
        except TrainingInterrupted as e:
            e.resume_hint = resume_command(tracker.dir)
            raise
        finish_run(cfg, result, tracker)
    return result, tracker


def saved_config(run_dir: str | Path, experiment: str = "grokking") -> dict[str, Any]:
    """The settings a run directory was made with (its ``config.json``)."""
    path = Path(run_dir)
    check(path.exists(), f"cannot resume: run directory {path} does not exist.")
    check(path.is_dir(), f"cannot resume: {path} is a file, not a run directory.")
    check((path / "config.json").is_file(), f"cannot resume: {path} holds no config.json, so it is not a run directory.")
    try:
        saved = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError:
        raise SedLensError(f"cannot resume: {path / 'config.json'} is not valid JSON.") from None
    check(saved.get("experiment") == experiment,
          f"cannot resume: {path} is a {saved.get('experiment', 'unknown')} run, not a {experiment} run.")
    return {k: v for k, v in saved.items() if k != "experiment"}


def checkpoint_step(path: Path) -> int:
    """The step of the checkpoint at ``path`` (:class:`SedLensError` if it cannot be read)."""
    from sed_lens.serialization import UnsafeFileError, load
    from sed_lens.training import CHECKPOINT_FORMATS

    try:
        state = load(path, map_location="cpu")
        check(isinstance(state, dict) and state.get("format") in CHECKPOINT_FORMATS, "not a checkpoint")
        return int(state["step"])
    except UnsafeFileError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise SedLensError(f"checkpoint {path} is truncated or corrupted ({type(e).__name__}); "
                           "it cannot be resumed.") from None


def resume(run_dir: str | Path, progress: bool = True, steps: int | None = None,
           announce: bool = False) -> tuple[GrokkingConfig, TrainResult, Run] | None:
    """Continue the grokking run in ``run_dir`` from its last checkpoint, with its saved settings; ``steps``
    raises its step cap (which also extends a finished run). Everything is checked before anything in the
    directory changes. None (and one line on stdout) when the run is finished and ``steps`` does not extend it."""
    path = Path(run_dir)
    cfg = config_from_dict(GrokkingConfig, saved_config(path))
    cfg = replace(cfg, run_dir=str(run_dir), progress=progress, resume=None)
    if (path / "metrics.jsonl").is_file():
        read_jsonl(path / "metrics.jsonl")  # a damaged line (not a torn last one) stops here
    ckpt = path / "checkpoints" / "last.pt"
    at = checkpoint_step(ckpt) if ckpt.is_file() else 0
    summary_path = path / "summary.json"
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    except json.JSONDecodeError:
        summary = {}
    if "steps" in summary:  # finished
        done = int(summary["steps"])
        if steps is None:
            print(f"grokking: {path} is a finished run ({done} steps); nothing to do — add --steps N (more than "
                  f"{done}) to train it further.")
            return None
        check(steps > done, f"--steps {steps} does not extend {path}: it already ran {done} steps.")
        check(not summary.get("stopped_early"),
              f"{path} stopped early at step {done} by its stop rule, so more steps would stop again at once; "
              "start a new run with --stop-patience 0 to train past it.")
    elif steps is not None:
        check(steps > at, f"--steps {steps} does not extend {path}: its checkpoint is at step {at}.")
    if steps is not None:
        cfg = replace(cfg, train=replace(cfg.train, steps=steps))  # validated as it is made
        saved = json.loads((path / "config.json").read_text())
        write_json(path / "config.json", {**saved, "train": {**saved.get("train", {}), "steps": steps}})
    result, tracker = run(cfg, resume=True, announce=announce)
    return cfg, result, tracker


def finish_run(cfg: GrokkingConfig, result: TrainResult, tracker: Run) -> list[Path]:
    """The end of a run: its figures in the run directory (grokking curves; SED spectra when ``--sed`` recorded
    any), logged to W&B as images, and its config, summary and SED bases as a W&B artifact."""
    from sed_lens import plots

    figs = {"figures/grokking": plots.grokking_curves(result.history, cfg.ops, tracker.dir / "grokking.png",
                                                      result.grok_step, title=f"Grokking {cfg.name}")}
    if cfg.sed and plots.sed_streams(result.history):
        figs["figures/sed_spectra"] = plots.sed_spectra(result.history, tracker.dir / "sed_spectra.png",
                                                        title=f"SED spectra over training ({cfg.name})",
                                                        window=cfg.sed_window, k=cfg.sed_k)
    final = measure_final_coupling(cfg, tracker.dir) if cfg.sed else None
    if final is not None:
        tracker.summary({"final_coupling": final})
        figs["figures/coupling"] = plots.final_coupling(final, tracker.dir / "coupling.png",
                                                        title=f"Coupling of the final SED bases ({cfg.name})")
    tracker.log_images(figs)
    if cfg.sed:
        note = sed_note(cfg)
        tracker.summary({"sed": {"sources": list(cfg.sed), "streams": plots.sed_streams(result.history),
                                 **({"note": note} if note else {})}})
    files = [tracker.dir / f for f in ("config.json", "summary.json", "model.json", "sed_bases.pt")
             if (tracker.dir / f).is_file()]
    tracker.log_artifact(f"grokking-{cfg.name}-{tracker.wandb_id}", "grokking-run", files,
                         {"grok_step": result.grok_step, "final": result.final, "steps": result.steps})
    return list(figs.values())


FINAL_COUPLING: dict[str, Any] = {"n_probes": 1024, "n_random": 20, "random_seed": 0, "probe_seed": 0, "method": "hvp"}


def measure_final_coupling(cfg: GrokkingConfig, run_dir: Path) -> dict[str, Any] | None:
    """R_j and R̄ of the final update- and gradient-SED bases (``sed_bases.pt``) at the end of training (the
    model of ``checkpoints/last.pt``), per op: :func:`sed_lens.analysis.coupling.coupling` with the task's
    probes, 20 random directions and the exact ``hvp`` response; also R̄(gradient) / R̄(update). None when the
    run saved no bases or no checkpoint (``--checkpoint-every 0``)."""
    import time

    import torch

    from sed_lens import serialization
    from sed_lens.analysis.coupling import coupling
    from sed_lens.subspace import ParamSubspace

    bases_path, ckpt_path = run_dir / "sed_bases.pt", run_dir / "checkpoints" / "last.pt"
    if not bases_path.is_file() or not ckpt_path.is_file():
        return None
    t0 = time.perf_counter()
    saved = serialization.load(bases_path) or {}
    task, model = build(cfg)
    model.load_state_dict(serialization.load(ckpt_path, map_location=next(model.parameters()).device)["model"])
    model.eval()
    subspace = ParamSubspace.attention(model)
    s = FINAL_COUPLING
    probes = task.probes(min(s["n_probes"], len(task.pairs)), s["probe_seed"])
    out: dict[str, Any] = {"step": saved.get("step"), "window": saved.get("window"), "k": saved.get("k"),
                           **s, "n_probes": int(probes[0].shape[0]), "ops": {}, "gradient_update_ratio": {}}
    for op in task.ops:
        streams = [n for n in saved.get("bases", {}) if n in ("update", "gradient", f"task_gradient/{op}")]
        if not streams:
            continue
        dirs = [saved["bases"][n]["directions"].float() for n in streams]
        check(all(d.shape[1] == subspace.dim for d in dirs), "the saved SED bases do not match the model's attention subspace.")
        res = coupling(model, subspace, torch.cat(dirs), probes, n_random=s["n_random"], seed=s["random_seed"],
                       method=s["method"], task=op)
        per: dict[str, Any] = {}
        i = 0
        for n, d in zip(streams, dirs, strict=True):
            R = res.R[i:i + len(d)]
            i += len(d)
            per[n] = {"R": R.tolist(), "R_mean": float(R.mean()), "rank": int(saved["bases"][n]["rank"])}
        per["median_random_A"] = res.median_random
        out["ops"][op] = per
        if "update" in per and "gradient" in per and per["update"]["R_mean"] > 0:
            out["gradient_update_ratio"][op] = per["gradient"]["R_mean"] / per["update"]["R_mean"]
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out if out["ops"] else None


def coupling_lines(final: dict[str, Any]) -> list[str]:
    """The printed lines of :func:`measure_final_coupling`'s result."""
    lines = [f"  final coupling at step {final['step']} (R_j = A(v_j) / median A(random), {final['method']}, "
             f"{final['n_probes']} probes, {final['n_random']} random directions; {final['seconds']:.0f} s):"]
    for op, per in final["ops"].items():
        for stream, r in per.items():
            if not isinstance(r, dict):
                continue
            rs = ", ".join(f"{x:.1f}" for x in r["R"])
            name = f"{stream} SED" + (f" ({op})" if len(final["ops"]) > 1 else "")
            lines.append(f"    {name:<16} R̄ = {r['R_mean']:7.2f} | R_1..R_{len(r['R'])} = {rs}"
                         + (f" (rank {r['rank']})" if r["rank"] < len(r["R"]) else ""))
        ratio = final["gradient_update_ratio"].get(op)
        if ratio is not None:
            lines.append(f"    gradient / update R̄ = {ratio:.2f}" + (f" ({op})" if len(final["ops"]) > 1 else ""))
    return lines


def grid_cell(config: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Grid target (:mod:`sed_lens.grid`): one grokking run of ``config`` (a ``GrokkingConfig`` dict) in ``run_dir``."""
    cfg = config_from_dict(GrokkingConfig, {**config, "run_dir": run_dir, "progress": False})
    result, _ = run(cfg)
    return result.summary()


def sed_note(cfg: GrokkingConfig) -> str | None:
    """What the SED sources mean for this run: with one op and ``gradient`` also asked for, ``task_gradient``
    is the ``gradient`` stream itself (recorded once, as ``sed/gradient/*``)."""
    if "task_gradient" in cfg.sed and "gradient" in cfg.sed and len(cfg.ops) == 1:
        return "task_gradient = gradient for a single-op run (recorded once, as sed/gradient/*)"
    return None


def _read_summary(run_dir: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((run_dir / "summary.json").read_text()))
    except (OSError, json.JSONDecodeError):
        return {}


def sed_summary_lines(history: Sequence[dict[str, Any]], k: int) -> list[str]:
    """Per SED stream, the spectrum σ_1..σ_{k+1} and gaps at the last eval and the largest σ_1/σ_2 gap of the run."""
    if not history:
        return []
    last = history[-1]
    streams = sorted({key.split("/sigma_")[0][4:] for key in last if key.startswith("sed/") and "/sigma_" in key})
    lines = []
    for s in streams:
        sig = [last.get(f"sed/{s}/sigma_{j}") for j in range(1, k + 2)]
        gaps = [last.get(f"sed/{s}/gap_{j}") for j in range(1, k + 1)]
        g1 = [(r[f"sed/{s}/gap_1"], r["step"]) for r in history
              if isinstance(r.get(f"sed/{s}/gap_1"), (int, float)) and r[f"sed/{s}/gap_1"] == r[f"sed/{s}/gap_1"]
              and r[f"sed/{s}/gap_1"] != float("inf")]
        peak = max(g1) if g1 else None
        lines.append(f"    {s + ' SED':<16} σ_1..σ_{k + 1} = " + ", ".join(f"{v:.3g}" for v in sig if v is not None)
                     + " | gaps = " + ", ".join(f"{v:.2f}" for v in gaps if v is not None)
                     + (f" | peak σ1/σ2 {peak[0]:.1f} at step {peak[1]}" if peak else ""))
    return lines


def report(cfg: GrokkingConfig, result: TrainResult, tracker: Run) -> str:
    """The short summary printed at the end of a run."""
    lines = [f"grokking {cfg.name} ({cfg.preset}, init {cfg.init or get_preset(cfg.preset).default_init}): "
             f"{result.steps} steps in {result.wall_time:.1f} s"
             + (" (stopped: test accuracy held)" if result.stopped_early else "")]
    for op in cfg.ops:
        g = result.grok_step[op]
        lines.append(f"  {op:>4}: grok step {g if g is not None else 'not reached'} | "
                     f"train acc {result.final[f'train/acc/{op}']:.3f} | test acc {result.final[f'test/acc/{op}']:.3f}")
    if cfg.sed:
        note = sed_note(cfg)
        if note:
            lines.append(f"  {note}")
        lines.append(f"  SED ({', '.join(cfg.sed)}, W={cfg.sed_window}, k={cfg.sed_k}, every {cfg.sed_every} steps): "
                     f"spectra in metrics.jsonl, final bases in {tracker.dir / 'sed_bases.pt'}")
        lines.extend(sed_summary_lines(result.history, cfg.sed_k))
        final = _read_summary(tracker.dir).get("final_coupling")
        if final:
            lines.extend(coupling_lines(final))
        else:
            lines.append("  final coupling: not measured (no checkpoint: --checkpoint-every 0, or no SED bases)")
    figs = [f for f in ("grokking.png", "sed_spectra.png", "coupling.png") if (tracker.dir / f).is_file()]
    lines.append(f"  run directory: {tracker.dir} (figures: {', '.join(figs) or 'none'})")
    hint = tracker.sync_hint()
    if hint:
        lines.append(f"  upload to W&B: {hint}")
    return "\n".join(lines)


# --- the report section -------------------------------------------------------------------------------------
def detects(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a finished grokking run (config.json of this experiment, metrics, summary)."""
    config = load_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else None
    return (isinstance(config, dict) and config.get("experiment") == "grokking" and (run_dir / "metrics.jsonl").is_file()
            and (run_dir / "summary.json").is_file())


def report_section(run_dir: Path, figure_dir: Path) -> Section:
    """A grokking run: grok step and final accuracies per op (the paper's grok step beside ours when the setup is
    the paper's), SED spectra at the last eval, the accuracy curves and SED spectra over training (redrawn into
    ``figure_dir`` when the directory lacks them)."""
    from sed_lens import plots  # here, not at the top: `--help` stays fast

    config = load_json(run_dir / "config.json")
    summary = load_json(run_dir / "summary.json")
    history = read_jsonl(run_dir / "metrics.jsonl")
    cfg = config_from_dict(GrokkingConfig, {k: v for k, v in config.items() if k != "experiment"})
    comparable = matches_paper(cfg)
    final, grok = summary.get("final", {}), summary.get("grok_step", {})
    blocks: list[Block] = [Text(
        f"{'+'.join(cfg.ops)} mod {cfg.p}, seed {cfg.seed}, preset {cfg.preset}, init {cfg.init or get_preset(cfg.preset).default_init}: "
        f"{fmt(summary.get('steps'))} steps in {fmt(summary.get('wall_time_s'))} s"
        + (", stopped once test accuracy held" if summary.get("stopped_early") else "") + ". Grok step = first eval "
        f"with test accuracy ≥ {cfg.train.grok_acc}. The paper's grok step (mean over seeds 42, 137, 2024) applies to "
        "its own setup only (PyTorch-default init, p 97, its optimizer protocol)"
        + ("; this run uses it." if comparable else "; this run differs, so it is not shown."))]
    blocks.append(Table(["op", "grok step", "paper grok step", "final train acc", "final test acc", "final test loss"],
                        [[op, fmt(grok.get(op)), fmt(PAPER["grok_step"].get(op)) if comparable else "—",
                          fmt(final.get(f"train/acc/{op}")), fmt(final.get(f"test/acc/{op}")),
                          fmt(final.get(f"test/loss/{op}"))] for op in cfg.ops], "summary"))
    streams = plots.sed_streams(history)
    if streams:
        last = next(r for r in reversed(history) if any(k.startswith("sed/") for k in r))
        n_sig = max(len(v["sigma"]) for v in streams.values())
        n_gap = max(len(v["gap"]) for v in streams.values())
        blocks.append(Table(["stream", *[f"σ{j}" for j in range(1, n_sig + 1)], *[f"σ{j}/σ{j + 1}" for j in range(1, n_gap + 1)],
                             "overlap"],
                            [[s, *[fmt(last.get(f"sed/{s}/sigma_{j}"), 4) for j in range(1, n_sig + 1)],
                              *[fmt(last.get(f"sed/{s}/gap_{j}")) for j in range(1, n_gap + 1)], fmt(last.get(f"sed/{s}/overlap"))]
                             for s in streams], f"SED at the last eval (step {last['step']})"))
    figs = [figure(run_dir, "grokking.png", figure_dir, "accuracy over training, grok step marked",
                   lambda path: plots.grokking_curves(history, cfg.ops, path, grok, title=f"Grokking {cfg.name}"))]
    if streams:
        figs.append(figure(run_dir, "sed_spectra.png", figure_dir, "SED singular values, gaps and overlap over training",
                           lambda path: plots.sed_spectra(history, path, title=f"SED spectra over training ({cfg.name})")))
    blocks += figs + other_figures(run_dir, figs)
    blocks += [Details("configuration", flatten(config)), Details("summary.json", flatten(summary))]
    panels = Panels(wandb_ids(run_dir), metric_plots(metric_keys(run_dir / "metrics.jsonl")), [],
                    ["figures/grokking"] + (["figures/sed_spectra"] if streams else []))
    return Section(f"Grokking run: {run_dir.name}", "grokking", run_dir, blocks, panels)


def main(argv: Sequence[str] | None = None) -> None:
    ap = parser_for(GrokkingConfig, "python -m sed_lens.experiments.grokking", __doc__ or "")
    ns = ap.parse_args(argv)
    cfg = config_from_args(GrokkingConfig, ns)
    if cfg.resume is not None:
        other = sorted(k for k in vars(ns) if k not in ("resume", "progress", "steps"))
        check(not other, f"--resume continues a run with its saved settings (only --steps N may extend it); "
                         f"drop --{other[0].replace('_', '-')}." if other else "")
        resumed = resume(cfg.resume, cfg.progress, steps=getattr(ns, "steps", None), announce=True)
        if resumed is None:
            return
        cfg, result, tracker = resumed
    else:
        result, tracker = run(cfg, announce=True)
    print(report(cfg, result, tracker))


def cli() -> None:
    sys.exit(run_cli(main, prog="grokking"))


if __name__ == "__main__":
    cli()
