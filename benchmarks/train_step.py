"""Training-step time: sed_lens vs a bare PyTorch loop on the same architecture and batch.

``python benchmarks/train_step.py`` prints a Markdown table of ms/step and ratios, measured in one process,
round-robin. Variants (all AdamW lr 1e-3, wd 1.0, betas (0.9, 0.98), clip 1.0, batch 512, p 97):

* ``torch``: the paper's model as ``nn.TransformerEncoder`` (:class:`sed_lens.torch_reference.TorchTransformer`),
  a plain loop: sample, forward, cross-entropy, backward, clip, step;
* ``hooked``: the same loop on the equivalent ``HookedTransformer`` (TransformerLens' overhead alone);
* ``trainer``: ``sed_lens.Trainer`` steps (sampling, per-op losses, callbacks hooks, progress bookkeeping);
  evaluation excluded (it runs every 25 steps in the protocol and is reported separately, per step);
* ``compiled``: the same Trainer with ``TrainConfig(compile=True)`` (``torch.compile`` of the step's forward and
  backward; the one-off compile happens in the warm-up and is timed separately).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import interleaved, machine
from sed_lens.cli import ArgumentParser
from sed_lens.models import build_model, torch_reference
from sed_lens.tasks import ModularArithmetic
from sed_lens.training import TrainConfig, Trainer, evaluate, make_optimizer


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--inner", type=int, default=20)
    args = ap.parse_args()
    cfg = TrainConfig()
    task = ModularArithmetic(97, ("add",), 0.5, 42)
    torch.use_deterministic_algorithms(True, warn_only=True)  # as the Trainer runs

    ref = torch_reference("xu2026", task, 42)
    ref_opt = make_optimizer(ref, cfg)
    ref_rs = np.random.RandomState(0)

    def torch_step() -> None:
        x, y = task.batch(cfg.batch_size, ref_rs)
        loss = F.cross_entropy(ref(x), y["add"])
        ref_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.grad_clip)
        ref_opt.step()

    hooked = build_model("xu2026", task, seed=42)
    h_opt = make_optimizer(hooked, cfg)
    h_rs = np.random.RandomState(0)

    def hooked_step() -> None:
        x, y = task.batch(cfg.batch_size, h_rs)
        loss = F.cross_entropy(hooked(x)[:, 0], y["add"])
        h_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hooked.parameters(), cfg.grad_clip)
        h_opt.step()

    trainer = Trainer(build_model("xu2026", task, seed=42), task, TrainConfig(deterministic=False), progress=False)
    fast = Trainer(build_model("xu2026", task, seed=42), task, TrainConfig(deterministic=False, compile=True),
                   progress=False)
    t0 = time.perf_counter()
    fast.train_step()  # the one-off compile (TorchInductor's on-disk cache makes later processes faster)
    t_compile = time.perf_counter() - t0

    t = interleaved({"torch": torch_step, "hooked": hooked_step, "trainer": trainer.train_step,
                     "compiled": fast.train_step}, reps=args.reps, inner=args.inner)
    t_eval = interleaved({"eval": lambda: evaluate(hooked, task)}, reps=3, inner=3)["eval"]
    print(f"machine: {machine()}\n")
    print("| variant | ms/step | ratio to bare PyTorch |")
    print("|---|---|---|")
    for k, label in (("torch", "bare PyTorch (nn.TransformerEncoder)"), ("hooked", "HookedTransformer, plain loop"),
                     ("trainer", "sed_lens Trainer"),
                     ("compiled", f"sed_lens Trainer, compile=True (first step, compiling: {t_compile:.0f} s)")):
        print(f"| {label} | {t[k] * 1e3:.1f} | {t[k] / t['torch']:.2f}× |")
    per_step_eval = t_eval / cfg.eval_every
    print(f"| + full train/test eval every {cfg.eval_every} steps | {per_step_eval * 1e3:.1f} per step "
          f"({t_eval * 1e3:.0f} per eval) | {(t['trainer'] + per_step_eval) / t['torch']:.2f}× (Trainer with eval) |")


if __name__ == "__main__":
    main()
