"""Per-step overhead of ``SubspaceProjection`` at the paper's size, as a ratio to a control training step.

``python -m benchmarks.intervention`` times ``Trainer.train_step`` of the paper's model (xu2026, p 97, add,
batch 512, AdamW, clip 1.0; evaluation excluded) with W = 20, k = 3 on the attention subspace S
(P = 131,072), projection on the gradient, mode keep, past the warm-up:

* ``control``: no callback — twice, as two independent trainers, so the table shows the noise floor;
* ``sed``: ``SubspaceProjection(basis="sed")`` — incremental Gram (sed_lens);
* ``random``: ``SubspaceProjection(basis="random")`` — QR of a P×k Gaussian every step;
* ``svd``: the same protocol with a full ``torch.linalg.svd`` of the window every step (what the paper's code
  does), as a subclass that only swaps the basis computation.

Steps are timed one at a time, round-robin over the variants (``--reps`` rounds), and the medians compared, so
the load of a shared machine hits all variants alike. The hook alone (``on_before_step``: read the gradient,
choose the basis, project, write back, push to the window) is timed the same way. Every trainer trains its own
copy of the same model on the same batch stream, so all do identical work apart from the projection. Threads:
``--threads`` (default 1, as each grid cell runs).
"""

from __future__ import annotations

import argparse
import functools

import torch

from benchmarks.common import interleaved, machine
from sed_lens.cli import ArgumentParser
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


LABELS = {"control": "control (no projection)", "control2": "control, a second copy (noise floor)",
          "sed": "SED basis, incremental Gram (sed_lens)", "random": "random basis, redrawn every step",
          "svd": "SED basis, full SVD of the window every step (paper code)"}


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=60, help="rounds over the variants (one step each)")
    ap.add_argument("--inner", type=int, default=1, help="steps per variant per round")
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

    def proj(cls: type[SubspaceProjection], basis: str) -> SubspaceProjection:
        return cls(k=args.k, window=args.window, mode="keep", basis=basis, apply_to="gradient")

    trainers = {"control": trainer(None), "control2": trainer(None), "sed": trainer(proj(SubspaceProjection, "sed")),
                "random": trainer(proj(SubspaceProjection, "random")), "svd": trainer(proj(SVDProjection, "sed"))}
    fns = {k: tr.train_step for k, tr in trainers.items()}
    for k, tr in trainers.items():
        if tr.callbacks:
            fns[f"{k} hook"] = functools.partial(tr.callbacks[0].on_before_step, tr)
    t = interleaved(fns, reps=args.reps, inner=args.inner, warmup=1)
    dim = ParamSubspace.attention(trainers["control"].model).dim
    base = t["control"]
    print(f"machine: {machine()}\nW={args.window}, k={args.k}, P={dim:,}, gradient projection, mode keep; "
          f"medians of {args.reps} round-robin rounds\n")
    print("| variant | ms/step | ratio to control | projection hook alone, ms | hook / control step |")
    print("|---|---|---|---|---|")
    for k, label in LABELS.items():
        hook = t.get(f"{k} hook")
        hook_cols = f"{hook * 1e3:.2f} | {hook / base:.3f}" if hook is not None else "— | —"
        print(f"| {label} | {t[k] * 1e3:.1f} | {t[k] / base:.3f} | {hook_cols} |")


if __name__ == "__main__":
    main()
