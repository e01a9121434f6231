"""Where one exact centroid response goes: the ``hvp`` of one direction, op by op.

``python -m benchmarks.hvp_profile`` builds the paper's model (p 97, ``xu2026``, trained a little), draws 1,024
probes and random unit directions in the attention subspace, and measures what the reproduction's largest phase
(the exact centroid responses, ``method="hvp"``) costs per direction: the wall time of a direction (the backward
of the shared differentiable gradient, :func:`sed_lens.analysis.coupling._hvp_sq`), then the same work with every
ATen op timed one by one (a ``TorchDispatchMode``), grouped into dense matmuls, the batched matmuls of attention,
elementwise arithmetic, copies, reductions and views. Matmul rows give their achieved GFLOP/s beside a reference
— one large matmul of the model's dense-layer shape run alone — so the table says how far a direction is from
what this CPU can do with its FLOPs. With ``--results`` it multiplies out the directions the kept reproduction
results measured by ``hvp``. One torch thread (a reproduction worker's setting).

``--compiled K`` (default 4; 0 skips it) also measures the lever sed_lens does not take: the same double backward
traced into one ATen graph (``make_fx``, the subspace's weights and K directions as its inputs, the other weights
constants of the graph — a library version would make them inputs too, so that one graph served every snapshot of a
run) and compiled by ``torch.compile`` (Inductor fuses the elementwise ops), with 1 and with K directions per graph,
over probe batches of each size in ``--compiled-batches``: cold compile time, time per call, the marginal cost of a
direction, the largest relative difference to the eager responses, and the process's peak RSS after each.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode
from transformer_lens import HookedTransformer

from benchmarks.common import machine
from sed_lens.analysis.centroids import CentroidMap
from sed_lens.analysis.coupling import _hvp_sq
from sed_lens.cli import ArgumentParser
from sed_lens.models import build_model
from sed_lens.subspace import ParamSubspace
from sed_lens.tasks import ModularArithmetic
from sed_lens.training import TrainConfig, Trainer

DENSE = {"mm", "addmm"}
BATCHED = {"bmm", "baddbmm"}
COPIES = {"copy_", "clone", "_to_copy", "fill_", "zero_", "zeros_like", "empty", "empty_strided", "empty_like",
          "new_empty_strided", "new_zeros", "zeros", "ones_like", "full", "scalar_tensor", "lift_fresh"}
REDUCTIONS = {"sum", "mean", "amax", "max", "var", "std", "norm", "linalg_vector_norm"}
VIEWS = {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "as_strided", "unsqueeze",
         "squeeze", "slice", "select", "detach", "alias", "split", "unbind", "_reshape_alias", "index_select"}
GROUPS = ["dense matmuls (linear layers)", "batched matmuls (attention over the positions)",
          "elementwise arithmetic", "copies and allocation", "reductions", "views and indexing"]


def group_of(op: str) -> str:
    if op in DENSE:
        return GROUPS[0]
    if op in BATCHED:
        return GROUPS[1]
    if op in COPIES:
        return GROUPS[3]
    if op in REDUCTIONS:
        return GROUPS[4]
    if op in VIEWS:
        return GROUPS[5]
    return GROUPS[2]


def flops_of(op: str, args: tuple[Any, ...]) -> float:
    """Multiply-adds × 2 of a matmul op (0 for anything else)."""
    ts = [a for a in args if isinstance(a, torch.Tensor)]
    if op == "mm":
        (m, k), n = ts[0].shape, ts[1].shape[1]
        return 2.0 * m * k * n
    if op == "addmm":
        (m, k), n = ts[1].shape, ts[2].shape[1]
        return 2.0 * m * k * n
    if op in BATCHED:
        a, b = (ts[0], ts[1]) if op == "bmm" else (ts[1], ts[2])
        return 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    return 0.0


class OpTimer(TorchDispatchMode):
    """Seconds, calls and matmul FLOPs of every ATen op run under it, by op name."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.flops: dict[str, float] = defaultdict(float)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        op = func.overloadpacket.__name__
        t = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds[op] += time.perf_counter() - t
        self.calls[op] += 1
        self.flops[op] += flops_of(op, args)
        return out


def grouped(timer: OpTimer) -> dict[str, tuple[float, int, float]]:
    """``{group: (seconds, calls, flops)}``."""
    out: dict[str, list[float]] = {g: [0.0, 0, 0.0] for g in GROUPS}
    for op, s in timer.seconds.items():
        g = out[group_of(op)]
        g[0] += s
        g[1] += timer.calls[op]
        g[2] += timer.flops[op]
    return {g: (v[0], int(v[1]), v[2]) for g, v in out.items()}


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_rss_mib() -> float:
    """The process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def traced_responses(cmap: CentroidMap, model: HookedTransformer, S: ParamSubspace, dirs: torch.Tensor,
                     rows: slice) -> tuple[Callable[..., Any], list[torch.Tensor]]:
    """Σ over the probes of ‖J_x v‖² for each row v of ``dirs``, as one traced ATen graph (what :func:`_hvp_sq`
    computes, reverse-over-reverse), and its inputs: the subspace's weights, then each direction's tangents."""
    named = S.parameters_of(model)
    names = list(named)
    tokens = cmap.tokens[rows]
    labels = None if cmap.labels is None else cmap.labels[rows]
    k = dirs.shape[0]

    def responses(*inputs: torch.Tensor) -> torch.Tensor:
        params = {n: w.detach().requires_grad_(True) for n, w in zip(names, inputs[:len(names)], strict=True)}
        delta = torch.zeros((tokens.shape[0], *cmap.shape), dtype=inputs[0].dtype, requires_grad=True)
        with torch.enable_grad():
            grads = torch.autograd.grad(cmap.readout_sum(delta, params, tokens, labels), list(params.values()),
                                        create_graph=True)
            out = []
            for j in range(k):
                t = inputs[len(names) * (1 + j): len(names) * (2 + j)]
                mu_dot = torch.autograd.grad(grads, delta, grad_outputs=list(t), retain_graph=j < k - 1)[0]
                out.append((mu_dot.detach().double() ** 2).sum())
        return torch.stack(out)

    tangents = S.unflatten(dirs, full=True)
    inputs = [named[n].detach() for n in names] + [tangents[n][j] for j in range(k) for n in names]
    return make_fx(responses)(*inputs), inputs


def compiled_table(cmap: CentroidMap, model: HookedTransformer, S: ParamSubspace, dirs: torch.Tensor,
                   batches: list[int], k: int, reps: int) -> list[str]:
    """The eager responses of 1 and ``k`` directions over all probes against the compiled graphs over probe batches
    of each size in ``batches`` (1 and ``k`` directions per graph, run ``n_probes / batch`` times to cover the
    probes): every graph compiled first (smallest batch first, so the peak RSS after each names its cost), then all
    timed round-robin, ``reps`` rounds, medians."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="hvp_profile_inductor_")  # cold compiles
    n_probes = cmap.tokens.shape[0]
    full = slice(0, n_probes)
    variants: dict[str, tuple[Callable[[], object], float]] = {}  # name -> (call over all probes, per-call scale)
    facts: dict[str, str] = {}
    for m in (1, k):
        variants[f"eager (sed_lens), {m} direction{'s' if m > 1 else ''}"] = (
            partial(_hvp_sq, cmap, model, S, dirs[:m], full, 1), 1.0)
        facts[f"eager (sed_lens), {m} direction{'s' if m > 1 else ''}"] = f"— | 0 | {peak_rss_mib():.0f}"
    for batch in sorted(batches):
        rows = slice(0, batch)
        for m in (1, k):
            graph, inputs = traced_responses(cmap, model, S, dirs[:m], rows)
            compiled = torch.compile(graph, dynamic=False)
            t = time.perf_counter()
            with torch.no_grad():
                values = compiled(*inputs)
            compile_s = time.perf_counter() - t
            ref = _hvp_sq(cmap, model, S, dirs[:m], rows, 1).double()
            rel = float(((values - ref).abs() / ref).max())
            name = f"compiled, probe batches of {batch}, {m} direction{'s' if m > 1 else ''} per graph"
            variants[name] = (torch.no_grad()(partial(compiled, *inputs)), n_probes / batch)
            facts[name] = f"{compile_s:.0f} | {rel:.1e} | {peak_rss_mib():.0f}"
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, (call, scale) in variants.items():
            t = time.perf_counter()
            call()
            samples[name].append((time.perf_counter() - t) * scale)
    ms = {name: statistics.median(v) * 1e3 for name, v in samples.items()}
    lines = [f"| variant (all {n_probes} probes) | ms per call | compile s (cold cache) | max rel. diff. to eager | "
             "process peak RSS after it (MiB) |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {ms[name]:.0f} | {facts[name]} |" for name in variants]
    names = list(variants)  # pairs: 1 direction, then k directions, of each variant
    margins = {names[i].rsplit(",", 1)[0]: (ms[names[i + 1]] - ms[names[i]]) / (k - 1) for i in range(0, len(names), 2)}
    eager_margin = next(iter(margins.values()))
    lines.append(f"\none direction at the margin (the {k}-direction call less the 1-direction call, / {k - 1}), all "
                 f"{n_probes} probes: " + "; ".join(f"{what} **{v:.0f} ms** ({eager_margin / v:.2f}× eager)"
                                                    for what, v in margins.items()))
    return lines


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--directions", type=int, default=8, help="directions per timed call")
    ap.add_argument("--probes", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=100, help="train a little first, so the state is not the init")
    ap.add_argument("--compiled", type=int, default=4, metavar="K",
                    help="also time the double backward traced and torch.compile'd, K directions per graph (0: skip)")
    ap.add_argument("--compiled-batches", default="1024,128",
                    help="probe batches the compiled graph runs over (comma-separated, each dividing --probes)")
    ap.add_argument("--results", default="docs/reproduction/runs",
                    help="kept reproduction results whose hvp directions to multiply out ('' for none)")
    args = ap.parse_args()
    if args.compiled:
        if not 2 <= args.compiled <= args.directions + 1:
            ap.error(f"--compiled K needs 2 <= K <= --directions + 1 ({args.directions + 1}), got {args.compiled}")
        try:
            batches = sorted({int(b) for b in args.compiled_batches.split(",")})
        except ValueError:
            ap.error(f"--compiled-batches takes comma-separated integers, got {args.compiled_batches!r}")
        if any(b < 1 or args.probes % b for b in batches):
            ap.error(f"--compiled-batches must each divide --probes ({args.probes}), got {args.compiled_batches!r}")
    torch.set_num_threads(1)
    task = ModularArithmetic(97, ("add",), 0.5, 42)
    model = build_model("xu2026", task, seed=42)
    Trainer(model, task, TrainConfig(steps=args.train_steps, checkpoint_every=0), progress=False).fit()
    model.eval()
    S = ParamSubspace.attention(model)
    probes = task.probes(args.probes, 0)
    cmap = CentroidMap(model, *probes)
    rows = slice(0, args.probes)
    n = args.directions
    dirs = S.random_directions(n + 1, torch.Generator().manual_seed(0))

    def hvp(k: int) -> Callable[[], object]:
        return lambda: _hvp_sq(cmap, model, S, dirs[:k], rows, 1)

    hvp(2)()  # warm up
    one, many = median_seconds(hvp(1), args.reps), median_seconds(hvp(n + 1), args.reps)
    per_direction = (many - one) / n
    timers = {}
    for k in (1, n + 1):
        with OpTimer() as timer:
            hvp(k)()
        timers[k] = grouped(timer)
    per = {g: tuple((timers[n + 1][g][i] - timers[1][g][i]) / n for i in range(3)) for g in GROUPS}
    timed = sum(v[0] for v in per.values())

    hidden = probes[0].numel()
    a, w = torch.randn(hidden, model.cfg.d_model), torch.randn(model.cfg.d_model, model.cfg.d_model)
    ref = median_seconds(lambda: [a @ w for _ in range(20)], args.reps) / 20
    ref_rate = 2.0 * hidden * model.cfg.d_model ** 2 / ref / 1e9

    print(f"machine: {machine()}\n{args.probes} probes ({hidden} token positions), P = {S.dim:,}, 1 thread\n")
    print(f"one direction: **{per_direction * 1e3:.1f} ms** of wall time (the shared forward and differentiable "
          f"backward, paid once per group of directions: {one * 1e3 - per_direction * 1e3:.0f} ms); timed op by op "
          f"{timed * 1e3:.1f} ms (the timer's own cost included; the shares below are of that)\n")
    print("| ops (per direction) | calls | ms | share | GFLOP/s |")
    print("|---|---|---|---|---|")
    for g in GROUPS:
        s, c, f = per[g]
        rate = f"{f / s / 1e9:.1f}" if f > 0 and s > 0 else "—"
        print(f"| {g} | {c:.0f} | {s * 1e3:.1f} | {s / timed:.0%} | {rate} |")
    flops = per[GROUPS[0]][2] + per[GROUPS[1]][2]
    print(f"\nreference: one [{hidden}×{model.cfg.d_model}]·[{model.cfg.d_model}×{model.cfg.d_model}] matmul alone "
          f"runs at {ref_rate:.1f} GFLOP/s; a direction's {flops / 1e9:.2f} GFLOP of matmuls at that rate would take "
          f"{flops / ref_rate / 1e6:.1f} ms, {flops / ref_rate / 1e9 / per_direction:.0%} of its wall time")
    if args.compiled:
        print("\nThe lever not taken: the same responses traced into one graph and compiled (Inductor), the "
              "subspace's weights and the directions as the graph's inputs; eager and compiled timed round-robin\n")
        print("\n".join(compiled_table(cmap, model, S, dirs, batches, args.compiled, max(args.reps, 3))))
    if args.results and Path(args.results).is_dir():
        from benchmarks.protocol_profile import profile
        _, directions, runs = profile(args.results)
        k = directions.get("hvp", 0)
        print(f"\nthe kept results ({runs} runs of `{args.results}`) measured {k:,} directions by hvp: "
              f"× {per_direction:.3f} s = {k * per_direction / 3600:.2f} worker-hours at this per-direction time")


if __name__ == "__main__":
    main()
