"""Train a modular-arithmetic HookedTransformer until it groks: ``python -m sed_lens.experiments.grokking``.

With no flags: preset xu2026, op add, p 97, seed 42, the paper's protocol, W&B offline. ``--ops add,sub,mul,sq``
trains one shared encoder with a head per op. Prints the grok step, final accuracies, wall time and run dir.
The run directory gets grokking.png (accuracy curves, grok step marked) and, with ``--sed``, sed_spectra.png
(singular values, gaps and basis overlap over training); W&B gets them as images and the run's config,
summary and SED bases as an artifact.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sed_lens import plots
from sed_lens.cli import config_from_args, config_from_dict, csv, parser_for, run_cli
from sed_lens.errors import SedLensError, check
from sed_lens.hooks.capture import GradientCapture
from sed_lens.hooks.snapshots import SnapshotStore
from sed_lens.models import INITS, PRESETS, build_model, get_preset, model_spec
from sed_lens.tasks import ModularArithmetic
from sed_lens.tracking import WANDB_MODES, Run, default_run_dir
from sed_lens.training import Callback, TrainConfig, Trainer, TrainResult

# The paper's grok step of a plain (control) run: mean over seeds 42, 137, 2024 with the PyTorch-default init
# (Xu 2026, intervention table, condition A). Comparable only on the paper's setup, see :func:`matches_paper`.
PAPER: dict[str, Any] = {"grok_step": {"add": 3358}}


@dataclass
class GrokkingConfig:
    """One grokking run: task, model, training protocol, tracking."""

    ops: tuple[str, ...] = field(default=("add",), metadata={
        "help": "op, or comma-separated ops for a multitask model (add, sub, mul, sq or a registered op)",
        "aliases": ("--op",), "parse": csv(), "metavar": "OPS"})
    p: int = field(default=97, metadata={"help": "modulus"})
    seed: int = field(default=42, metadata={"help": "seed of the split, the initialisation and the batch sampler"})
    preset: str = field(default="xu2026", metadata={"help": "model preset", "choices": tuple(PRESETS)})
    init: str | None = field(default=None, metadata={
        "help": "initialisation: torch (PyTorch defaults of nn.TransformerEncoder) or tl (TransformerLens); "
                "default: the preset's", "choices": INITS})
    train_frac: float = field(default=0.5, metadata={"help": "fraction of the pairs used for training"})
    train: TrainConfig = field(default_factory=TrainConfig)
    sed: tuple[str, ...] = field(default=(), metadata={
        "help": "capture rolling SED while training from these sources: update, gradient, task_gradient "
                "(comma-separated; default: none)", "parse": csv(), "metavar": "SOURCES"})
    sed_window: int = field(default=20, metadata={"help": "SED window W (snapshots)"})
    sed_k: int = field(default=3, metadata={"help": "SED directions k"})
    sed_every: int = field(default=25, metadata={"help": "SED snapshot interval (steps)"})
    snapshot_every: int = field(default=0, metadata={
        "help": "save the model state every N steps to RUN_DIR/snapshots for offline analyses, "
                "e.g. python -m sed_lens.experiments.coupling --from-run (0: off)"})
    run_dir: str | None = field(default=None, metadata={"help": "run directory (default: runs/grokking/NAME-TIME)"})
    wandb_mode: str = field(default="offline", metadata={"help": "W&B mode", "choices": WANDB_MODES})
    wandb_project: str = field(default="sed-lens", metadata={"help": "W&B project"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    resume: str | None = field(default=None, metadata={
        "help": "continue the run in this directory from its last checkpoint, with its saved settings "
                "(e.g. after it was killed); pass no other flags"})

    @property
    def name(self) -> str:
        return f"{'+'.join(self.ops)}-p{self.p}-s{self.seed}"


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
    preset = get_preset(cfg.preset)
    task = ModularArithmetic(cfg.p, cfg.ops, cfg.train_frac, cfg.seed, layout=preset.layout)
    model = build_model(cfg.preset, task, init=cfg.init, seed=cfg.seed)
    return task, model


def capture_callbacks(cfg: GrokkingConfig, run_dir: Path | None = None) -> list[Callback]:
    """The SED capture asked for by ``--sed`` and the snapshots asked for by ``--snapshot-every``."""
    out: list[Callback] = []
    if cfg.sed:
        out.append(GradientCapture(sources=cfg.sed, window=cfg.sed_window, k=cfg.sed_k, every=cfg.sed_every))
    check(cfg.snapshot_every >= 0, f"snapshot-every must be non-negative, got {cfg.snapshot_every}.")
    if cfg.snapshot_every and run_dir is not None:
        out.append(SnapshotStore(cfg.snapshot_every, run_dir / "snapshots"))
    return out


def open_run(cfg: GrokkingConfig, config: dict[str, Any] | None = None, job_type: str = "grokking",
             resume: bool = False) -> Run:
    """The run directory (and W&B run) of ``cfg``; ``config`` is logged (default: ``cfg``). ``resume`` reopens
    an existing run directory (and its W&B run)."""
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(job_type, cfg.name)
    return Run(run_dir, config if config is not None else {"experiment": "grokking", **asdict(cfg)},
               wandb_mode=cfg.wandb_mode, project=cfg.wandb_project, name=cfg.name, job_type=job_type, resume=resume)


def train(cfg: GrokkingConfig, tracker: Run | None, callbacks: Sequence[Callback] = (),
          resume: bool = False) -> tuple[TrainResult, ModularArithmetic, Any]:
    """Build and train ``cfg``'s model, logging to ``tracker``; returns the result, the task and the model.

    ``resume``: continue from the tracker's last checkpoint (from the start if it has none yet)."""
    cfg.train.validate()
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
    result = trainer.fit(resume_from=resume_from)
    return result, task, model


def run(cfg: GrokkingConfig, callbacks: Sequence[Callback] = (), resume: bool = False) -> tuple[TrainResult, Run]:
    """Train ``cfg`` in a new run directory (or continue it, ``resume``); returns the result and the finished run."""
    cfg.train.validate()
    capture_callbacks(cfg)  # validate the SED flags before creating the run directory
    with open_run(cfg, resume=resume) as tracker:
        result, _, _ = train(cfg, tracker, callbacks, resume=resume)
        finish_run(cfg, result, tracker)
    return result, tracker


def saved_config(run_dir: str | Path, experiment: str = "grokking") -> dict[str, Any]:
    """The settings a run directory was made with (its ``config.json``)."""
    path = Path(run_dir)
    check(path.is_dir(), f"cannot resume: run directory {path} does not exist.")
    check((path / "config.json").is_file(), f"cannot resume: {path} holds no config.json, so it is not a run directory.")
    try:
        saved = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError:
        raise SedLensError(f"cannot resume: {path / 'config.json'} is not valid JSON.") from None
    check(saved.get("experiment") == experiment,
          f"cannot resume: {path} is a {saved.get('experiment', 'unknown')} run, not a {experiment} run.")
    return {k: v for k, v in saved.items() if k != "experiment"}


def resume(run_dir: str | Path, progress: bool = True) -> tuple[GrokkingConfig, TrainResult, Run]:
    """Continue the grokking run in ``run_dir`` from its last checkpoint, with its saved settings."""
    cfg = config_from_dict(GrokkingConfig, saved_config(run_dir))
    cfg = replace(cfg, run_dir=str(run_dir), progress=progress, resume=None)
    result, tracker = run(cfg, resume=True)
    return cfg, result, tracker


def finish_run(cfg: GrokkingConfig, result: TrainResult, tracker: Run) -> list[Path]:
    """The end of a run: its figures in the run directory (grokking curves; SED spectra when ``--sed`` recorded
    any), logged to W&B as images, and its config, summary and SED bases as a W&B artifact."""
    figs = {"figures/grokking": plots.grokking_curves(result.history, cfg.ops, tracker.dir / "grokking.png",
                                                      result.grok_step, title=f"Grokking {cfg.name}")}
    if cfg.sed and plots.sed_streams(result.history):
        figs["figures/sed_spectra"] = plots.sed_spectra(result.history, tracker.dir / "sed_spectra.png",
                                                        title=f"SED spectra over training ({cfg.name})")
    tracker.log_images(figs)
    files = [tracker.dir / f for f in ("config.json", "summary.json", "model.json", "sed_bases.pt")
             if (tracker.dir / f).is_file()]
    tracker.log_artifact(f"grokking-{cfg.name}-{tracker.wandb_id}", "grokking-run", files,
                         {"grok_step": result.grok_step, "final": result.final, "steps": result.steps})
    return list(figs.values())


def grid_cell(config: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Grid target (:mod:`sed_lens.grid`): one grokking run of ``config`` (a ``GrokkingConfig`` dict) in ``run_dir``."""
    cfg = config_from_dict(GrokkingConfig, {**config, "run_dir": run_dir, "progress": False})
    result, _ = run(cfg)
    return result.summary()


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
        lines.append(f"  SED ({', '.join(cfg.sed)}, W={cfg.sed_window}, k={cfg.sed_k}, every {cfg.sed_every} steps): "
                     f"spectra in metrics.jsonl, final bases in {tracker.dir / 'sed_bases.pt'}")
    figs = [f for f in ("grokking.png", "sed_spectra.png") if (tracker.dir / f).is_file()]
    lines.append(f"  run directory: {tracker.dir} (figures: {', '.join(figs) or 'none'})")
    hint = tracker.sync_hint()
    if hint:
        lines.append(f"  upload to W&B: {hint}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = parser_for(GrokkingConfig, "python -m sed_lens.experiments.grokking", __doc__ or "")
    ns = ap.parse_args(argv)
    cfg = config_from_args(GrokkingConfig, ns)
    if cfg.resume is not None:
        other = sorted(k for k in vars(ns) if k not in ("resume", "progress"))
        check(not other, f"--resume continues a run with its saved settings; drop --{other[0].replace('_', '-')}."
              if other else "")
        cfg, result, tracker = resume(cfg.resume, cfg.progress)
    else:
        check(len(cfg.ops) > 0, "name at least one op.")
        result, tracker = run(cfg)
    print(report(cfg, result, tracker))


def cli() -> None:
    sys.exit(run_cli(main, prog="grokking"))


if __name__ == "__main__":
    cli()
