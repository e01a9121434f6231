"""``SnapshotStore``: keep the model's state every ``every`` steps, as the paper's code does.

The SED analysis of the paper reads a model state every 25 steps. sed_lens's live capture
(:class:`~sed_lens.hooks.capture.GradientCapture`) needs none; this store is for analyses that need the model
*at* chosen snapshots after training — the coupling at 40 evenly spaced snapshots of a finished run, with
leading windows that look ahead. States are kept in memory (≈1.2 MB each for the paper's model) or written to
``directory`` as ``step_XXXXXX.pt``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor

from sed_lens.errors import check
from sed_lens.serialization import load as load_file
from sed_lens.serialization import save as save_file
from sed_lens.training import Callback, Trainer

State = dict[str, Tensor]


class SnapshotStore(Callback):
    """Model states at step 0 and every ``every`` steps; iterate to get ``(step, state)`` pairs in order."""

    def __init__(self, every: int = 25, directory: str | Path | None = None) -> None:
        check(isinstance(every, int) and every >= 1, f"the snapshot interval must be a positive integer, got {every!r}.")
        self.every = every
        self.directory = Path(directory) if directory is not None else None
        self.steps: list[int] = []
        self._states: list[State] = []

    @classmethod
    def load(cls, directory: str | Path, every: int) -> SnapshotStore:
        """The store a finished run wrote to ``directory`` (its ``step_XXXXXX.pt`` files, in step order)."""
        store = cls(every, directory)
        store.steps = sorted(int(p.stem.split("_")[1]) for p in Path(directory).glob("step_*.pt"))
        check(len(store.steps) > 0, f"{directory} holds no saved snapshots (step_XXXXXX.pt).")
        return store

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.step == 0 and not self.steps:
            self.take(trainer)

    def on_after_step(self, trainer: Trainer) -> None:
        if trainer.step % self.every == 0:
            self.take(trainer)

    def take(self, trainer: Trainer) -> None:
        state = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            save_file(state, self.directory / f"step_{trainer.step:06d}.pt")
        else:
            self._states.append(state)
        self.steps.append(trainer.step)

    def __len__(self) -> int:
        return len(self.steps)

    def state(self, i: int) -> State:
        """The ``i``-th stored state."""
        if self.directory is not None:
            state: State = load_file(self.directory / f"step_{self.steps[i]:06d}.pt")
            return state
        return self._states[i]

    def __iter__(self) -> Iterator[tuple[int, State]]:
        for i, step in enumerate(self.steps):
            yield step, self.state(i)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "states": self._states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self._states = list(state["steps"]), list(state["states"])
