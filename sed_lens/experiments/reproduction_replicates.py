"""Replicates of reproduction runs: the same runs (same code, configs and seeds) made again elsewhere, set beside the
main results number by number.

Reruns on one CPU are bit-identical. On a CPU whose PyTorch kernels run at another SIMD level (AVX2 vs AVX-512) or
take another BLAS code path, the first rounding difference is amplified by training — a grokking trajectory is
chaotic — into another run of the same protocol: same seed, same code, other numbers. How far they move is a
measured floor on the run-to-run noise of one training seed, to set beside the spread over analysis seeds and over
training seeds that the report gives. A replicate is a folder of kept results with the layout of the main ones
(``docs/reproduction/replicates/NAME/``); its runs are matched to the main runs by what they ran (op, seed,
condition, projection method), not by file name.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

from sed_lens.errors import check
from sed_lens.experiments.reproduction_results import (
    GRADIENT,
    UPDATE,
    CouplingRun,
    InterventionRun,
    Results,
    Spread,
    cpu_of,
    load_results,
    speedups,
    tally,
)
from sed_lens.rendering import Block, Heading, Table, Text, fixed

COUPLING_NUMBERS = ("grok step", "stop rule fired at", "peak R̄, gradient SED", "peak R̄, update SED",
                    "gradient / update")
"""What is compared for a single-task coupling run (stop-rule run, median over analysis seeds)."""


def load_replicates(directory: str | Path) -> dict[str, Results]:
    """``{name: results}`` of every subfolder of ``directory`` that holds kept results, by name."""
    root = Path(directory)
    check(root.is_dir(), f"{root} does not exist: no replicates to report (--replicates).")
    sets = {d.name: load_results(d) for d in sorted(root.iterdir()) if d.is_dir() and any(d.rglob("*.json"))}
    check(bool(sets), f"{root} holds no replicate: put each replicate's kept results in a folder of its own there.")
    return sets


def coupling_numbers(run: CouplingRun) -> dict[str, float | None]:
    """The compared numbers of a single-task coupling run (:data:`COUPLING_NUMBERS`)."""
    g = run.over_seeds("stop_rule", run.op, GRADIENT).median
    u = run.over_seeds("stop_rule", run.op, UPDATE).median
    grok, stop = run.grok_step.get(run.op), run.train.get("stop_step")
    values = (None if grok is None else float(grok), None if stop is None else float(stop), g, u,
              None if g is None or not u else g / u)
    return dict(zip(COUPLING_NUMBERS, values, strict=True))


def relative_change(a: float | None, b: float | None) -> float | None:
    """|b − a| / |a| (None when either is missing or a is 0)."""
    return None if a is None or b is None or a == 0 else abs(b - a) / abs(a)


def variation(values: Iterable[float | None]) -> float | None:
    """Coefficient of variation (sample sd / |mean|) of the values present, or None for fewer than two."""
    sp = Spread.of(values)
    return None if sp.n < 2 or not sp.mean else (sp.sd or 0.0) / abs(sp.mean)


def median_of(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def cpus(runs: Sequence[CouplingRun | InterventionRun]) -> str:
    """The CPUs a set of runs recorded (model and kernel level), most runs first."""
    return tally(cpu_of(r.provenance) for r in runs)


def same_run(a: CouplingRun | InterventionRun, b: CouplingRun | InterventionRun) -> bool:
    """Whether two runs kept the same numbers: every scan, training record and curve (timings left out)."""
    if isinstance(a, CouplingRun) and isinstance(b, CouplingRun):
        untimed = [{k: v for k, v in r.train.items() if k != "timings"} for r in (a, b)]
        return a.scans == b.scans and untimed[0] == untimed[1] and a.history == b.history
    return (isinstance(a, InterventionRun) and isinstance(b, InterventionRun) and a.grok_step == b.grok_step
            and a.steps == b.steps and a.history == b.history)


def pairs_of(main: Results, rep: Results) -> tuple[list[tuple[CouplingRun, CouplingRun]],
                                                   list[tuple[InterventionRun, InterventionRun]]]:
    """The replicate's single-task coupling runs and intervention runs, each with the main run it repeats."""
    by_run = {(r.op, r.seed): r for r in main.single()}
    coupling = [(by_run[(r.op, r.seed)], r) for r in rep.single() if (r.op, r.seed) in by_run]

    def ident(r: InterventionRun) -> tuple[str, int, str, str]:
        return r.op, r.seed, r.condition, "" if r.condition == "A" else r.method

    by_iv = {ident(r): r for r in main.interventions}
    interventions = [(by_iv[ident(r)], r) for r in sorted(rep.interventions, key=ident) if ident(r) in by_iv]
    return coupling, interventions


def replicate_section(main: Results, name: str, rep: Results) -> list[Block]:
    """The report's section for one replicate: what moved, by how much, against the seeds' spread."""
    coupling, interventions = pairs_of(main, rep)
    runs = len(coupling) + len(interventions)
    if not runs:
        return [Heading(f"Replicate `{name}`", 3),
                Text(f"None of its {len(rep.coupling) + len(rep.interventions)} runs repeats a run of the main results.")]
    seeds = sorted({r.seed for _, r in coupling} | {r.seed for _, r in interventions})
    numbers = [(coupling_numbers(a), coupling_numbers(b)) for a, b in coupling]
    same = sum(same_run(a, b) for a, b in coupling) + sum(same_run(a, b) for a, b in interventions)
    out: list[Block] = [Heading(f"Replicate `{name}`", 3), Text(
        f"{runs} runs of training seed{'s' if len(seeds) != 1 else ''} {', '.join(map(str, seeds))} rerun with the "
        f"same configs on {cpus([b for _, b in coupling] + [b for _, b in interventions])}; the main results' runs "
        f"of {'those seeds' if len(seeds) != 1 else 'that seed'}: "
        f"{cpus([a for a, _ in coupling] + [a for a, _ in interventions])}. "
        f"{same} of {runs} runs are bit-identical (every measured number, curves included, equal).")]

    def change(key: str) -> str:
        """Median and largest relative change of one coupling number over the pairs, against the spreads."""
        ch = [relative_change(x[key], y[key]) for x, y in numbers]
        seeds_cv = median_of(variation(coupling_numbers(r)[key] for r in main.single(op)) for op in main.ops)
        text = (f"- {key[0].upper() + key[1:]}: changed by a median {pct(median_of(ch))} (largest "
                f"{pct(max((c for c in ch if c is not None), default=None))}); over the main results' training seeds it "
                f"varies by a median coefficient of variation of {pct(seeds_cv)} per op")
        if key.startswith("peak R̄"):
            k = GRADIENT if "gradient" in key else UPDATE
            analysis_cv = median_of(variation(a.over_seeds("stop_rule", a.op, k).values) for a, _ in coupling)
            text += f", over one run's analysis seeds by {pct(analysis_cv)}"
        return text + "."

    if coupling:
        out += [Text(change(key)) for key in COUPLING_NUMBERS]
    if interventions:
        ch = [relative_change(a.grok_or_last, b.grok_or_last) for a, b in interventions]
        seeds_cv = median_of(variation(r.grok_or_last for r in main.interventions
                                       if (r.op, r.condition, r.method) == (a.op, a.condition, a.method))
                             for a, _ in interventions)
        out.append(Text(f"- Intervention grok steps: changed by a median {pct(median_of(ch))} (largest "
                        f"{pct(max((c for c in ch if c is not None), default=None))}); over the main results' training "
                        f"seeds a condition's grok step varies by a median coefficient of variation of {pct(seeds_cv)}."))
    if coupling:
        rows = [[f"{a.op} s{a.seed}", *(arrow(x[k], y[k], 0 if i < 2 else 1) for i, k in enumerate(COUPLING_NUMBERS))]
                for (a, _), (x, y) in zip(coupling, numbers, strict=True)]
        out.append(Table(["run", *COUPLING_NUMBERS], rows,
                         f"Coupling runs, main → replicate `{name}` (stop-rule run, median over analysis seeds)"))
    if interventions:
        def speedup(res: Results, r: InterventionRun) -> float | None:
            """Control / condition grok step of ``r``'s seed (:func:`speedups`' per-seed value; None for a control)."""
            per_seed = speedups(res.grid(r.op, r.method)).get(r.condition, {}).get("per_seed", {})
            return None if r.condition == "A" else per_seed.get(r.seed)

        rows = [[f"{a.op}" + ("" if a.condition == "A" else f"-{a.method}"), a.condition, str(a.seed),
                 arrow(a.grok_or_last, b.grok_or_last, 0, censored=(a.grok_step is None, b.grok_step is None)),
                 arrow(speedup(main, a), speedup(rep, b), 2)] for a, b in interventions]
        out.append(Table(["grid", "condition", "seed", "grok step", "speedup over the control"], rows,
                         f"Intervention runs, main → replicate `{name}` (* never grokked: its last step)"))
    return out


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f} %" if x >= 0.1 else f"{100 * x:.1f} %"


def arrow(a: float | None, b: float | None, digits: int, censored: tuple[bool, bool] = (False, False)) -> str:
    """``a → b`` (``a`` alone, marked "same", when equal)."""
    sa, sb = (fixed(v, digits) + ("*" if c else "") for v, c in zip((a, b), censored, strict=True))
    return f"{sa} (same)" if sa == sb else f"{sa} → {sb}"


def replicates_blocks(main: Results, replicates: dict[str, Results]) -> list[Block]:
    """The report's section on every replicate (empty without any)."""
    if not replicates:
        return []
    blocks: list[Block] = [Heading("Same code, same seed, another CPU", 2), Text(
        "Reruns on one machine are bit-identical (the repository's tests check it). On a CPU whose PyTorch kernels "
        "run at another SIMD level, or take another BLAS code path, the first rounding difference is amplified by "
        "training into another run of the same protocol: the change below is a measured floor on the noise of one "
        "training seed's numbers, to read beside the spreads over analysis and training seeds above.")]
    for name, rep in replicates.items():
        blocks += replicate_section(main, name, rep)
    return blocks

