"""Load what was run: ``load_run(RUN_DIR)`` rebuilds a run directory's config, task, model, metrics and SED bases.

::

    from sed_lens import load_run

    run = load_run("runs/grokking/add-p97-s42-20260101-120000")
    run.config                 # the GrokkingConfig it was made with
    run.model                  # the HookedTransformer at the end of training (checkpoints/last.pt)
    run.model_at(1000)         # at a saved snapshot (runs made with --snapshot-every)
    run.metrics_frame()        # metrics.jsonl as a pandas DataFrame (run.metrics: a list of records)
    run.summary, run.sed_bases

Works for grokking runs (also those of the intervention experiment) and coupling cells (their ``grokking``
settings). Models are rebuilt on the CPU unless ``device=`` says otherwise.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sed_lens.errors import SedLensError, check

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from sed_lens.experiments.grokking import GrokkingConfig
    from sed_lens.tasks import ModularArithmetic


class LoadedRun:
    """A run directory, read back. Attributes are read when first used (the model from its checkpoint)."""

    def __init__(self, run_dir: str | Path, device: str | None = None) -> None:
        from sed_lens.cli import config_from_dict
        from sed_lens.experiments.grokking import GrokkingConfig

        self.dir = Path(run_dir)
        check(self.dir.exists(), f"run directory {self.dir} does not exist.")
        check(self.dir.is_dir(), f"{self.dir} is a file, not a run directory.")
        path = self.dir / "config.json"
        check(path.is_file(), f"{self.dir} holds no config.json, so it is not a run directory.")
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise SedLensError(f"{path} is not valid JSON.") from None
        self.experiment: str = saved.get("experiment", "grokking")
        if self.experiment == "grokking":
            settings = {k: v for k, v in saved.items() if k != "experiment"}
        elif isinstance(saved.get("grokking"), dict):  # a coupling cell: its training settings
            settings = saved["grokking"]
        else:
            raise SedLensError(f"{self.dir} is a {self.experiment} run directory (an aggregate), which holds no "
                               "model; load one of its runs (e.g. under cells/).")
        self.raw_config: dict[str, Any] = saved
        self.config: GrokkingConfig = config_from_dict(GrokkingConfig, settings)
        self.device = device or "cpu"

    def __repr__(self) -> str:
        return f"LoadedRun({str(self.dir)!r}, {self.config.name}, steps={self.summary.get('steps')})"

    # --- task and model ----------------------------------------------------------------------------------
    @cached_property
    def task(self) -> ModularArithmetic:
        from sed_lens.configs import get_preset
        from sed_lens.tasks import ModularArithmetic

        c = self.config
        return ModularArithmetic(c.p, c.ops, c.train_frac, c.seed, layout=get_preset(c.preset).layout)

    def _new_model(self) -> HookedTransformer:
        from sed_lens.models import build_model

        c = self.config
        return build_model(c.preset, self.task, init=c.init, seed=c.seed, device=self.device)

    @cached_property
    def model(self) -> HookedTransformer:
        """The model at the end of training (the run's last checkpoint, ``checkpoints/last.pt``)."""
        from sed_lens.serialization import UnsafeFileError, load

        path = self.dir / "checkpoints" / "last.pt"
        check(path.is_file(), f"{self.dir} has no checkpoint (checkpoints/last.pt): the run was made with "
              "--checkpoint-every 0 or stopped before its first checkpoint.")
        try:
            state = load(path, map_location=self.device)
            check(isinstance(state, dict) and "model" in state, "not a checkpoint")
        except UnsafeFileError:
            raise
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
            raise SedLensError(f"checkpoint {path} is truncated or corrupted ({type(e).__name__}).") from None
        model = self._new_model()
        model.load_state_dict(state["model"])
        model.eval()
        self.model_step = int(state.get("step", -1))
        return model

    @property
    def snapshot_steps(self) -> list[int]:
        """Steps with a saved model state (``snapshots/step_XXXXXX.pt``; runs made with ``--snapshot-every``)."""
        d = self.dir / "snapshots"
        return sorted(int(m[1]) for p in d.glob("step_*.pt") if (m := re.fullmatch(r"step_(\d+)\.pt", p.name)))

    def model_at(self, step: int) -> HookedTransformer:
        """The model at a saved snapshot ``step`` (a fresh model each call)."""
        from sed_lens.serialization import load

        steps = self.snapshot_steps
        if not steps:
            raise SedLensError(f"{self.dir} saved no snapshots; train with --snapshot-every N to keep the model "
                               "every N steps (the end of training is run.model).")
        if step not in steps:
            shown = ", ".join(map(str, steps[:8])) + (f", … {steps[-1]}" if len(steps) > 8 else "")
            raise SedLensError(f"no snapshot at step {step} in {self.dir}; saved steps: {shown}.")
        model = self._new_model()
        model.load_state_dict(load(self.dir / "snapshots" / f"step_{step:06d}.pt", map_location=self.device))
        model.eval()
        return model

    # --- records -----------------------------------------------------------------------------------------
    @cached_property
    def metrics(self) -> list[dict[str, Any]]:
        """``metrics.jsonl`` as a list of records (one per eval: ``step``, losses, accuracies, ``sed/*``, …)."""
        from sed_lens.tracking import read_jsonl

        path = self.dir / "metrics.jsonl"
        return read_jsonl(path) if path.is_file() else []

    def metrics_frame(self) -> Any:
        """The metrics as a ``pandas.DataFrame`` indexed by step (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise SedLensError("metrics_frame needs pandas (pip install pandas); run.metrics has the same "
                               "records as a list of dicts.") from None
        frame = pd.DataFrame.from_records(self.metrics)
        return frame.set_index("step") if "step" in frame else frame

    @cached_property
    def summary(self) -> dict[str, Any]:
        """``summary.json`` (steps, grok step, final metrics, final coupling, …); empty for an unfinished run."""
        path = self.dir / "summary.json"
        if not path.is_file():
            return {}
        try:
            return dict(json.loads(path.read_text()))
        except json.JSONDecodeError:
            raise SedLensError(f"{path} is not valid JSON.") from None

    @cached_property
    def sed_bases(self) -> dict[str, Any] | None:
        """``sed_bases.pt`` (the final SED bases per stream, with the subspace layout), or None if not saved."""
        from sed_lens.serialization import load

        path = self.dir / "sed_bases.pt"
        return load(path, map_location="cpu") if path.is_file() else None

    @property
    def history(self) -> list[dict[str, Any]]:
        """The metrics records (what ``TrainResult.history`` held), for the plot helpers."""
        return self.metrics

    def figures(self, log_steps: bool = False) -> dict[str, Any]:
        """The figures of a grokking run directory, redrawn from its files (nothing is written):
        ``{"grokking": …, "sed_spectra": …, "coupling": …}`` — the last two where the run recorded SED / measured
        the final coupling. Each ``Figure`` displays inline in Jupyter."""
        from sed_lens.plots import final_coupling_figure, grokking_figure, sed_spectra_figure, sed_streams

        run = self
        cfg, history = run.config, run.metrics
        check(len(history) > 0, f"{run.dir} has no metrics yet (metrics.jsonl is empty or missing).")
        grok = run.summary.get("grok_step")
        if grok is None:  # an unfinished run: the grok step from its metrics
            grok = {op: next((r["step"] for r in history if r.get(f"test/acc/{op}", 0) >= cfg.train.grok_acc), None)
                    for op in cfg.ops}
        figs = {"grokking": grokking_figure(history, cfg.ops, grok, f"Grokking {cfg.name}", log_steps)}
        if sed_streams(history):
            figs["sed_spectra"] = sed_spectra_figure(history, f"SED spectra over training ({cfg.name})",
                                                     cfg.sed_window, cfg.sed_k)
        if run.summary.get("final_coupling"):
            figs["coupling"] = final_coupling_figure(run.summary["final_coupling"],
                                                     f"Coupling of the final SED bases ({cfg.name})")
        return figs



def load_run(run_dir: str | Path, device: str | None = None) -> LoadedRun:
    """Read a run directory back: ``.config``, ``.task``, ``.model``, ``.model_at(step)``, ``.metrics``,
    ``.metrics_frame()``, ``.summary``, ``.sed_bases`` (see :mod:`sed_lens.loading`). ``device``: where models
    are rebuilt (``"cpu"`` by default; ``"auto"``, ``"cuda"``, ``"mps"``)."""
    if device is not None:
        from sed_lens.devices import resolve_device

        device = resolve_device(device)
    return LoadedRun(run_dir, device)
