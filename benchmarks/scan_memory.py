"""Peak memory of a coupling scan: stream vectors in memory vs in files (``TrajectoryScan(streams_dir=...)``).

``python -m benchmarks.scan_memory [--snapshots 164] [--multitask-snapshots 321] [--measured 1]`` builds a
trajectory of the paper's model as long as the reproduction's runs (a single-task run of ~4,100 steps and the
8,000-step multitask run, a snapshot every 25 steps): its initial weights plus a random walk, written as a snapshot
store on disk as a coupling cell keeps it (memory does not depend on the values). Each variant then runs in a
fresh process: the stream vectors of analysis seed 0 (and, for the multitask model, the per-op variant's), then
the last ``--measured`` snapshots with every key and the finite-difference comparison, with the reproduction's
scan settings (W 20, k 3, 1,024 probes, 20 random directions). It reports the resident memory after each phase
and the process's peak (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine
from sed_lens.cli import ArgumentParser

MIB = 2**20


def memory() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    got = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            got[line.split(":")[0]] = int(line.split()[1]) * 1024
    return got["VmRSS"], got["VmHWM"]


def write_trajectory(directory: Path, ops: list[str], n: int) -> None:
    """``n`` snapshots of the paper's model: its initial state plus a random walk in every weight."""
    import torch

    from sed_lens.models import build_model
    from sed_lens.serialization import save
    from sed_lens.tasks import ModularArithmetic

    model = build_model("xu2026", ModularArithmetic(97, ops, 0.5, 42), seed=42)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        save(state, directory / f"step_{25 * i:06d}.pt")
        state = {k: v + 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                 for k, v in state.items()}


def worker(snapshots: Path, ops: list[str], measured: int, streams_dir: str | None) -> dict[str, object]:
    """One variant in this process: phases with (RSS, peak) after each."""
    phases: list[tuple[str, float, int, int]] = []
    t = time.perf_counter()

    def mark(what: str) -> None:
        nonlocal t
        phases.append((what, time.perf_counter() - t, *memory()))
        t = time.perf_counter()

    from sed_lens.analysis.trajectory import TrajectoryScan, snapshot_indices
    from sed_lens.configs import ScanConfig
    from sed_lens.hooks.snapshots import SnapshotStore
    from sed_lens.models import build_model
    from sed_lens.tasks import ModularArithmetic

    task = ModularArithmetic(97, ops, 0.5, 42)
    model = build_model("xu2026", task, seed=42)
    store = SnapshotStore.load(snapshots, 25)
    mark("imports, model")
    multitask = len(ops) > 1
    cfg = ScanConfig(n_snapshots=30 if multitask else 40, fd_compare=True, per_op_inputs=multitask)
    scan = TrajectoryScan(model, task, store, cfg, progress=False, streams_dir=streams_dir)
    scan.streams(0)
    mark("stream vectors")
    if scan.per_op:
        scan.per_op_streams(0)
        mark("per-op stream vectors")
    n = len(store)
    scan.run(n, snapshot_indices(n, cfg.n_snapshots)[-measured:])
    mark(f"SED bases and responses at {measured} snapshot(s)")
    return {"phases": phases, "peak": memory()[1]}


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snapshots", type=int, default=164, help="snapshots of the single-task trajectory")
    ap.add_argument("--multitask-snapshots", type=int, default=321, help="snapshots of the multitask trajectory "
                    "(0: skip it)")
    ap.add_argument("--measured", type=int, default=1, help="snapshots measured (the last ones)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(worker(Path(spec["snapshots"]), spec["ops"], spec["measured"], spec["streams_dir"])))
        return
    print(f"machine: {machine()}\n")
    print("| model | snapshots | stream vectors | RSS after each phase (MiB) | peak RSS (MiB) | wall (s) |")
    print("|---|---|---|---|---|---|")
    runs = [(["add"], args.snapshots)]
    if args.multitask_snapshots:
        runs.append((["add", "sub", "mul", "sq"], args.multitask_snapshots))
    with tempfile.TemporaryDirectory() as tmp:
        for ops, n in runs:
            traj = Path(tmp) / "+".join(ops)
            write_trajectory(traj / "snapshots", ops, n)
            for where in ("in memory", "in files"):
                streams_dir = str(traj / "streams") if where == "in files" else None
                spec = json.dumps({"snapshots": str(traj / "snapshots"), "ops": ops, "measured": args.measured,
                                   "streams_dir": streams_dir})
                t = time.perf_counter()
                out = subprocess.run([sys.executable, "-m", "benchmarks.scan_memory", "--worker", spec],
                                     capture_output=True, text=True, check=True)
                wall = time.perf_counter() - t
                res = json.loads(out.stdout.strip().splitlines()[-1])
                phases = "; ".join(f"{what}: {rss / MIB:.0f}" for what, _, rss, _ in res["phases"])
                name = "multitask (4 ops)" if len(ops) > 1 else "single-task"
                print(f"| {name} | {n} | {where} | {phases} | **{res['peak'] / MIB:.0f}** | {wall:.0f} |")
    print("\nThe peak comes while measuring: the responses over 1,024 probes need a few hundred MiB of workspace.")


if __name__ == "__main__":
    main()
