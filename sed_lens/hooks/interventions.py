"""Keep or remove a rank-k subspace of the attention training signal (Xu 2026, §3): :class:`SubspaceProjection`.

Each optimizer step, a vector x ∈ S (the subspace's part of the training signal) is replaced by

* ``"keep"``:   x ← VᵀV x      (only the part in the span of the k orthonormal rows of V),
* ``"remove"``: x ← (I − VᵀV) x (everything but that part),
* ``"none"``:   x unchanged (the control; the window is still recorded, so conditions stay comparable).

**What x is** (``apply_to``):

* ``"gradient"`` — the paper's correct method. After backward and the global gradient-norm clip, right before
  the optimizer step, x is the subspace's gradient; its projection is written back into ``.grad``. The
  optimizer (its moments, its adaptive scaling) sees only the projected gradient; decoupled weight decay still
  acts on all weights, so the applied update is not exactly rank-k.
* ``"update"`` — the flawed method the paper corrects. The optimizer takes its normal step; then x is the
  applied update Δθ = θ_new − θ_old of the subspace, and the weights are reset to θ_old + P(Δθ). The
  optimizer's state has seen the full gradient.

**Where V comes from** (``basis``):

* ``"sed"`` — the top-k right singular vectors of a rolling window of the last ``window`` vectors *actually
  applied* (already projected, once projection is on), from :class:`sed_lens.analysis.sed.RollingSED`: an
  incremental W×W Gram matrix, W dot products per step, no SVD of the window. The basis used at step t comes
  from the vectors of steps t−W … t−1.
* ``"random"`` — a fresh uniformly random orthonormal k-basis every step (QR of a P×k Gaussian), drawn from a
  ``torch.Generator`` seeded with ``seed``.
* a tensor ``[k, P]`` with orthonormal rows — a fixed basis.

No projection happens until ``warmup`` vectors have been applied (default: ``window``, i.e. until the window is
full); the vectors of the warm-up steps are applied unprojected and fill the window.

**Two ways to use it** — as a :class:`sed_lens.training.Callback` of a :class:`sed_lens.training.Trainer`::

    Trainer(model, task, config, callbacks=[SubspaceProjection(mode="keep")]).fit()

or around your own loop, with any ``torch.optim`` optimizer::

    proj = SubspaceProjection(ParamSubspace.attention(model), k=3, mode="keep", basis="sed")
    with proj.attach(model, optimizer):
        for x, y in batches:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()  # the projection runs inside step(): a pre-hook (gradient) or a post-hook (update)

``attach`` registers ``optimizer.register_step_pre_hook``/``register_step_post_hook`` hooks; they run *inside*
``optimizer.step()``, so the gradient hook sees the gradients after anything your loop did before ``step()``
(clipping included). Every hook is removed when the ``with`` block exits, also when it raises. Only the
subspace's parameters (the selected slices) are read or written; every other gradient and weight is untouched.

Like GaLore's projector, the object is separate from the optimizer: :meth:`SubspaceProjection.project` takes one
step of the protocol on any flat ``[P]`` vector (choose the basis, project, record the applied vector), and the
hooks only move vectors between the model and it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from sed_lens.analysis.sed import RollingSED
from sed_lens.configs import APPLY_TO, BASES, MODES
from sed_lens.errors import SedLensError, check
from sed_lens.subspace import ParamSubspace
from sed_lens.training import Callback, Trainer

ORTHONORMAL_TOL = 1e-4  # max |V Vᵀ − I| accepted for a user basis (float32 rounding is ~1e-6)


class SubspaceProjection(Callback):
    """Keep or remove a rank-k subspace of the training signal of ``subspace`` (see the module docstring).

    Args:
        subspace: the :class:`ParamSubspace` the signal lives in; default: every attention weight matrix
            (``ParamSubspace.attention(model)``) of the model it is attached to.
        k: rank of the subspace kept or removed (default 3; for a basis tensor, its number of rows).
        mode: ``"keep"``, ``"remove"`` or ``"none"`` (control).
        basis: ``"sed"``, ``"random"`` or a ``[k, P]`` tensor with orthonormal rows.
        apply_to: ``"gradient"`` (project ``.grad`` before the optimizer step) or ``"update"`` (project the applied
            update after it).
        window: W, the number of most recent applied vectors the SED basis is computed from (≥ k).
        warmup: steps without projection at the start (default ``window``: until the window is full).
        seed: seed of the random bases.

    Attributes:
        steps: steps seen so far (projected or not).
        window_sed: the :class:`RollingSED` window of applied vectors.
        last_basis: the ``[k, P]`` basis used at the last step (``None`` if it was not projected).
    """

    def __init__(self, subspace: ParamSubspace | None = None, k: int | None = None, mode: str = "keep",
                 basis: str | Tensor = "sed", apply_to: str = "gradient", window: int = 20,
                 warmup: int | None = None, seed: int = 0) -> None:
        check(mode in MODES, f"unknown projection mode {mode!r}; choose {', '.join(MODES)}.")
        check(apply_to in APPLY_TO, f"unknown apply_to {apply_to!r}; choose {' or '.join(APPLY_TO)}.")
        fixed: Tensor | None = None
        if isinstance(basis, Tensor):
            check(basis.ndim == 2 and basis.shape[0] >= 1,
                  f"a basis tensor must have shape [k, P], got {tuple(basis.shape)}.")
            fixed = basis.detach().clone()
            check(k is None or k == fixed.shape[0],
                  f"the basis tensor has {fixed.shape[0]} rows but k={k}; pass k={fixed.shape[0]} or leave k out.")
            k = fixed.shape[0]
            check(bool(torch.isfinite(fixed).all()), "the basis tensor has NaN or inf entries.")
            gram = fixed.double() @ fixed.double().T
            err = float((gram - torch.eye(k, dtype=torch.float64, device=fixed.device)).abs().max())
            check(err <= ORTHONORMAL_TOL, f"the basis rows must be orthonormal (max |V Vᵀ − I| = {err:.2g}); "
                  "orthonormalise them first, e.g. with torch.linalg.qr.")
        else:
            check(isinstance(basis, str) and basis in BASES,
                  f"unknown basis {basis!r}; choose {' or '.join(BASES)} or pass a [k, P] tensor.")
        k = 3 if k is None else k
        check(isinstance(k, int) and not isinstance(k, bool) and k >= 1, f"k must be a positive integer, got {k!r}.")
        check(isinstance(window, int) and window >= 1, f"window must be a positive integer, got {window!r}.")
        check(window >= k, f"the window must hold at least k={k} vectors, got window={window}.")
        warmup = window if warmup is None else warmup
        check(isinstance(warmup, int) and warmup >= 0, f"warmup must be a non-negative integer, got {warmup!r}.")
        self.basis_kind = "fixed" if fixed is not None else str(basis)
        check(not (self.basis_kind == "sed" and mode != "none" and warmup < 1),
              "the SED basis needs at least one applied vector before projecting: use warmup ≥ 1.")
        check(isinstance(seed, int), f"seed must be an integer, got {seed!r}.")
        self.k, self.mode, self.apply_to, self.window, self.warmup, self.seed = k, mode, apply_to, window, warmup, seed
        self._fixed = fixed
        self.subspace: ParamSubspace | None = None
        self._auto_subspace = subspace is None
        if subspace is not None:
            self._set_subspace(subspace)
        self.window_sed = RollingSED(window, k)
        self._window_dropped = False  # loaded from a finished run's checkpoint, which keeps no window
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.last_basis: Tensor | None = None
        self._theta_before: Tensor | None = None  # subspace weights before the step (update method)
        self._handles: list[Any] = []
        self._stats = _Stats()  # since the last eval
        self._total = _Stats()  # whole run

    # --- description -------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"SubspaceProjection(mode={self.mode!r}, k={self.k}, basis={self.basis_kind!r}, "
                f"apply_to={self.apply_to!r}, window={self.window}, warmup={self.warmup}, seed={self.seed}, "
                f"dim={None if self.subspace is None else self.subspace.dim})")

    def describe(self) -> dict[str, Any]:
        """JSON-able settings and whole-run statistics (steps, projected steps, mean kept norm fraction)."""
        return {"mode": self.mode, "k": self.k, "basis": self.basis_kind, "apply_to": self.apply_to,
                "window": self.window, "warmup": self.warmup, "seed": self.seed,
                "dim": None if self.subspace is None else self.subspace.dim, "steps": self.steps,
                "projected_steps": self._total.projected, "mean_kept_fraction": self._total.mean_kept()}

    @property
    def active(self) -> bool:
        """Whether the next step will be projected (past the warm-up, mode not ``"none"``)."""
        return self.mode != "none" and self.steps >= self.warmup

    # --- binding to a model ------------------------------------------------------------------------------
    def _set_subspace(self, subspace: ParamSubspace) -> None:
        check(isinstance(subspace, ParamSubspace), f"subspace must be a ParamSubspace, got {type(subspace).__name__}.")
        check(self.k <= subspace.dim, f"k={self.k} exceeds the subspace's dimension {subspace.dim}.")
        if self._fixed is not None:
            check(self._fixed.shape[1] == subspace.dim, f"the basis tensor has {self._fixed.shape[1]} columns but the "
                  f"subspace has dimension {subspace.dim}; its shape must be [k, {subspace.dim}].")
            self._fixed = self._fixed.to(subspace.parameters[0].device)
        self.subspace = subspace

    def bind(self, model: nn.Module) -> ParamSubspace:
        """Use this projection on ``model``: build the default subspace, or check that the given one is the model's."""
        if self.subspace is not None and _owns(model, self.subspace):
            return self.subspace
        check(self._auto_subspace, "the subspace was built on another model than the one being trained; "
              "build it with ParamSubspace.attention(model) on this model.")
        self._set_subspace(ParamSubspace.attention(model))
        assert self.subspace is not None
        return self.subspace

    # --- the protocol on one vector ----------------------------------------------------------------------
    def current_basis(self, device: torch.device | None = None) -> Float[Tensor, "k P"] | None:
        """The basis of the next step (``None`` during warm-up or in mode ``"none"``). A random basis is drawn
        here, so call it once per step (:meth:`project` does)."""
        if not self.active:
            return None
        if self._fixed is not None:
            return self._fixed
        if self.basis_kind == "random":
            v = self._require_subspace().random_basis(self.k, self.generator)
            return v.to(device) if device is not None else v
        return self._sed_basis()

    def _sed_basis(self) -> Float[Tensor, "k P"]:
        """Top-k right singular vectors of the window of applied vectors (zero rows if its rank is below k)."""
        return self.window_sed.directions()

    @torch.no_grad()
    def project(self, vec: Float[Tensor, " P"]) -> Float[Tensor, " P"]:
        """One step of the protocol on ``vec``: pick this step's basis, project (or not, during warm-up and in
        mode ``"none"``), record the result in the window and return it (``vec`` itself when unchanged)."""
        if not isinstance(vec, Tensor) or vec.ndim != 1:
            got = tuple(vec.shape) if isinstance(vec, Tensor) else type(vec).__name__
            raise SedLensError(f"project expects a flat [P] vector, got {got}.")
        self._require_window()
        if self.subspace is not None:
            check(vec.shape[0] == self.subspace.dim,
                  f"project expects vectors of the subspace's dimension {self.subspace.dim}, got {vec.shape[0]}.")
        v = self.current_basis(vec.device)
        if v is None:
            out = vec
        else:
            check(v.shape[1] == vec.shape[0], f"the basis has dimension {v.shape[1]} but the vector {vec.shape[0]}.")
            v = v.to(vec.device, vec.dtype)  # a random basis is drawn on the CPU; a window loaded from a checkpoint is there too
            inside = (vec @ v.T) @ v
            out = inside if self.mode == "keep" else vec - inside
        self.window_sed.push(out)
        raw, kept = float(torch.linalg.vector_norm(vec)), float(torch.linalg.vector_norm(out))
        for s in (self._stats, self._total):
            s.add(raw, kept, v is not None)
        self.last_basis = v
        self.steps += 1
        return out

    # --- the two hooks -----------------------------------------------------------------------------------
    @torch.no_grad()
    def before_step(self) -> None:
        """Right before the optimizer step: project the gradient (``"gradient"``) or remember the weights (``"update"``)."""
        self._require_window()  # before the optimizer step, also for the update method
        s = self._require_subspace()
        if self.apply_to == "gradient":
            g = s.grads()
            out = self.project(g)
            if out is not g:
                s.set_grads(out)
        else:
            self._theta_before = s.weights()

    @torch.no_grad()
    def after_step(self) -> None:
        """Right after the optimizer step (``"update"``): replace the applied update Δθ by its projection."""
        if self.apply_to != "update":
            return
        s = self._require_subspace()
        check(self._theta_before is not None, "after_step ran without before_step in the same optimizer step.")
        assert self._theta_before is not None
        delta = s.weights() - self._theta_before
        out = self.project(delta)
        if out is not delta:
            s.set_weights(self._theta_before + out)
        self._theta_before = None

    def _require_window(self) -> None:
        if self._window_dropped:
            raise SedLensError(
                "this projection was loaded from the checkpoint of a finished run, which keeps no SED window (it is "
                "dropped when the run completes, to save disk), so it cannot continue training: its SED basis and "
                "logged σ would be wrong. Delete the run directory and train the run again (an intervention "
                "grid retrains a cell whose directory is gone).")

    def _require_subspace(self) -> ParamSubspace:
        check(self.subspace is not None, "the projection is not bound to a model: use attach(model, optimizer), "
              "pass it to a Trainer, or call bind(model) first.")
        assert self.subspace is not None
        return self.subspace

    # --- use 1: around a user's loop ---------------------------------------------------------------------
    @contextmanager
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[SubspaceProjection]:
        """Project inside every ``optimizer.step()`` of the ``with`` block; all hooks are removed on exit.

        The pre-hook runs inside ``optimizer.step()``, before the update: it sees the gradients as your loop left
        them (after clipping). Optimizers stepped with a closure (e.g. LBFGS) are refused, since the closure
        recomputes the gradients after the pre-hook.
        """
        check(isinstance(optimizer, torch.optim.Optimizer),
              f"attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        check(not self._handles, "this projection is already attached; exit the other `with` block first.")
        s = self.bind(model)
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, p in zip(s.names, s.parameters, strict=True) if id(p) not in optimized]
        check(not missing, f"the optimizer does not update {missing[0] if missing else ''}, a parameter of the subspace.")
        self._handles = [optimizer.register_step_pre_hook(self._pre_hook),
                         optimizer.register_step_post_hook(self._post_hook)]
        try:
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles = []
            self._theta_before = None

    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        positional = args[1:] if args and args[0] is optimizer else args  # torch passes the optimizer itself first
        if any(a is not None for a in positional) or kwargs.get("closure") is not None:
            raise SedLensError("SubspaceProjection cannot wrap an optimizer step with a closure: the closure "
                               "recomputes the gradients after the projection.")
        self.before_step()

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.after_step()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # --- use 2: a Trainer callback -----------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer) -> None:
        self.bind(trainer.model)

    def on_before_step(self, trainer: Trainer) -> None:
        self.before_step()

    def on_after_step(self, trainer: Trainer) -> None:
        self.after_step()

    def metrics(self, reset: bool = True) -> dict[str, Any]:
        """``intervention/active`` (1 if the last step was projected), ``intervention/kept_fraction`` (mean
        ‖P x‖/‖x‖ over the projected steps since the last call; absent if there were none),
        ``intervention/projected_steps`` (so far), and the window's ``intervention/sigma_j`` (j = 1..k+1, singular
        values of the applied vectors)."""
        out: dict[str, Any] = {"intervention/active": int(self.last_basis is not None),
                               "intervention/projected_steps": self._total.projected}
        if self._stats.projected:
            out["intervention/kept_fraction"] = self._stats.mean_kept()
        if self.window_sed.n_pushed:
            sigma = self.window_sed.singular_values()
            for j in range(self.k + 1):
                out[f"intervention/sigma_{j + 1}"] = float(sigma[j]) if j < len(sigma) else 0.0
        if reset:
            self._stats = _Stats()
        return out

    def on_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        metrics.update(self.metrics())

    def on_train_end(self, trainer: Trainer) -> None:
        if trainer.run is not None:
            trainer.run.summary({"intervention": self.describe()})

    # --- resume ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"settings": {k: v for k, v in self.describe().items() if k in ("mode", "k", "basis", "apply_to",
                                                                             "window", "warmup", "seed")},
                "steps": self.steps, "window": None if self._window_dropped else self.window_sed.state_dict(),
                "generator": self.generator.get_state(), "stats": self._stats.as_tuple(),
                "total": self._total.as_tuple()}

    def final_state_dict(self) -> dict[str, Any]:
        """The state without the SED window (``"window": None``; W×P floats, ≈ 10 MB of the paper's 14 MB
        checkpoint), which only continuing training reads: settings, step count, generator and statistics stay."""
        return {**self.state_dict(), "window": None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, or :meth:`final_state_dict` (then any further step raises
        :class:`SedLensError`)."""
        mine = {k: v for k, v in self.describe().items() if k in state["settings"]}
        check(mine == state["settings"], f"the saved projection state has settings {state['settings']}, "
              f"which differ from this projection's {mine}.")
        self.window_sed = RollingSED(self.window, self.k)
        self._window_dropped = state["window"] is None
        if not self._window_dropped:
            self.window_sed.load_state_dict({k: v.clone() if isinstance(v, Tensor) else v
                                             for k, v in state["window"].items()})
        self.generator.set_state(state["generator"])
        self.steps = int(state["steps"])
        self._stats, self._total = _Stats(*state["stats"]), _Stats(*state["total"])
        self.last_basis = None


class _Stats:
    """Step counts and the running sum of the kept norm fraction ‖P x‖/‖x‖ over projected steps."""

    def __init__(self, n: int = 0, projected: int = 0, kept_sum: float = 0.0) -> None:
        self.n, self.projected, self.kept_sum = n, projected, kept_sum

    def add(self, raw: float, kept: float, projected: bool) -> None:
        self.n += 1
        if projected:
            self.projected += 1
            self.kept_sum += kept / raw if raw > 0 else 1.0

    def mean_kept(self) -> float:
        return self.kept_sum / self.projected if self.projected else math.nan

    def as_tuple(self) -> tuple[int, int, float]:
        return self.n, self.projected, self.kept_sum


def _owns(model: nn.Module, subspace: ParamSubspace) -> bool:
    """Whether every parameter the subspace reads is a parameter of ``model`` (the same tensor)."""
    ids = {id(p) for p in model.parameters()}
    return all(id(p) in ids for p in subspace.parameters)
