"""Figures (matplotlib, PNG): titled, labelled, with legends — for run directories and reports.

Every function takes plain data (dicts and lists as stored in the run directories), draws one figure, saves it
to ``path`` and returns the path, so notebooks, experiments and reports share one implementation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SOURCE_COLORS = {"update": "tab:blue", "gradient": "tab:orange", "task_gradient": "tab:green"}
ALIGN_STYLES = {"leading": "-", "trailing": "--"}


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _stream_of(key: str) -> tuple[str, str]:
    """``"task_gradient/add/leading"`` → (``"task_gradient"``, ``"leading"``)."""
    parts = key.split("/")
    return parts[0], parts[-1] if parts[-1] in ALIGN_STYLES else parts[-2]


def series(coupling: Mapping[str, Any], op: str, key: str, value: str = "R_mean") -> tuple[list[int], list[float]]:
    """(steps, values) of one measured key of a ``coupling.json``."""
    xs, ys = [], []
    for row in coupling["snapshots"]:
        res = row["ops"].get(op, {}).get(key)
        if res is not None:
            xs.append(row["step"])
            ys.append(res[value] if value != "R1" else res["R"][0])
    return xs, ys


def grokking_curves(history: Sequence[Mapping[str, Any]], ops: Sequence[str], path: str | Path,
                    grok_step: Mapping[str, int | None] | None = None, title: str = "Grokking") -> Path:
    """Train and test accuracy per op against the step, with the grok step marked."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    steps = [r["step"] for r in history]
    for i, op in enumerate(ops):
        c = f"C{i}"
        ax.plot(steps, [r.get(f"train/acc/{op}", np.nan) for r in history], color=c, ls="--", lw=1, label=f"{op} train")
        ax.plot(steps, [r.get(f"test/acc/{op}", np.nan) for r in history], color=c, lw=1.6, label=f"{op} test")
        g = (grok_step or {}).get(op)
        if g is not None:
            ax.axvline(g, color=c, ls=":", lw=1)
            ax.annotate(f"grok {g}", (g, 0.5), xytext=(4, 0), textcoords="offset points", color=c, fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2, loc="center right")
    return _save(fig, path)


def coupling_trajectory(coupling: Mapping[str, Any], history: Sequence[Mapping[str, Any]], op: str, path: str | Path,
                        keys: Sequence[str] | None = None, title: str | None = None) -> Path:
    """One run: accuracy (top) and R̄ of every SED stream over training (bottom, log scale; R̄ = 1 dotted)."""
    keys = keys or sorted(k for k in coupling["summary"][op] if "/W=" not in k and "fd_eps" not in k)
    fig, (a0, a1) = plt.subplots(2, 1, figsize=(7.5, 6), sharex=True, gridspec_kw={"height_ratios": [1, 2]})
    steps = [r["step"] for r in history]
    a0.plot(steps, [r.get(f"train/acc/{op}", np.nan) for r in history], label="train", color="tab:gray")
    a0.plot(steps, [r.get(f"test/acc/{op}", np.nan) for r in history], label="test", color="black")
    a0.set_ylabel("accuracy")
    a0.legend(fontsize=8)
    for key in keys:
        src, align = _stream_of(key)
        xs, ys = series(coupling, op, key)
        a1.plot(xs, ys, ALIGN_STYLES.get(align, "-"), color=SOURCE_COLORS.get(src, "tab:purple"), marker="o", ms=2.5,
                label=f"{src} SED ({align})")
    a1.axhline(1.0, color="gray", ls=":", lw=1)
    a1.set_yscale("log")
    a1.set_xlabel("step")
    a1.set_ylabel("R̄ (SED vs random, centroid response)")
    a1.legend(fontsize=8)
    a0.set_title(title or f"SED–LCH coupling over training ({op})")
    return _save(fig, path)


def coupling_panels(runs: Mapping[str, Sequence[tuple[str, Mapping[str, Any]]]], path: str | Path,
                    keys: Sequence[str], title: str, op_of_panel: Mapping[str, str] | None = None) -> Path:
    """One panel per op (``runs[op]`` = [(label, coupling.json)]): R̄ over training for ``keys`` (log scale)."""
    panels = list(runs)
    cols = min(4, len(panels))
    rows = int(np.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.2 * cols, 7.0), 3.4 * rows + 0.4), squeeze=False, sharey=True)
    for ax, panel in zip(axes.flat, panels, strict=False):
        op = (op_of_panel or {}).get(panel, panel)
        for label, coupling in runs[panel]:
            for key in keys:
                k = key.replace("{op}", op)
                src, align = _stream_of(k)
                xs, ys = series(coupling, op, k)
                if xs:
                    ax.plot(xs, ys, ALIGN_STYLES.get(align, "-"), color=SOURCE_COLORS.get(src, "tab:purple"), lw=1.2,
                            alpha=0.85, label=f"{src} ({align})" if label == runs[panel][0][0] else None)
        ax.axhline(1.0, color="gray", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_title(panel)
        ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel("R̄")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def ablation(xs: Sequence[float], ours: Sequence[float], path: str | Path, xlabel: str, title: str,
             paper: Mapping[float, float] | None = None, reference: tuple[str, float] | None = None,
             logx: bool = True) -> Path:
    """Peak R against an ablated parameter (window size, ε), ours beside the paper's points."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(xs, ours, "o-", color="tab:orange", label="sed_lens")
    if paper:
        ax.plot(list(paper), list(paper.values()), "s", color="black", mfc="none", ms=8, label="paper")
    if reference is not None:
        ax.axhline(reference[1], color="tab:green", ls="--", label=reference[0])
    if logx:
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("peak R₁")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def sed_streams(history: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[int]]]:
    """The SED streams of a run's ``metrics.jsonl`` rows: ``{stream: {"sigma": [j...], "gap": [j...]}}``
    from the keys ``sed/STREAM/sigma_j`` and ``sed/STREAM/gap_j`` (STREAM may hold slashes: ``task_gradient/add``)."""
    import re

    found: dict[str, dict[str, set[int]]] = {}
    for row in history:
        for key in row:
            m = re.fullmatch(r"sed/(.+)/(sigma|gap)_(\d+)", key)
            if m:
                found.setdefault(m[1], {"sigma": set(), "gap": set()})[m[2]].add(int(m[3]))
    return {s: {k: sorted(v) for k, v in d.items()} for s, d in sorted(found.items())}


def sed_spectra(history: Sequence[Mapping[str, Any]], path: str | Path, title: str = "SED spectra over training") -> Path:
    """Per SED stream (columns): singular values σ_j (top), gaps σ_j/σ_{j+1} (middle) and, where logged, the
    overlap of consecutive bases (bottom) against the step, from the ``sed/*`` keys of ``metrics.jsonl`` rows."""
    from sed_lens.errors import check

    streams = sed_streams(history)
    check(bool(streams), "these metrics hold no sed/STREAM/sigma_j keys; train with --sed to record SED spectra.")
    has_overlap = any(f"sed/{s}/overlap" in r for s in streams for r in history)
    n_rows = 3 if has_overlap else 2
    fig, axes = plt.subplots(n_rows, len(streams), figsize=(max(4.0 * len(streams), 6.0), 2.8 * n_rows + 0.5),
                             squeeze=False, sharex=True)

    def line(key: str, log: bool = True) -> tuple[list[int], list[float]]:
        """(steps, values); missing, infinite and (on a log axis) non-positive values become gaps."""
        pts = [(r["step"], r[key]) for r in history if key in r]
        return [s for s, _ in pts], [np.nan if v is None or not np.isfinite(v) or (log and v <= 0) else v for _, v in pts]

    for c, (stream, idx) in enumerate(streams.items()):
        ax_s, ax_g = axes[0, c], axes[1, c]
        for j in idx["sigma"]:
            xs, ys = line(f"sed/{stream}/sigma_{j}")
            if np.isfinite(ys).any():  # σ_j of a window with fewer than j vectors is 0: nothing to draw
                ax_s.plot(xs, ys, color=f"C{j - 1}", lw=1.3, label=f"σ{j}")
        for j in idx["gap"]:
            xs, ys = line(f"sed/{stream}/gap_{j}")
            if np.isfinite(ys).any():
                ax_g.plot(xs, ys, color=f"C{j - 1}", lw=1.3, label=f"σ{j}/σ{j + 1}")
        ax_s.set_yscale("log")
        ax_g.set_yscale("log")
        ax_g.axhline(1.0, color="gray", ls=":", lw=1)
        ax_s.set_title(f"{stream} SED")
        for ax in (ax_s, ax_g):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, ncol=2)
        if has_overlap:
            ax_o = axes[2, c]
            ax_o.plot(*line(f"sed/{stream}/overlap", log=False), color="tab:gray", lw=1.3)
            ax_o.set_ylim(-0.02, 1.02)
        axes[-1, c].set_xlabel("step")
    axes[0, 0].set_ylabel("singular value")
    axes[1, 0].set_ylabel(r"gap $\sigma_j / \sigma_{j+1}$")
    if has_overlap:
        axes[2, 0].set_ylabel("overlap with the\nprevious basis (mean cos²)")
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)
