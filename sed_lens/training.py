"""The training engine: :class:`TrainConfig`, :class:`Trainer` and the callback protocol.

One step: sample a batch (with replacement, from the train split) → one forward pass → loss = sum of the
ops' cross-entropies → backward → global grad-norm clip → ``on_before_step`` callbacks (may read or edit
``.grad``) → optimizer step → ``on_after_step`` callbacks. Every ``eval_every`` steps (and at step 0) the full
train and test splits are evaluated; ``on_eval`` callbacks may add entries to the logged metrics. Training
stops after ``steps`` steps, or once every op's test accuracy has been ≥ ``stop_acc`` for ``stop_patience``
consecutive evals, or (``stop_at_grok``) at the first eval at which every op has grokked. The grok step of an op
is the first eval step with test accuracy ≥ ``grok_acc``. With ``post_grok_steps`` the same trajectory goes on past
the stop rule until that many steps after the first eval at which every op reached ``stop_acc``
(``TrainResult.cross_step``); ``TrainResult.stop_step`` records where the stop rule fired, so the stop-rule run is
a prefix of the longer one.
"""

from __future__ import annotations

import io
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm  # plain tqdm: tqdm.auto warns (TqdmWarning) in Jupyter without ipywidgets
from transformer_lens import HookedTransformer

from sed_lens.configs import TrainConfig  # torch-free, so that CLIs parse flags before importing torch
from sed_lens.devices import model_device
from sed_lens.errors import SedLensError, check
from sed_lens.models import get_readout, has_readout, task_logits
from sed_lens.serialization import UnsafeFileError, plain
from sed_lens.serialization import load as load_file
from sed_lens.task import SequenceTask, Task
from sed_lens.tasks import ModularArithmetic
from sed_lens.tracking import Run, atomic_write_bytes

# /2: every value loads with torch.load(weights_only=True) (the NumPy sampler state as a tensor, not an array);
# /1 (sed_lens ≤ 0.1.0) is still read, see sed_lens.serialization.load.
CHECKPOINT_FORMAT = "sed_lens.checkpoint/2"
CHECKPOINT_FORMATS = ("sed_lens.checkpoint/1", CHECKPOINT_FORMAT)


class Callback:
    """Hooks into :meth:`Trainer.fit`. Override what you need; ``trainer.step`` is the current step (1-based).

    Order within a step: ``on_before_step`` (gradients final after clipping; may edit ``.grad``) → optimizer
    step → ``on_after_step`` (parameters hold the applied update) → ``on_eval`` on eval steps (``metrics`` may
    be extended in place). ``on_train_start`` runs before the step-0 eval, ``on_train_end`` after the last step.
    ``state_dict``/``load_state_dict`` make a callback resumable from a checkpoint; ``final_state_dict`` is what
    the checkpoint of a run that will not be continued keeps (``Trainer.fit(final=True)``).
    """

    def on_train_start(self, trainer: Trainer) -> None: ...
    def on_before_step(self, trainer: Trainer) -> None: ...
    def on_after_step(self, trainer: Trainer) -> None: ...
    def on_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...
    def on_train_end(self, trainer: Trainer) -> None: ...
    def state_dict(self) -> dict[str, Any]:
        return {}

    def final_state_dict(self) -> dict[str, Any]:
        """The state kept at the end of a run that will not be continued (:meth:`Trainer.fit` with ``final``): by
        default all of :meth:`state_dict`. A callback may leave out what only continuing training needs (a large
        window); its :meth:`load_state_dict` must then take that state back and refuse, with one clear
        :class:`SedLensError`, to train on from it."""
        return self.state_dict()

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
    stop_step: int | None = None  # the step at which the stop rule fired (None: it never did)
    cross_step: int | None = None  # the first eval at which every op's test accuracy reached stop_acc
    timings: dict[str, float] = field(default_factory=dict)  # seconds spent in evals and checkpoints (this session)
    milestones: dict[str, int | None] = field(default_factory=dict)  # the task's own steps, e.g. "phase_change"

    def summary(self) -> dict[str, Any]:
        out = {"steps": self.steps, "grok_step": self.grok_step, "final": self.final,
               "stopped_early": self.stopped_early, "stop_step": self.stop_step, "cross_step": self.cross_step,
               "wall_time_s": round(self.wall_time, 3), "timings": {k: round(v, 3) for k, v in self.timings.items()}}
        if self.milestones:  # tasks without milestones (modular arithmetic) keep the summary as it was
            out["milestones"] = dict(self.milestones)
        return out


def curves(history: Sequence[dict[str, Any]], ops: Sequence[str]) -> dict[str, list[Any]]:
    """The accuracy and loss curves of a run (train and test, per op) at every eval of ``history``
    (:attr:`TrainResult.history`), as columns rounded to 5 digits: what a compact record of a run keeps."""
    cols = [f"{split}/{m}/{op}" for op in ops for split in ("train", "test") for m in ("acc", "loss")]
    return {"step": [int(r["step"]) for r in history],
            **{c: [None if r.get(c) is None else round(float(r[c]), 5) for r in history] for c in cols}}


class TrainingDiverged(SedLensError):
    """The loss or the gradient became NaN/inf."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by SIGINT (Ctrl-C) or SIGTERM after writing a checkpoint at ``step`` (``checkpoint``;
    None without a run directory). ``exit_code`` is the shell's 128 + signal number (130, 143)."""

    def __init__(self, step: int, checkpoint: Path | None, signum: int) -> None:
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        self.exit_code = 128 + int(signum)
        self.resume_hint: str | None = None  # the command that continues the run, set by an experiment's CLI
        name = signal.Signals(signum).name
        where = f"; checkpoint {checkpoint}" if checkpoint is not None else " (no run directory, so no checkpoint)"
        super().__init__(f"{name} at step {step}{where}")

    def describe(self) -> str:
        """One line: the step, the checkpoint and the command that resumes."""
        return f"{self} — resume with: {self.resume_hint}" if self.resume_hint and self.checkpoint else str(self)


@torch.inference_mode()
def compiled(model: HookedTransformer) -> HookedTransformer:
    """``torch.compile(model)`` for the training step (``TrainConfig.compile``), checked before any step: a
    missing C++ compiler or a platform without TorchInductor is one clear error. The compiled module shares the
    model's parameters (an optimizer of ``model`` trains it) and reads its readout; evaluation stays eager."""
    import shutil

    check(hasattr(torch, "compile"), "compile needs torch.compile (torch 2.x).")
    check(model_device(model).type != "cpu" or any(shutil.which(cc) for cc in ("c++", "g++", "clang++")),
          "compile on the CPU needs a C++ compiler (c++, g++ or clang++ on PATH); install one or train without "
          "--compile.")
    return cast(HookedTransformer, torch.compile(model))  # an OptimizedModule that calls and reads like the model


def evaluate(model: HookedTransformer, task: Task) -> dict[str, float]:
    """The task's evaluation metrics (:meth:`sed_lens.task.Task.evaluate`: for modular arithmetic the loss and
    accuracy of every op on the full train and test splits, from one forward pass over the grid), with the model
    in eval mode and its readout logits from :func:`sed_lens.models.task_logits`. No autograd graph is built (the
    same numbers, ~1.5× faster than a forward that records one)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return task.evaluate(model, lambda tokens: task_logits(model, tokens))
    finally:
        model.train(was_training)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the config's hyper-parameters (the fused kernel where PyTorch has one)."""
    kwargs: dict[str, Any] = dict(lr=config.lr, weight_decay=config.weight_decay, betas=(config.beta1, config.beta2))
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(model.parameters(), **kwargs)


class Trainer:
    """Trains a ``HookedTransformer`` on a task (:class:`~sed_lens.task.Task`: modular arithmetic, induction …).

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

    def __init__(self, model: HookedTransformer, task: Task, config: TrainConfig | None = None,
                 callbacks: Sequence[Callback] = (), run: Run | None = None,
                 optimizer: torch.optim.Optimizer | None = None, progress: bool = True) -> None:
        self.config = config or TrainConfig()
        self.config.validate()
        readout = get_readout(model)
        for op in task.ops:
            readout.index(op)  # raises if the model has no head for op
        # A model with sed_lens readout metadata was built for one modulus; a bare HookedTransformer's outputs
        # (all of d_vocab_out) must at least hold every label.
        exact = has_readout(model)
        check(readout.n_classes == task.n_classes if exact else readout.n_classes >= task.n_classes,
              f"the model predicts {readout.n_classes} classes per op but the task has "
              f"{f'p={task.p}' if isinstance(task, ModularArithmetic) else f'{task.n_classes} classes'}; "
              f"build the model for this task (build_model(preset, task)).")
        if isinstance(task, SequenceTask):
            want = tuple(p % model.cfg.n_ctx for p in task.readout_positions)
            check(readout.multi_position and tuple(p % model.cfg.n_ctx for p in readout.positions) == want,
                  f"the task's labels sit at positions {list(task.readout_positions)} but the model reads "
                  f"{list(readout.positions)}; build the model for this task (build_model(preset, task)) or "
                  f"set_readout(model, task.readout_positions, task.ops).")
        check(model.cfg.d_vocab >= task.d_vocab,
              f"the task has {task.d_vocab} input tokens but the model embeds only {model.cfg.d_vocab}.")
        check(model.cfg.n_ctx >= task.n_ctx,
              f"the task has {task.n_ctx} positions but the model's context is {model.cfg.n_ctx}.")
        self.model = model
        self.task = task
        self._step_model = compiled(model) if self.config.compile else model  # what the training step runs
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
        self.stop_step: int | None = None  # when the stop rule fired (training may go on: post_grok_steps)
        self.cross_step: int | None = None  # first eval with every op's test accuracy ≥ stop_acc
        self.wall_time = 0.0
        self.timings: dict[str, float] = {"eval": 0.0, "checkpoint": 0.0}

    # --- the loop ----------------------------------------------------------------------------------------
    def fit(self, resume_from: str | Path | None = None, final: bool = False) -> TrainResult:
        """Train to the stop rule; ``resume_from`` continues from a checkpoint written by :meth:`save_checkpoint`.

        ``final``: the run will not be continued once it has finished (a grid cell that is done for good), so the
        checkpoint written at its end keeps each callback's :meth:`Callback.final_state_dict` instead of its full
        state (the model, optimizer and step stay). The checkpoints written while training, or when it is
        interrupted, are complete either way."""
        if not self.config.deterministic:
            return self._fit(resume_from, final)
        # Two CPU threads accumulate some gradients (e.g. the embedding's) in a varying order; the deterministic
        # kernels cost nothing measurable here and make reruns bit-identical.
        before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            return self._fit(resume_from, final)
        finally:
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])

    def _fit(self, resume_from: str | Path | None, final: bool) -> TrainResult:
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
        bar = _Progress(self) if self.progress and self.step < cfg.steps and not self.stopped_early else None
        # SIGINT (Ctrl-C) and SIGTERM (a scheduler's time limit) end the current step, write a checkpoint at it
        # and raise TrainingInterrupted (a KeyboardInterrupt) that says where the checkpoint is.
        with _StopSignals() as stop:
            try:
                while self.step < cfg.steps and not self.stopped_early:
                    self.train_step()
                    row = self._eval() if self.step % cfg.eval_every == 0 else None
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.run is not None:
                        self.wall_time = wall_before + time.perf_counter() - t_start
                        self.save_checkpoint(self.checkpoint_path)
                    if bar is not None:
                        bar.step(row)
                    if stop.signum is not None:
                        self.wall_time = wall_before + time.perf_counter() - t_start
                        saved = self.save_checkpoint(self.checkpoint_path) if self.run is not None else None
                        raise TrainingInterrupted(self.step, saved, stop.signum)
            finally:
                if bar is not None:
                    bar.close()
        self.wall_time = wall_before + time.perf_counter() - t_start
        for cb in self.callbacks:
            cb.on_train_end(self)
        result = self.result()
        if self.run is not None:
            if cfg.checkpoint_every:
                self.save_checkpoint(self.checkpoint_path, final=final)
            self.run.summary(result.summary())
        return result

    def train_step(self) -> None:
        """One optimizer step (sample, forward, backward, clip, callbacks, step); ``self.step`` advances by one."""
        cfg = self.config
        self.step += 1
        tokens, labels = self.task.batch(cfg.batch_size, self.sampler)
        device = model_device(self.model)
        tokens, labels = tokens.to(device), {op: y.to(device) for op, y in labels.items()}
        losses = self.task.losses(task_logits(self._step_model, tokens), labels)
        loss = sum(losses.values())
        assert isinstance(loss, Tensor)  # a task has at least one op, so this is never sum()'s start value 0
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
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
        t0 = time.perf_counter()
        row: dict[str, Any] = {"loss": self.loss, "grad_norm": self.grad_norm, **evaluate(self.model, self.task)}
        self.timings["eval"] += time.perf_counter() - t0
        for cb in self.callbacks:
            cb.on_eval(self, row)
        for op in self.task.ops:
            if self.grok_step[op] is None and row[f"test/acc/{op}"] >= self.config.grok_acc:
                self.grok_step[op] = self.step
        held = _min_test_acc(row, self.task) >= self.config.stop_acc
        if self.step > 0 and held and self.cross_step is None:
            self.cross_step = self.step
        if self.step > 0 and self.config.stop_patience > 0:
            self.patience = self.patience + 1 if held else 0
            if self.stop_step is None and self.patience >= self.config.stop_patience:
                self.stop_step = self.step
            if self.stop_step is not None:
                assert self.cross_step is not None
                # The stop rule has fired; with post_grok_steps the same trajectory continues past it.
                self.stopped_early = self.step >= max(self.stop_step, self.cross_step + self.config.post_grok_steps)
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
        return TrainResult(self.step, dict(self.grok_step), final, self.stopped_early, self.wall_time, list(self.history),
                           self.stop_step, self.cross_step, dict(self.timings), self.task.milestones(self.history))

    # --- checkpoints -------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        check(self.run is not None, "this trainer has no run directory to checkpoint into.")
        assert self.run is not None
        return self.run.dir / "checkpoints" / "last.pt"

    def state_dict(self, final: bool = False) -> dict[str, Any]:
        """Everything needed to continue training bit-identically; ``final``: of a finished run that will not be
        continued (the callbacks' :meth:`Callback.final_state_dict`, and ``"final": True``)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": _numpy_rng_state(self.sampler),
            "torch_rng": torch.get_rng_state(),
            "python_rng": _python_rng_state(),
            "trainer": {"loss": self.loss, "grad_norm": self.grad_norm, "grok_step": self.grok_step,
                        "patience": self.patience, "stopped_early": self.stopped_early,
                        "stop_step": self.stop_step, "cross_step": self.cross_step,
                        "wall_time": self.wall_time, "history": self.history, "timings": dict(self.timings)},
            "callbacks": [cb.final_state_dict() if final else cb.state_dict() for cb in self.callbacks],
            "config": self.config.to_dict(),
            **({"final": True} if final else {}),
        }

    def save_checkpoint(self, path: str | Path, final: bool = False) -> Path:
        """Write :meth:`state_dict` (``final``: that of a finished run) atomically (temporary file + rename) to ``path``."""
        t0 = time.perf_counter()
        buf = io.BytesIO()
        torch.save(plain(self.state_dict(final)), buf)
        try:
            atomic_write_bytes(Path(path), buf.getvalue())
        except OSError as e:
            raise SedLensError(f"could not write checkpoint {path}: {e.strerror or e}; "
                               "the previous checkpoint is intact.") from None
        self.timings["checkpoint"] += time.perf_counter() - t0
        return Path(path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore the state written by :meth:`save_checkpoint`."""
        path = Path(path)
        check(path.is_file(), f"checkpoint {path} does not exist.")
        try:
            state = load_file(path, map_location="cpu")
            check(isinstance(state, dict) and state.get("format") in CHECKPOINT_FORMATS, "not a checkpoint")
        except UnsafeFileError:
            raise
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
            raise SedLensError(f"checkpoint {path} is truncated or corrupted ({type(e).__name__}); "
                               "it cannot be resumed.") from None
        check(len(state["callbacks"]) == len(self.callbacks),
              f"checkpoint {path} was written with {len(state['callbacks'])} callbacks "
              f"but this trainer has {len(self.callbacks)}.")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        _set_numpy_rng_state(self.sampler, state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        _set_python_rng_state(state["python_rng"])
        t = state["trainer"]
        self.step = state["step"]
        self.loss, self.grad_norm = t["loss"], t["grad_norm"]
        self.grok_step, self.patience, self.stopped_early = dict(t["grok_step"]), t["patience"], t["stopped_early"]
        self.stop_step, self.cross_step = t.get("stop_step"), t.get("cross_step")
        self.wall_time, self.history = t["wall_time"], list(t["history"])
        self.timings = {**self.timings, **dict(t.get("timings", {}))}  # (checkpoints before 0.2 kept none)
        for cb, s in zip(self.callbacks, state["callbacks"], strict=True):
            cb.load_state_dict(s)


def _numpy_rng_state(rng: np.random.RandomState) -> dict[str, Any]:
    """A ``RandomState``'s state as plain data: the Mersenne Twister key as an int64 tensor."""
    name, key, pos, has_gauss, gauss = rng.get_state(legacy=True)
    return {"bit_generator": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_numpy_rng_state(rng: np.random.RandomState, state: Any) -> None:
    """Restore :func:`_numpy_rng_state` (or the raw ``get_state()`` tuple of a ``sed_lens.checkpoint/1``)."""
    if isinstance(state, dict):
        key = state["key"].cpu().numpy().astype(np.uint32)
        state = (state["bit_generator"], key, state["pos"], state["has_gauss"], state["gauss"])
    rng.set_state(state)


def _python_rng_state() -> list[Any]:
    """``random.getstate()`` as lists: ``[version, [624 words + position], gauss_next]``."""
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_python_rng_state(state: Sequence[Any]) -> None:
    version, internal, gauss = state
    random.setstate((version, tuple(internal), gauss))


def _min_test_acc(row: dict[str, Any], task: Task) -> float:
    return min(row[f"test/acc/{op}"] for op in task.ops)


class _StopSignals:
    """While active (main thread only), SIGINT and SIGTERM set ``signum`` instead of stopping the process, so
    the training loop can finish its step and checkpoint; a second signal stops at once as usual. A signal the
    process ignores (``SIG_IGN``: a job started with ``nohup`` or in the background) stays ignored."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # asked twice: give up on the checkpoint
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.signum = signum

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                if signal.getsignal(s) is signal.SIG_IGN:
                    continue
                try:
                    self.previous[s] = signal.signal(s, self._handle)
                except (ValueError, OSError):  # e.g. an embedded interpreter that owns its signals
                    pass
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}


def _in_notebook() -> bool:
    """True inside a running Jupyter kernel — not merely when something imported ipykernel (nbclient, a test that
    executes a notebook), which would put carriage-return bars into a log file."""
    if "ipykernel" not in sys.modules or "IPython" not in sys.modules:
        return False
    shell = sys.modules["IPython"].get_ipython()
    return shell is not None and hasattr(shell, "kernel")


class _Progress:
    """Training progress. In a terminal or notebook a tqdm bar over the step cap (the description says when the
    stop rule can end the run sooner) with loss, train and test accuracy; elsewhere — a log file, CI — a plain
    line about every 5 % of the cap, so logs get no carriage-return updates."""

    LINES = 20

    def __init__(self, trainer: Trainer) -> None:
        cfg = trainer.config
        self.trainer = trainer
        if cfg.stop_at_grok:
            note = f" (stops at grok: test acc ≥ {cfg.grok_acc:g})"
        elif cfg.stop_patience > 0:
            note = f" (stops early at test acc ≥ {cfg.stop_acc:g})"
        else:
            note = ""
        self.desc = f"train{note}"
        self.t0 = time.perf_counter()
        self.last_line: int | None = None
        self.bar: Any = None
        if sys.stderr.isatty() or _in_notebook():
            self.bar = tqdm(total=cfg.steps, initial=trainer.step, desc=self.desc, unit="step", mininterval=0.5,
                            dynamic_ncols=True, leave=True)
        else:
            n_evals = max(1, cfg.steps // cfg.eval_every)
            self.every = math.ceil(n_evals / self.LINES) * cfg.eval_every

    def status(self, row: dict[str, Any]) -> dict[str, str]:
        ops = self.trainer.task.ops
        return {"loss": f"{self.trainer.loss:.3g}",
                "train_acc": f"{min(row[f'train/acc/{op}'] for op in ops):.3f}",
                "test_acc": f"{min(row[f'test/acc/{op}'] for op in ops):.3f}"}

    def step(self, row: dict[str, Any] | None) -> None:
        if self.bar is not None:
            if row is not None:
                self.bar.set_postfix(self.status(row), refresh=False)
            self.bar.update(1)
        elif row is not None and self.trainer.step % self.every == 0:
            self.line(row)

    def line(self, row: dict[str, Any]) -> None:
        t = self.trainer
        status = " | ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.status(row).items())
        print(f"{self.desc}: step {t.step}/{t.config.steps} | {status} | {time.perf_counter() - self.t0:.1f} s",
              file=sys.stderr, flush=True)
        self.last_line = t.step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.trainer.history and self.last_line != self.trainer.step and self.trainer.history[-1]["step"] > 0:
            self.line(self.trainer.history[-1])
