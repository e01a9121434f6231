"""Peak memory and disk of a coupling scan: stream vectors in memory, in files, or live
(``TrajectoryScan(streams="memory" | DIRECTORY | "live")``).

``python -m benchmarks.scan_memory [--snapshots 164] [--multitask-snapshots 321] [--measured 1]`` builds a
trajectory of the paper's model as long as the reproduction's runs (a single-task run of ~4,100 steps and the
8,000-step multitask run, a snapshot every 25 steps): its initial weights plus a random walk, written as a snapshot
store on disk as a coupling cell keeps it (memory does not depend on the values). Each variant then runs in a
fresh process: the stored variants compute the stream vectors of analysis seed 0 (and, for the multitask model,
the per-op variant's) first; then the last ``--measured`` snapshots are measured with every key and the
finite-difference comparison, with the reproduction's scan settings (W 20, k 3, 1,024 probes, 20 random
directions; the single-task run with the window and ε ablations of seed 42) — which, for live streams, walks the
whole trajectory computing each entry as the windows need it. It reports the resident memory after each phase, the
process's peak (VmHWM), the bytes of stream files on disk and the wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


def worker(snapshots: Path, ops: list[str], measured: int, streams: str) -> dict[str, object]:
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
    # as the reproduction scans them: the multitask run with the per-op variant, a single-task run (seed 42's, the
    # heaviest) with the window and ε ablations too — its W = 40 windows are the ones that hold bases longest
    ablations: dict[str, Any] = {} if multitask else {"ablation_windows": (1, 2, 5, 10, 20, 40), "ablation_eps": (0.001, 0.005, 0.05)}
    cfg = ScanConfig(n_snapshots=30 if multitask else 40, fd_compare=True, per_op_inputs=multitask, **ablations)
    scan = TrajectoryScan(model, task, store, cfg, progress=False, streams=streams)
    if not scan.live:
        scan.streams(0)
        mark("stream vectors")
        if scan.per_op:
            scan.per_op_streams(0)
            mark("per-op stream vectors")
    on_disk = sum(f.stat().st_size for f in scan.streams_dir.iterdir()) if scan.streams_dir else 0
    n = len(store)
    scan.run(n, snapshot_indices(n, cfg.n_snapshots)[-measured:])
    mark(("stream vectors, " if scan.live else "") + f"SED bases and responses at {measured} snapshot(s)")
    return {"phases": phases, "peak": memory()[1], "disk": on_disk, "timings": scan.timings}


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
        print(json.dumps(worker(Path(spec["snapshots"]), spec["ops"], spec["measured"], spec["streams"])))
        return
    print(f"machine: {machine()}\n")
    print("| model | snapshots | stream vectors | RSS after each phase (MiB) | peak RSS (MiB) | stream files (MB) "
          "| stream vectors (s) | wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    runs = [(["add"], args.snapshots)]
    if args.multitask_snapshots:
        runs.append((["add", "sub", "mul", "sq"], args.multitask_snapshots))
    with tempfile.TemporaryDirectory() as tmp:
        for ops, n in runs:
            traj = Path(tmp) / "+".join(ops)
            write_trajectory(traj / "snapshots", ops, n)
            for where, streams in (("in memory", "memory"), ("in files", str(traj / "streams")), ("live", "live")):
                spec = json.dumps({"snapshots": str(traj / "snapshots"), "ops": ops, "measured": args.measured,
                                   "streams": streams})
                t = time.perf_counter()
                out = subprocess.run([sys.executable, "-m", "benchmarks.scan_memory", "--worker", spec],
                                     capture_output=True, text=True, check=True)
                wall = time.perf_counter() - t
                res = json.loads(out.stdout.strip().splitlines()[-1])
                phases = "; ".join(f"{what}: {rss / MIB:.0f}" for what, _, rss, _ in res["phases"])
                name = "multitask (4 ops)" if len(ops) > 1 else "single-task"
                print(f"| {name} | {n} | {where} | {phases} | **{res['peak'] / MIB:.0f}** | {res['disk'] / 1e6:.0f} "
                      f"| {res['timings'].get('streams', 0.0):.0f} | {wall:.0f} |")
    print("\nThe peak comes while measuring: the responses over 1,024 probes need a few hundred MiB of workspace. "
          "Live streams are computed again by every scan of the trajectory (a coupling cell scans it twice per "
          "analysis seed, and once more for the headline bases of its main scan); stored ones once per analysis seed.")


if __name__ == "__main__":
    main()
