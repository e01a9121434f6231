"""First contact with the command lines: how long ``--help`` and a bad flag take to answer.

``python -m benchmarks.cli_latency`` runs each experiment CLI (and ``python -m sed_lens.report``) as a fresh
subprocess with ``--help`` and with ``--no-such-flag``, ``--reps`` times each (round-robin), and prints the
median wall time per case and whether it meets the target (under 2 s). Parsing happens before torch,
TransformerLens, W&B or matplotlib are imported, so both cases should cost about one Python start-up.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from benchmarks.common import machine
from sed_lens.cli import ArgumentParser

CLIS = ("sed_lens.experiments.grokking", "sed_lens.experiments.coupling", "sed_lens.experiments.intervention",
        "sed_lens.experiments.reproduce", "sed_lens.report")
CASES = {"--help": ["--help"], "bad flag": ["--no-such-flag"]}
TARGET_S = 2.0


def time_once(module: str, argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, check=False)
    return time.perf_counter() - t


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="runs per case (the median is reported)")
    ap.add_argument("--clis", default=",".join(CLIS), help="comma-separated modules to time")
    args = ap.parse_args()
    modules = [m for m in args.clis.split(",") if m]
    time_once("sed_lens.cli", [])  # warm the file cache
    samples: dict[tuple[str, str], list[float]] = {(m, c): [] for m in modules for c in CASES}
    for _ in range(max(1, args.reps)):
        for (module, case), out in samples.items():
            out.append(time_once(module, CASES[case]))
    print(f"machine: {machine()}")
    print(f"| command | case | median s (of {args.reps}) | under {TARGET_S:g} s |")
    print("|---|---|---|---|")
    for (module, case), out in samples.items():
        med = statistics.median(out)
        print(f"| python -m {module} | {case} | {med:.2f} | {'yes' if med < TARGET_S else 'no'} |")


if __name__ == "__main__":
    main()
