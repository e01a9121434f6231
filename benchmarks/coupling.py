"""Coupling per snapshot: exact JVP (and HVP) vs the paper's finite differences, same work.

``python -m benchmarks.coupling`` measures, on the paper's model (p 97) at a trained-ish state, the centroid
response of 23 directions (random ones: the cost does not depend on which) over 1024 probes — one snapshot of the paper's protocol — by
``method="jvp"`` (forward-over-reverse: one direction per call, and the default chunk — on a CPU capped at 2
directions per call at 1,024 probes, :data:`~sed_lens.analysis.coupling.CPU_DIRECTION_PROBES`), ``method="hvp"`` (reverse-over-reverse) and
``method="fd"`` (central difference, ε_rel 0.005), round-robin in one process, and reports their agreement.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks.common import interleaved, machine
from sed_lens.analysis.coupling import centroid_response
from sed_lens.cli import ArgumentParser
from sed_lens.models import build_model
from sed_lens.subspace import ParamSubspace
from sed_lens.tasks import ModularArithmetic
from sed_lens.training import TrainConfig, Trainer


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=300, help="train a little first, so the state is not the init")
    args = ap.parse_args()
    task = ModularArithmetic(97, ("add",), 0.5, 42)
    model = build_model("xu2026", task, seed=42)
    Trainer(model, task, TrainConfig(steps=args.train_steps, checkpoint_every=0), progress=False).fit()
    S = ParamSubspace.attention(model)
    probes = task.probes(1024, 0)
    dirs = S.random_directions(23, torch.Generator().manual_seed(0))
    runs = {
        "jvp (1 per call)": lambda: centroid_response(model, S, dirs, probes, method="jvp", chunk_size=1),
        "jvp (default)": lambda: centroid_response(model, S, dirs, probes, method="jvp"),
        "hvp": lambda: centroid_response(model, S, dirs, probes, method="hvp"),
        "fd (ε_rel 0.005)": lambda: centroid_response(model, S, dirs, probes, method="fd", eps_rel=0.005),
    }
    values = {k: fn() for k, fn in runs.items()}
    t = interleaved(runs, reps=args.reps, inner=1, warmup=0)
    ref = values["jvp (default)"].double()
    print(f"machine: {machine()}\none snapshot: 23 directions × 1024 probes, P = {S.dim:,}\n")
    print("| method | s per snapshot | ratio to fd | max relative difference to jvp |")
    print("|---|---|---|---|")
    for k in runs:
        rel = float(((values[k].double() - ref).abs() / ref.abs()).max())
        print(f"| {k} | {t[k]:.2f} | {t[k] / t['fd (ε_rel 0.005)']:.2f} | {rel:.1e} |")
    print(f"\nrandom-direction responses: median {float(np.median(ref.numpy())):.3e}")


if __name__ == "__main__":
    main()
