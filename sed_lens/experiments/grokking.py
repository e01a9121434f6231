"""Train a modular-arithmetic HookedTransformer until it groks: ``python -m sed_lens.experiments.grokking``.

With no flags: preset xu2026, op add, p 97, seed 42, the paper's protocol, W&B offline. ``--ops add,sub,mul,sq``
trains one shared encoder with a head per op. Prints the grok step, final accuracies, wall time and run dir.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sed_lens.cli import config_from_args, config_from_dict, csv, parser_for, run_cli
from sed_lens.errors import check
from sed_lens.hooks.capture import GradientCapture
from sed_lens.models import INITS, PRESETS, build_model, get_preset, model_spec
from sed_lens.tasks import ModularArithmetic
from sed_lens.tracking import WANDB_MODES, Run, default_run_dir
from sed_lens.training import Callback, TrainConfig, Trainer, TrainResult


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
    run_dir: str | None = field(default=None, metadata={"help": "run directory (default: runs/grokking/NAME-TIME)"})
    wandb_mode: str = field(default="offline", metadata={"help": "W&B mode", "choices": WANDB_MODES})
    wandb_project: str = field(default="sed-lens", metadata={"help": "W&B project"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    @property
    def name(self) -> str:
        return f"{'+'.join(self.ops)}-p{self.p}-s{self.seed}"


def build(cfg: GrokkingConfig) -> tuple[ModularArithmetic, Any]:
    """The task and model of ``cfg``."""
    preset = get_preset(cfg.preset)
    task = ModularArithmetic(cfg.p, cfg.ops, cfg.train_frac, cfg.seed, layout=preset.layout)
    model = build_model(cfg.preset, task, init=cfg.init, seed=cfg.seed)
    return task, model


def capture_callbacks(cfg: GrokkingConfig) -> list[Callback]:
    """The SED capture asked for by ``--sed`` (none by default)."""
    if not cfg.sed:
        return []
    return [GradientCapture(sources=cfg.sed, window=cfg.sed_window, k=cfg.sed_k, every=cfg.sed_every)]


def run(cfg: GrokkingConfig, callbacks: Sequence[Callback] = ()) -> tuple[TrainResult, Run]:
    """Train ``cfg`` in a new run directory; returns the result and the (finished) run."""
    cfg.train.validate()
    callbacks = [*capture_callbacks(cfg), *callbacks]
    task, model = build(cfg)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir("grokking", cfg.name)
    config = {"experiment": "grokking", **asdict(cfg), "task": task.describe(), "model": model_spec(model)}
    with Run(run_dir, config, wandb_mode=cfg.wandb_mode, project=cfg.wandb_project, name=cfg.name,
             job_type="grokking") as tracker:
        result = Trainer(model, task, cfg.train, callbacks, run=tracker, progress=cfg.progress).fit()
    return result, tracker


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
    lines.append(f"  run directory: {tracker.dir}")
    hint = tracker.sync_hint()
    if hint:
        lines.append(f"  upload to W&B: {hint}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = parser_for(GrokkingConfig, "python -m sed_lens.experiments.grokking", __doc__ or "")
    cfg = config_from_args(GrokkingConfig, ap.parse_args(argv))
    check(len(cfg.ops) > 0, "name at least one op.")
    result, tracker = run(cfg)
    print(report(cfg, result, tracker))


def cli() -> None:
    sys.exit(run_cli(main, prog="grokking"))


if __name__ == "__main__":
    cli()
