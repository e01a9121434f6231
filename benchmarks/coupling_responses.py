"""Centroid responses per direction: the old one-direction loops vs the vectorised ``hvp`` / ``fd``, one process.

``OMP_NUM_THREADS=1 python -m benchmarks.coupling_responses`` builds the paper's model (p 97, ``xu2026``), draws
1,024 probes and 24 random unit directions in the attention subspace, and measures A(v) for all of them by

* ``old``: the per-direction loops ``centroid_response`` used before, which it keeps as its fallback (``hvp``: one
  shared differentiable backward, then one ``autograd.grad`` per direction; ``fd``: two centroid evaluations per
  direction);
* ``new``: :func:`sed_lens.analysis.coupling.centroid_response` as it is now (``hvp`` / ``fd`` vectorised over
  groups of directions, as many per call as :func:`~sed_lens.analysis.coupling.directions_per_call` allows);
* ``k per call``: the vectorised paths forced to k directions per call (``hvp``: ``is_grads_batched``; ``fd``: the
  ± perturbations of k directions stacked into one ``vmap``-ed evaluation), which is what the CPU cap in
  :data:`~sed_lens.analysis.coupling.CPU_DIRECTION_PROBES` is chosen from.

Round-robin over the variants, with 1 torch thread; times are CPU seconds of this process (``process_time``), so
a loaded machine inflates them less than wall time, but compare the ratios, not the absolute times. Prints seconds
per direction, old / variant, and the largest relative difference of any direction's A(v) to the old loop.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from benchmarks.common import machine
from sed_lens.analysis.centroids import CentroidMap
from sed_lens.analysis.coupling import (
    Probes,
    _fd_sq,
    _fd_sq_batched,
    _hvp_sq,
    centroid_response,
    directions_per_call,
    perturbation_scale,
)
from sed_lens.cli import ArgumentParser
from sed_lens.devices import model_device
from sed_lens.models import build_model
from sed_lens.subspace import ParamSubspace
from sed_lens.tasks import ModularArithmetic
from sed_lens.training import TrainConfig, Trainer


def responses(model: HookedTransformer, S: ParamSubspace, dirs: Tensor, probes: Probes, method: str,
              variant: str, per_call: int = 1, eps_rel: float = 0.005) -> Tensor:
    """A(v) of every direction (all probes in one pass) by ``variant``: "old", "new" or "forced"."""
    if variant == "new":
        return centroid_response(model, S, dirs, probes, method=method, eps_rel=eps_rel)
    cmap = CentroidMap(model, *probes)
    base = {n: p.detach() for n, p in S.parameters_of(model).items()}
    rows = slice(0, probes[0].shape[0])
    model.eval()
    if method == "hvp":
        total = _hvp_sq(cmap, model, S, dirs, rows, 1 if variant == "old" else per_call)  # 1: the old loop
    else:
        eps = perturbation_scale(model, S, eps_rel)
        total = (_fd_sq(cmap, base, S, dirs, rows, eps) if variant == "old"  # the old loop, kept as the fallback
                 else _fd_sq_batched(cmap, base, S, dirs, rows, eps, per_call))
    return (total / probes[0].shape[0]).to(torch.float32).cpu()


def round_robin(fns: dict[str, Callable[[], Tensor]], reps: int) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Median CPU seconds per call of each function (round-robin, after one warm-up call), and its last result."""
    values = {k: fn() for k, fn in fns.items()}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.process_time()
            values[k] = fn()
            samples[k].append(time.process_time() - t)
    return {k: statistics.median(v) for k, v in samples.items()}, values


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--probes", type=int, default=1024)
    ap.add_argument("--directions", type=int, default=24)
    ap.add_argument("--methods", default="hvp,fd", help="comma-separated: hvp, fd")
    ap.add_argument("--per-call", default="2,4,8", help="directions per call of the forced vectorised variants")
    ap.add_argument("--train-steps", type=int, default=100, help="train a little first, so the state is not the init")
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = ModularArithmetic(97, ("add",), 0.5, 42)
    model = build_model("xu2026", task, seed=42)
    if args.train_steps:
        Trainer(model, task, TrainConfig(steps=args.train_steps, checkpoint_every=0), progress=False).fit()
    S = ParamSubspace.attention(model)
    probes = task.probes(args.probes, 0)
    n = args.directions
    dirs = S.random_directions(n, torch.Generator().manual_seed(0))
    ks = [int(k) for k in args.per_call.split(",") if k]
    print(f"machine: {machine()}\n{n} random directions × {args.probes} probes, P = {S.dim:,}; CPU seconds "
          f"(process_time), median of {args.reps} round-robin reps\n")
    print("| method | variant | directions per call | s per direction | old / variant | max rel. diff. to old |")
    print("|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        auto = directions_per_call(method, 8, args.probes, model_device(model))
        fns: dict[str, Callable[[], Tensor]] = {
            "old": partial(responses, model, S, dirs, probes, method, "old"),
            "new": partial(responses, model, S, dirs, probes, method, "new"),
        }
        for k in ks:
            fns[f"{k} per call"] = partial(responses, model, S, dirs, probes, method, "forced", k)
        t, values = round_robin(fns, args.reps)
        ref = values["old"].double()
        for name in fns:
            rel = float(((values[name].double() - ref).abs() / ref.abs()).max())
            per = {"old": "1 (loop)", "new": f"{auto} (auto, chunk_size 8)"}.get(name, name.split()[0])
            print(f"| {method} | {name} | {per} | {t[name] / n:.3f} | {t['old'] / t[name]:.2f} | {rel:.1e} |")


if __name__ == "__main__":
    main()
