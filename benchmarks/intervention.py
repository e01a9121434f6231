"""Per-step overhead of ``SubspaceProjection`` at the paper's size, as a ratio to a control training step.

``python -m benchmarks.intervention`` times, round-robin in one process, ``Trainer.train_step`` of the paper's
model (xu2026, p 97, add, batch 512, AdamW, clip 1.0; evaluation excluded) on attention subspace S
(P = 131,072), with W = 20, k = 3, projection on the gradient, past the warm-up:

* ``control``: no callback;
* ``sed keep``: ``SubspaceProjection(mode="keep", basis="sed")`` — incremental Gram (sed_lens);
* ``random keep``: ``SubspaceProjection(mode="keep", basis="random")`` — QR of a P×k Gaussian per step;
* ``svd keep``: the same protocol with a full ``torch.linalg.svd`` of the window every step (what the paper's
  code does), as a subclass that only swaps the basis computation.

The hook alone (``on_before_step``: read the gradient, choose the basis, project, write back, push to the
window) is also timed, as its ratio to a control step: on a busy machine that ratio is less noisy than the
difference of two step times. Every trainer trains its own copy of the same model on the same batch stream, so
all do identical work apart from the projection. Threads: ``--threads`` (default 1, as each grid cell runs).
"""

from __future__ import annotations

import argparse
import functools

import torch

from benchmarks.common import interleaved, machine
from sed_lens.hooks.interventions import SubspaceProjection
from sed_lens.models import build_model
from sed_lens.subspace import ParamSubspace
from sed_lens.tasks import ModularArithmetic
from sed_lens.training import TrainConfig, Trainer


class SVDProjection(SubspaceProjection):
    """The paper code's approach: a full SVD of the stacked window at every step."""

    def _sed_basis(self) -> torch.Tensor:
        _, _, vh = torch.linalg.svd(self.window_sed.vectors(), full_matrices=False)
        return vh[: self.k]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--k", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = ModularArithmetic(97, ("add",), 0.5, 42)
    cfg = TrainConfig(deterministic=False)
    torch.use_deterministic_algorithms(True, warn_only=True)  # as the Trainer runs

    def trainer(proj: SubspaceProjection | None) -> Trainer:
        model = build_model("xu2026", task, seed=42)
        t = Trainer(model, task, cfg, [proj] if proj is not None else [], progress=False)
        if proj is not None:
            proj.on_train_start(t)
        for _ in range(args.window + 2):  # past the warm-up: every timed step is projected
            t.train_step()
        return t

    kw = dict(k=args.k, window=args.window, mode="keep", apply_to="gradient")
    trainers = {"control": trainer(None), "sed": trainer(SubspaceProjection(basis="sed", **kw)),  # type: ignore[arg-type]
                "random": trainer(SubspaceProjection(basis="random", **kw)),  # type: ignore[arg-type]
                "svd": trainer(SVDProjection(basis="sed", **kw))}  # type: ignore[arg-type]
    fns = {k: tr.train_step for k, tr in trainers.items()}
    # The projection alone (its share of a step, free of the step-to-step noise of a loaded machine).
    for k, tr in trainers.items():
        if k != "control":
            fns[f"{k} hook"] = functools.partial(tr.callbacks[0].on_before_step, tr)
    t = interleaved(fns, reps=args.reps, inner=args.inner, warmup=1)
    dim = ParamSubspace.attention(trainers["control"].model).dim
    print(f"machine: {machine()}\nW={args.window}, k={args.k}, P={dim:,}, gradient projection, mode keep\n")
    print("| variant | ms/step | ratio to control | overhead ms/step |")
    print("|---|---|---|---|")
    labels = {"control": "control (no projection)", "sed": "SED basis, incremental Gram (sed_lens)",
              "random": "random basis, redrawn every step", "svd": "SED basis, full SVD of the window every step"}
    for k, label in labels.items():
        print(f"| {label} | {t[k] * 1e3:.1f} | {t[k] / t['control']:.3f} | {(t[k] - t['control']) * 1e3:+.1f} |")
    print("\n| projection hook alone (on_before_step) | ms/call | ratio to a control step |")
    print("|---|---|---|")
    for k, label in labels.items():
        if k != "control":
            print(f"| {label} | {t[k + ' hook'] * 1e3:.2f} | {t[k + ' hook'] / t['control']:.3f} |")


if __name__ == "__main__":
    main()
