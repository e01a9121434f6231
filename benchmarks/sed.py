"""One rolling-SED update at the paper's size: incremental Gram vs full SVD vs randomized SVD.

``python -m benchmarks.sed`` times, at W=20, P=131,072, k=3 (round-robin, one process):
* ``RollingSED.push`` + ``directions()`` (incremental W×W Gram, eigendecomposition, Xᵀu);
* ``torch.linalg.svd`` of the stacked window (what the paper's code does per window);
* ``torch.svd_lowrank(q=k+2, niter=2)`` of the window;
and reports the agreement of the directions (min |cos| against the full SVD).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import interleaved, machine
from sed_lens.analysis.sed import RollingSED
from sed_lens.cli import ArgumentParser


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--dim", type=int, default=131_072)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    W, P, k = args.window, args.dim, args.k
    g = torch.Generator().manual_seed(0)
    # A stream with a decaying spectrum, like gradients late in training.
    basis = torch.linalg.qr(torch.randn(P, 10, generator=g))[0].T
    scales = torch.tensor([2.0**-i for i in range(10)])
    stream = [(torch.randn(10, generator=g) * scales) @ basis + 1e-3 * torch.randn(P, generator=g) for _ in range(400)]
    sed = RollingSED(W, k)
    for v in stream[:W]:
        sed.push(v)
    it = iter(stream[W:] * 1000)
    window = torch.stack(stream[:W])

    def incremental() -> None:
        sed.push(next(it))
        sed.directions()

    t = interleaved({"incremental": incremental,
                     "svd": lambda: torch.linalg.svd(window, full_matrices=False),
                     "lowrank": lambda: torch.svd_lowrank(window, q=k + 2, niter=2)}, reps=args.reps, inner=10)
    fresh = RollingSED(W, k)
    for v in stream[:W]:
        fresh.push(v)
    _, _, vh = torch.linalg.svd(window.double(), full_matrices=False)
    _, _, v_lr = torch.svd_lowrank(window, q=k + 2, niter=2)
    cos_inc = (fresh.directions().double() * vh[:k]).sum(1).abs().min().item()
    cos_lr = (v_lr.T[:k].double() * vh[:k]).sum(1).abs().min().item()
    print(f"machine: {machine()}\nW={W}, P={P:,}, k={k}\n")
    print("| method | ms per window update | ratio to full SVD | min abs(cos) vs float64 SVD |")
    print("|---|---|---|---|")
    print(f"| RollingSED push + directions (incremental Gram) | {t['incremental'] * 1e3:.2f} | "
          f"{t['incremental'] / t['svd']:.3f} | {cos_inc:.8f} |")
    print(f"| torch.linalg.svd of the window | {t['svd'] * 1e3:.2f} | 1.000 | 1 (reference, float32) |")
    print(f"| torch.svd_lowrank(q={k + 2}, niter=2) | {t['lowrank'] * 1e3:.2f} | {t['lowrank'] / t['svd']:.3f} | "
          f"{cos_lr:.8f} |")


if __name__ == "__main__":
    main()
