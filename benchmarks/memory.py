"""Memory of a long run with live SED capture vs storing a checkpoint every 25 steps (the paper's code).

``python -m benchmarks.memory [--steps 8000] [--ops add]`` trains the paper's model for ``--steps`` steps with
``GradientCapture`` (update + gradient + per-task SED, W 20, k 3, every 25 steps; early stopping off), samples
the process RSS as it goes and reports its peak (``ru_maxrss``) beside what keeping every 25-step state dict
in memory costs — what the paper's ``train_dense.py`` does before its SED analysis.
"""

from __future__ import annotations

import argparse
import resource
import time

import psutil

from benchmarks.common import machine
from sed_lens.cli import ArgumentParser
from sed_lens.hooks.capture import GradientCapture
from sed_lens.models import build_model
from sed_lens.tasks import ModularArithmetic
from sed_lens.training import Callback, TrainConfig, Trainer


class RSS(Callback):
    def __init__(self, every: int) -> None:
        self.every = every
        self.samples: list[tuple[int, int]] = []
        self.proc = psutil.Process()

    def on_after_step(self, trainer: Trainer) -> None:
        if trainer.step % self.every == 0:
            self.samples.append((trainer.step, self.proc.memory_info().rss))


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--ops", default="add")
    args = ap.parse_args()
    task = ModularArithmetic(97, args.ops.split(","), 0.5, 42)
    model = build_model("xu2026", task, seed=42)
    state_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    rss = RSS(500)
    cap = GradientCapture(window=20, k=3, every=25)
    cfg = TrainConfig(steps=args.steps, stop_patience=0, checkpoint_every=0)
    t = time.perf_counter()
    Trainer(model, task, cfg, [cap, rss], progress=False).fit()
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n_ckpt = args.steps // 25 + 1
    mib = 2**20
    print(f"machine: {machine()}\n{args.steps} steps, ops {args.ops}, {wall:.0f} s\n")
    print("| step | RSS (MiB) |")
    print("|---|---|")
    for step, r in rss.samples:
        print(f"| {step} | {r / mib:.0f} |")
    print()
    streams = len(cap.seds)
    window_bytes = sum(s._x.numel() * s._x.element_size() for s in cap.seds.values() if s._x is not None)
    print("| approach | memory held for SED (MiB) | process peak RSS (MiB) |")
    print("|---|---|---|")
    print(f"| sed_lens streaming ({streams} windows of 20 × P) | {window_bytes / mib:.1f} | {peak / mib:.0f} |")
    print(f"| a state dict every 25 steps ({n_ckpt} × {state_bytes / mib:.2f} MiB) | {n_ckpt * state_bytes / mib:.0f} | "
          f"≈ {(peak - window_bytes + n_ckpt * state_bytes) / mib:.0f} (estimated) |")
    first, last = rss.samples[0][1], rss.samples[-1][1]
    print(f"\nRSS change from step {rss.samples[0][0]} to {rss.samples[-1][0]}: {(last - first) / mib:+.1f} MiB")


if __name__ == "__main__":
    main()
