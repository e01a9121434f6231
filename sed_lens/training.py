"""The training engine: :class:`TrainConfig`, :class:`Trainer` and the callback protocol.

One step: sample a batch (with replacement, from the train split) → one forward pass → loss = sum of the
ops' cross-entropies → backward → global grad-norm clip → ``on_before_step`` callbacks (may read or edit
``.grad``) → optimizer step → ``on_after_step`` callbacks. Every ``eval_every`` steps (and at step 0) the full
train and test splits are evaluated; ``on_eval`` callbacks may add entries to the logged metrics. Training
stops after ``steps`` steps, or once every op's test accuracy has been ≥ ``stop_acc`` for ``stop_patience``
consecutive evals, or (``stop_at_grok``) at the first eval at which every op has grokked. The grok step of an op
is the first eval step with test accuracy ≥ ``grok_acc``.
"""

from __future__ import annotations

import io
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from sed_lens.errors import SedLensError, check
from sed_lens.models import get_readout, op_losses, split_logits
from sed_lens.tasks import ModularArithmetic
from sed_lens.tracking import Run, atomic_write_bytes


@dataclass
class TrainConfig:
    """Training protocol; the defaults are the paper's (Xu 2026, §2)."""

    steps: int = field(default=8000, metadata={"help": "maximum optimizer steps"})
    batch_size: int = field(default=512, metadata={"help": "train pairs per step, sampled with replacement"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1.0, metadata={"help": "AdamW decoupled weight decay"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.98, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "global gradient-norm clip (0 disables)"})
    eval_every: int = field(default=25, metadata={"help": "evaluate the full train and test splits every N steps"})
    stop_acc: float = field(default=0.98, metadata={"help": "early stop: test accuracy every op must reach"})
    stop_patience: int = field(default=20, metadata={
        "help": "early stop after this many consecutive evals at stop-acc (0 disables)"})
    grok_acc: float = field(default=0.5, metadata={"help": "grok step = first eval with test accuracy at least this"})
    stop_at_grok: bool = field(default=False, metadata={
        "help": "stop at the first eval at which every op has grokked (for experiments that only measure the grok step)"})
    checkpoint_every: int = field(default=500, metadata={"help": "write a resumable checkpoint every N steps (0 disables)"})
    sampler_seed: int | None = field(default=None, metadata={"help": "seed of the batch sampler (default: the task seed)"})
    deterministic: bool = field(default=True, metadata={
        "help": "use PyTorch's deterministic algorithms while training, so reruns are bit-identical"})

    def validate(self) -> None:
        check(self.steps >= 0, f"steps must be non-negative, got {self.steps}.")
        check(self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}.")
        check(self.lr > 0 and math.isfinite(self.lr), f"learning rate must be positive, got {self.lr}.")
        check(self.weight_decay >= 0, f"weight decay must be non-negative, got {self.weight_decay}.")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"betas must lie in [0, 1), got ({self.beta1}, {self.beta2}).")
        check(self.grad_clip >= 0, f"grad clip must be non-negative (0 disables it), got {self.grad_clip}.")
        check(self.eval_every >= 1, f"eval-every must be at least 1, got {self.eval_every}.")
        check(0 < self.stop_acc <= 1, f"stop accuracy must lie in (0, 1], got {self.stop_acc}.")
        check(self.stop_patience >= 0, f"stop patience must be non-negative, got {self.stop_patience}.")
        check(0 < self.grok_acc <= 1, f"grok accuracy must lie in (0, 1], got {self.grok_acc}.")
        check(self.checkpoint_every >= 0, f"checkpoint-every must be non-negative, got {self.checkpoint_every}.")


class Callback:
    """Hooks into :meth:`Trainer.fit`. Override what you need; ``trainer.step`` is the current step (1-based).

    Order within a step: ``on_before_step`` (gradients final after clipping; may edit ``.grad``) → optimizer
    step → ``on_after_step`` (parameters hold the applied update) → ``on_eval`` on eval steps (``metrics`` may
    be extended in place). ``on_train_start`` runs before the step-0 eval, ``on_train_end`` after the last step.
    ``state_dict``/``load_state_dict`` make a callback resumable from a checkpoint.
    """

    def on_train_start(self, trainer: Trainer) -> None: ...
    def on_before_step(self, trainer: Trainer) -> None: ...
    def on_after_step(self, trainer: Trainer) -> None: ...
    def on_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...
    def on_train_end(self, trainer: Trainer) -> None: ...
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns (also written to ``summary.json`` when the trainer has a run)."""

    steps: int
    grok_step: dict[str, int | None]
    final: dict[str, float]
    stopped_early: bool
    wall_time: float
    history: list[dict[str, Any]]

    def summary(self) -> dict[str, Any]:
        return {"steps": self.steps, "grok_step": self.grok_step, "final": self.final,
                "stopped_early": self.stopped_early, "wall_time_s": round(self.wall_time, 3)}


class TrainingDiverged(SedLensError):
    """The loss or the gradient became NaN/inf."""


@torch.inference_mode()
def evaluate(model: HookedTransformer, task: ModularArithmetic) -> dict[str, float]:
    """Loss and accuracy of every op on the full train and test splits, from one forward pass over the grid."""
    was_training = model.training
    model.eval()
    logits = model(task.tokens)[:, get_readout(model).position]
    model.train(was_training)
    out: dict[str, float] = {}
    per_op = split_logits(model, logits, task.ops)
    for split, idx in (("train", task.train_idx), ("test", task.test_idx)):
        for op in task.ops:
            lg, y = per_op[op][idx], task.labels[op][idx]
            out[f"{split}/loss/{op}"] = torch.nn.functional.cross_entropy(lg, y).item()
            out[f"{split}/acc/{op}"] = (lg.argmax(-1) == y).float().mean().item()
        out[f"{split}/acc"] = float(np.mean([out[f"{split}/acc/{op}"] for op in task.ops]))
        out[f"{split}/loss"] = float(np.mean([out[f"{split}/loss/{op}"] for op in task.ops]))
    return out


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the config's hyper-parameters (the fused kernel where PyTorch has one)."""
    kwargs: dict[str, Any] = dict(lr=config.lr, weight_decay=config.weight_decay, betas=(config.beta1, config.beta2))
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(model.parameters(), **kwargs)


class Trainer:
    """Trains a ``HookedTransformer`` on a :class:`ModularArithmetic` task.

    Args:
        model: any ``HookedTransformer`` whose readout (see :func:`sed_lens.models.get_readout`) has the
            task's ops.
        task: the dataset.
        config: the protocol (:class:`TrainConfig`).
        callbacks: :class:`Callback` objects, called in order.
        run: a :class:`sed_lens.tracking.Run` to log metrics, the summary and checkpoints to (optional).
        optimizer: defaults to AdamW from the config.
        progress: show a progress bar.
    """

    def __init__(self, model: HookedTransformer, task: ModularArithmetic, config: TrainConfig | None = None,
                 callbacks: Sequence[Callback] = (), run: Run | None = None,
                 optimizer: torch.optim.Optimizer | None = None, progress: bool = True) -> None:
        self.config = config or TrainConfig()
        self.config.validate()
        readout = get_readout(model)
        for op in task.ops:
            readout.index(op)  # raises if the model has no head for op
        check(model.cfg.d_vocab >= task.d_vocab,
              f"the task has {task.d_vocab} input tokens but the model embeds only {model.cfg.d_vocab}.")
        check(model.cfg.n_ctx >= task.n_ctx,
              f"the task has {task.n_ctx} positions but the model's context is {model.cfg.n_ctx}.")
        self.model = model
        self.task = task
        self.callbacks = list(callbacks)
        self.run = run
        self.optimizer = optimizer or make_optimizer(model, self.config)
        self.progress = progress
        seed = task.seed if self.config.sampler_seed is None else self.config.sampler_seed
        self.sampler = np.random.RandomState(seed)
        self.step = 0
        self.loss: float = math.nan
        self.grad_norm: float = math.nan
        self.history: list[dict[str, Any]] = []
        self.grok_step: dict[str, int | None] = {op: None for op in task.ops}
        self.patience = 0
        self.stopped_early = False
        self.wall_time = 0.0

    # --- the loop ----------------------------------------------------------------------------------------
    def fit(self, resume_from: str | Path | None = None) -> TrainResult:
        """Train to the stop rule; ``resume_from`` continues from a checkpoint written by :meth:`save_checkpoint`."""
        if not self.config.deterministic:
            return self._fit(resume_from)
        # Two CPU threads accumulate some gradients (e.g. the embedding's) in a varying order; the deterministic
        # kernels cost nothing measurable here and make reruns bit-identical.
        before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            return self._fit(resume_from)
        finally:
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])

    def _fit(self, resume_from: str | Path | None) -> TrainResult:
        cfg = self.config
        t_start = time.perf_counter()
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            if self.run is not None:
                self.run.truncate_metrics(self.step)
        wall_before = self.wall_time
        for cb in self.callbacks:
            cb.on_train_start(self)
        if self.step == 0:
            self._eval()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", disable=not self.progress,
                   mininterval=0.5, dynamic_ncols=True, leave=False)
        try:
            while self.step < cfg.steps and not self.stopped_early:
                self.train_step()
                if self.step % cfg.eval_every == 0:
                    row = self._eval()
                    bar.set_postfix(loss=f"{self.loss:.3g}", test_acc=f"{_min_test_acc(row, self.task):.3f}")
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.run is not None:
                    self.wall_time = wall_before + time.perf_counter() - t_start
                    self.save_checkpoint(self.checkpoint_path)
                bar.update(1)
        finally:
            bar.close()
        self.wall_time = wall_before + time.perf_counter() - t_start
        for cb in self.callbacks:
            cb.on_train_end(self)
        result = self.result()
        if self.run is not None:
            if cfg.checkpoint_every:
                self.save_checkpoint(self.checkpoint_path)
            self.run.summary(result.summary())
        return result

    def train_step(self) -> None:
        """One optimizer step (sample, forward, backward, clip, callbacks, step); ``self.step`` advances by one."""
        cfg = self.config
        self.step += 1
        tokens, labels = self.task.batch(cfg.batch_size, self.sampler)
        losses = op_losses(self.model, tokens, labels)
        loss: Tensor = sum(losses.values())  # type: ignore[assignment]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))  # type: ignore[union-attr]
        self.loss, self.grad_norm = loss.item(), norm.item()
        if not (math.isfinite(self.loss) and math.isfinite(self.grad_norm)):
            where = f"; the last good checkpoint is {self.checkpoint_path}" if self.run is not None else ""
            raise TrainingDiverged(f"training diverged at step {self.step}: loss {self.loss}, "
                                   f"gradient norm {self.grad_norm}{where}.")
        for cb in self.callbacks:
            cb.on_before_step(self)
        self.optimizer.step()
        for cb in self.callbacks:
            cb.on_after_step(self)

    def _eval(self) -> dict[str, Any]:
        row: dict[str, Any] = {"loss": self.loss, "grad_norm": self.grad_norm, **evaluate(self.model, self.task)}
        for cb in self.callbacks:
            cb.on_eval(self, row)
        for op in self.task.ops:
            if self.grok_step[op] is None and row[f"test/acc/{op}"] >= self.config.grok_acc:
                self.grok_step[op] = self.step
        if self.step > 0 and self.config.stop_patience > 0:
            self.patience = self.patience + 1 if _min_test_acc(row, self.task) >= self.config.stop_acc else 0
            self.stopped_early = self.patience >= self.config.stop_patience
        if self.config.stop_at_grok and all(g is not None for g in self.grok_step.values()):
            self.stopped_early = True
        row = {"step": self.step, **row}
        self.history.append(row)
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if k != "step"}, step=self.step)
        return row

    def result(self) -> TrainResult:
        last = self.history[-1] if self.history else {}
        final = {k: v for k, v in last.items() if k.startswith(("train/", "test/"))}
        return TrainResult(self.step, dict(self.grok_step), final, self.stopped_early, self.wall_time, list(self.history))

    # --- checkpoints -------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        check(self.run is not None, "this trainer has no run directory to checkpoint into.")
        assert self.run is not None
        return self.run.dir / "checkpoints" / "last.pt"

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training bit-identically."""
        return {
            "format": "sed_lens.checkpoint/1",
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.get_state(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "trainer": {"loss": self.loss, "grad_norm": self.grad_norm, "grok_step": self.grok_step,
                        "patience": self.patience, "stopped_early": self.stopped_early,
                        "wall_time": self.wall_time, "history": self.history},
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "config": asdict(self.config),
        }

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write :meth:`state_dict` atomically (temporary file + rename) to ``path``."""
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        try:
            atomic_write_bytes(Path(path), buf.getvalue())
        except OSError as e:
            raise SedLensError(f"could not write checkpoint {path}: {e.strerror or e}; "
                               "the previous checkpoint is intact.") from None
        return Path(path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore the state written by :meth:`save_checkpoint`."""
        path = Path(path)
        check(path.is_file(), f"checkpoint {path} does not exist.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            check(isinstance(state, dict) and state.get("format") == "sed_lens.checkpoint/1", "not a checkpoint")
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
            raise SedLensError(f"checkpoint {path} is truncated or corrupted ({type(e).__name__}); "
                               "it cannot be resumed.") from None
        check(len(state["callbacks"]) == len(self.callbacks),
              f"checkpoint {path} was written with {len(state['callbacks'])} callbacks "
              f"but this trainer has {len(self.callbacks)}.")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.set_state(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        t = state["trainer"]
        self.step = state["step"]
        self.loss, self.grad_norm = t["loss"], t["grad_norm"]
        self.grok_step, self.patience, self.stopped_early = dict(t["grok_step"]), t["patience"], t["stopped_early"]
        self.wall_time, self.history = t["wall_time"], list(t["history"])
        for cb, s in zip(self.callbacks, state["callbacks"], strict=True):
            cb.load_state_dict(s)


def _min_test_acc(row: dict[str, Any], task: ModularArithmetic) -> float:
    return min(row[f"test/acc/{op}"] for op in task.ops)
