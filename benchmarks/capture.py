"""Per-op gradient capture options, and the training overhead of live SED capture.

``python -m benchmarks.capture`` measures, on the paper's model (p 97, batch 512, 4 ops, multitask heads):

1. ways to get the 4 per-op gradients on the attention weights (all exact): a loop of
   ``torch.autograd.grad(..., retain_graph=True)`` after one shared forward (what sed_lens uses);
   ``is_grads_batched=True`` (one vmapped backward over the 4 losses); 4 separate forward+backward passes;
   and, for scale, one plain forward+backward of the summed loss;
2. training with ``GradientCapture`` (update + gradient + per-task gradient SED, W 20, k 3, every 25 steps)
   vs plain training, single task add and multitask, as the wall-time ratio of 100-step chunks.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import interleaved, machine
from sed_lens.analysis.streams import gradient_batch, task_gradients
from sed_lens.cli import ArgumentParser
from sed_lens.hooks.capture import GradientCapture
from sed_lens.models import build_model, readout_logits, split_logits
from sed_lens.subspace import ParamSubspace
from sed_lens.tasks import ModularArithmetic
from sed_lens.training import TrainConfig, Trainer


def per_op_options(reps: int) -> dict[str, float]:
    task = ModularArithmetic(97, ("add", "sub", "mul", "sq"), 0.5, 42)
    model = build_model("xu2026", task, seed=42)
    S = ParamSubspace.attention(model)
    tokens, labels = gradient_batch(task, 512)
    params = S.parameters

    def losses() -> list[torch.Tensor]:
        logits = split_logits(model, readout_logits(model, tokens))
        return [F.cross_entropy(logits[op], labels[op]) for op in task.ops]

    def batched() -> None:
        ls = torch.stack(losses())
        torch.autograd.grad(ls, params, grad_outputs=torch.eye(4), is_grads_batched=True)

    def separate() -> None:
        for op in task.ops:
            logits = split_logits(model, readout_logits(model, tokens), [op])
            torch.autograd.grad(F.cross_entropy(logits[op], labels[op]), params)

    def plain() -> None:
        torch.autograd.grad(torch.stack(losses()).sum(), params)

    ref = task_gradients(model, S, tokens, labels)
    ls = torch.stack(losses())
    gb = torch.autograd.grad(ls, params, grad_outputs=torch.eye(4), is_grads_batched=True)
    for i, op in enumerate(task.ops):
        flat = S.flatten({n: g[i] for n, g in zip(S.names, gb, strict=True)})
        torch.testing.assert_close(flat, ref[op], rtol=1e-4, atol=1e-6)
    return interleaved({"loop": lambda: task_gradients(model, S, tokens, labels), "batched": batched,
                        "separate": separate, "plain": plain}, reps=reps, inner=5)


def capture_overhead(ops: tuple[str, ...], reps: int) -> float:
    task = ModularArithmetic(97, ops, 0.5, 42)
    plain = Trainer(build_model("xu2026", task, seed=42), task, TrainConfig(), progress=False)
    cap = GradientCapture(window=20, k=3, every=25)
    live = Trainer(build_model("xu2026", task, seed=42), task, TrainConfig(), [cap], progress=False)
    cap.on_train_start(live)
    for _ in range(25 * 20):  # fill the windows
        live.step += 1
        if live.step % 25 == 0:
            cap.snapshot(live)

    def chunk(trainer: Trainer) -> None:
        for _ in range(100):
            trainer.train_step()
        if trainer is live:  # what the eval hook adds every 25 steps
            cap.metrics()

    t = interleaved({"plain": lambda: chunk(plain), "live": lambda: chunk(live)}, reps=reps, inner=1, warmup=1)
    return t["live"] / t["plain"]


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    print(f"machine: {machine()}\n")
    t = per_op_options(args.reps)
    print("| per-op gradients (4 ops, batch 512, attention weights) | ms | ratio to one plain fwd+bwd |")
    print("|---|---|---|")
    for k, label in (("loop", "shared forward + autograd.grad per op (retain_graph) — sed_lens"),
                     ("batched", "shared forward + is_grads_batched backward"),
                     ("separate", "4 separate forward+backward passes"),
                     ("plain", "one forward+backward of the summed loss (not per-op)")):
        print(f"| {label} | {t[k] * 1e3:.1f} | {t[k] / t['plain']:.2f}× |")
    print()
    print("| training with live capture (update + gradient + per-task, W 20, k 3, every 25) | wall-time ratio |")
    print("|---|---|")
    for ops in (("add",), ("add", "sub", "mul", "sq")):
        print(f"| {'+'.join(ops)} | {capture_overhead(ops, args.reps):.3f}× |")


if __name__ == "__main__":
    main()
