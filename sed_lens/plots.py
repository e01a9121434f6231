"""Figures as PNG files: small helpers on matplotlib's object-oriented API.

Figures are built as ``matplotlib.figure.Figure`` objects drawn by the Agg renderer, without ``pyplot``: nothing
changes matplotlib's global backend or state, so the helpers are safe in scripts, worker processes and
notebooks alike (a returned ``Figure`` displays inline in Jupyter). Every figure has a title, labelled axes and,
where there is more than one series, a legend.

Building blocks: :func:`new_figure`, :func:`save_figure`, :func:`color`; figure types: :func:`curve_overlay`
(groups of curves, one colour per group, e.g. accuracy curves of several seeds per condition),
:func:`bar_chart` (one bar per label with an error bar for the spread, optional reference markers),
:func:`grokking_curves`, :func:`coupling_trajectory` (accuracy and R̄ of every SED stream over one run),
:func:`coupling_panels` (one panel per op, runs overlaid) and :func:`ablation` (peak R against a parameter).
The last four take the data as stored in run directories and write the PNG to ``path``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sed_lens.analysis.scan_key import ScanKey, parse_keys, stream_name
from sed_lens.errors import check
from sed_lens.tracking import atomic_write_bytes

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")  # matplotlib's tab10, reordered so the first five conditions are easy to tell apart

Curve = tuple[Sequence[float], Sequence[float]]  # (x values, y values)


class InlineFigure(Figure):
    """A ``Figure`` that Jupyter displays inline (``_repr_png_``) without pyplot or ``%matplotlib inline``."""

    def _repr_png_(self) -> bytes:
        import io

        if self.canvas is None or not isinstance(self.canvas, FigureCanvasAgg):
            FigureCanvasAgg(self)
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=100)
        return buf.getvalue()


def color(i: int) -> str:
    """The i-th colour of the palette (cycling)."""
    return PALETTE[i % len(PALETTE)]


def new_figure(title: str, xlabel: str, ylabel: str, size: tuple[float, float] = (7.0, 4.5)) -> tuple[Figure, Axes]:
    """A figure with one titled, labelled axes (constrained layout, light grid)."""
    fig = InlineFigure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    return fig, ax


def save_figure(fig: Figure, path: str | Path, dpi: int = 130) -> Path:
    """Write ``fig`` as a PNG (atomically: readers never see half a file); returns the path."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def curve_overlay(groups: Mapping[str, Sequence[Curve]], title: str, xlabel: str, ylabel: str,
                  hline: float | None = None, hline_label: str | None = None, linewidth: float = 0.9,
                  alpha: float = 0.75, colors: Mapping[str, str] | None = None,
                  size: tuple[float, float] = (7.0, 4.5)) -> Figure:
    """Curves in groups: one colour per group, one thin line per member; one legend entry per group.

    ``groups``: ``{group label: [(x, y), ...]}``; ``hline``: a dashed horizontal reference line (e.g. a threshold).
    """
    check(len(groups) > 0, "curve_overlay needs at least one group of curves.")
    fig, ax = new_figure(title, xlabel, ylabel, size)
    for i, (label, curves) in enumerate(groups.items()):
        c = colors[label] if colors and label in colors else color(i)
        for j, (x, y) in enumerate(curves):
            check(len(x) == len(y), f"curve {j} of {label!r} has {len(x)} x values but {len(y)} y values.")
            ax.plot(x, y, color=c, linewidth=linewidth, alpha=alpha, label=label if j == 0 else None)
    if hline is not None:
        ax.axhline(hline, color="black", linestyle="--", linewidth=0.8, alpha=0.7, label=hline_label)
    ax.legend(loc="best", fontsize="small", frameon=False)
    return fig


def bar_chart(labels: Sequence[str], values: Sequence[float | None], title: str, ylabel: str,
              lower: Sequence[float | None] | None = None, upper: Sequence[float | None] | None = None,
              reference: Sequence[float | None] | None = None, reference_label: str = "reference",
              baseline: float | None = None, value_format: str = "{:.2f}", colors: Sequence[str] | None = None,
              xlabel: str = "", size: tuple[float, float] = (7.0, 4.5)) -> Figure:
    """One bar per label, annotated with its value; an error bar from ``lower`` to ``upper`` (e.g. the min and
    max over seeds); black diamonds at ``reference`` values (e.g. published numbers); a dotted ``baseline``.

    ``None`` (or NaN) values draw no bar, error bar or marker.
    """
    n = len(labels)
    check(n > 0, "bar_chart needs at least one bar.")
    for name, seq in (("values", values), ("lower", lower), ("upper", upper), ("reference", reference)):
        check(seq is None or len(seq) == n, f"bar_chart got {n} labels but {len(seq or [])} {name}.")
    fig, ax = new_figure(title, xlabel, ylabel, size)
    xs = list(range(n))
    heights = [_num(v) for v in values]
    bars = ax.bar(xs, [0.0 if math.isnan(h) else h for h in heights],
                  color=[colors[i] if colors else color(i) for i in xs], alpha=0.85)
    for x, h, bar in zip(xs, heights, bars, strict=True):
        if math.isnan(h):
            bar.set_visible(False)
        else:
            ax.annotate(value_format.format(h), (x, h), xytext=(0, 3), textcoords="offset points", ha="center",
                        va="bottom", fontsize="small")
    if lower is not None and upper is not None:
        pts = [(x, h, _num(lo), _num(hi)) for x, h, lo, hi in zip(xs, heights, lower, upper, strict=True)]
        pts = [p for p in pts if not any(math.isnan(v) for v in p[1:])]
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                        yerr=[[max(0.0, p[1] - p[2]) for p in pts], [max(0.0, p[3] - p[1]) for p in pts]], fmt="none",
                        ecolor="black",
                        elinewidth=1.0, capsize=5, label="spread")
    if reference is not None:
        ref = [(x, _num(r)) for x, r in zip(xs, reference, strict=True) if not math.isnan(_num(r))]
        if ref:
            ax.scatter([r[0] for r in ref], [r[1] for r in ref], marker="D", color="black", zorder=3, s=28,
                       label=reference_label)
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle=":", linewidth=1.0)
    ax.set_xticks(xs, list(labels))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small", frameon=False)
    return fig


def _num(v: float | None) -> float:
    return math.nan if v is None else float(v)


SOURCE_COLORS = {"update": "tab:blue", "gradient": "tab:orange", "task_gradient": "tab:green"}
ALIGN_STYLES = {"leading": "-", "trailing": "--"}


def series(coupling: Mapping[str, Any], op: str, key: ScanKey, value: str = "R_mean") -> tuple[list[int], list[float]]:
    """(steps, values) of one measured key of a ``coupling.json``."""
    xs, ys = [], []
    for row in coupling["snapshots"]:
        res = row["ops"].get(op, {}).get(str(key))
        if res is not None:
            xs.append(row["step"])
            ys.append(res[value] if value != "R1" else res["R"][0])
    return xs, ys


def grokking_figure(history: Sequence[Mapping[str, Any]], ops: Sequence[str],
                    grok_step: Mapping[str, int | None] | None = None, title: str = "Grokking",
                    log_steps: bool = False) -> Figure:
    """Train and test accuracy (top) and loss (bottom, log scale) per op against the step, the grok step marked
    on both; the legend sits outside the axes. ``log_steps``: a logarithmic step axis (step 0 is left out)."""
    fig = InlineFigure(figsize=(8, 5.6), layout="constrained")
    FigureCanvasAgg(fig)
    a_acc, a_loss = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1.1, 1]})
    rows = [r for r in history if not log_steps or r["step"] > 0]
    steps = [r["step"] for r in rows]
    for i, op in enumerate(ops):
        c = f"C{i}"
        for ax, kind in ((a_acc, "acc"), (a_loss, "loss")):
            ax.plot(steps, [r.get(f"train/{kind}/{op}", np.nan) for r in rows], color=c, ls="--", lw=1, label=f"{op} train")
            ax.plot(steps, [r.get(f"test/{kind}/{op}", np.nan) for r in rows], color=c, lw=1.6, label=f"{op} test")
        g = (grok_step or {}).get(op)
        if g is not None and (g > 0 or not log_steps):
            for ax in (a_acc, a_loss):
                ax.axvline(g, color=c, ls=":", lw=1)
            a_acc.annotate(f"grok {g}", (g, 0.5), xytext=(4, 0), textcoords="offset points", color=c, fontsize=8,
                           va="center")
    a_acc.set_ylim(-0.02, 1.02)
    a_acc.set_ylabel("accuracy")
    a_loss.set_ylabel("cross-entropy loss")
    a_loss.set_yscale("log")
    a_loss.set_xlabel("step" + (" (log scale)" if log_steps else ""))
    if log_steps:
        a_loss.set_xscale("log")
    for ax in (a_acc, a_loss):
        ax.grid(True, alpha=0.3, linewidth=0.6)
        plain_log_ticks(ax)
    a_acc.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    a_acc.set_title(title)
    return fig


def grokking_curves(history: Sequence[Mapping[str, Any]], ops: Sequence[str], path: str | Path,
                    grok_step: Mapping[str, int | None] | None = None, title: str = "Grokking",
                    log_steps: bool = False) -> Path:
    """:func:`grokking_figure` written to ``path``."""
    return save_figure(grokking_figure(history, ops, grok_step, title, log_steps), path)


def plain_log_ticks(ax: Axes) -> None:
    """Plain numbers (0.01, 2, 300) instead of ``4 × 10⁰`` on the log-scaled axes of ``ax``; minor ticks are
    labelled only where an axis spans less than about two decades."""
    from matplotlib import ticker

    def fmt(v: float, _: Any = None) -> str:
        return f"{v:g}" if 1e-4 <= abs(v) < 1e6 or v == 0 else f"{v:.0e}"

    def minor(axis: Any) -> Any:
        def label(v: float, _: Any = None) -> str:  # decided when drawn, on the final limits
            lo, hi = sorted(axis.get_view_interval())
            narrow = lo > 0 and math.log10(hi / lo) < 1.8
            return fmt(v) if narrow and _mantissa(v) in (2, 5) else ""

        return ticker.FuncFormatter(label)

    for axis in (ax.xaxis, ax.yaxis):
        if axis.get_scale() != "log":
            continue
        axis.set_major_formatter(ticker.FuncFormatter(fmt))
        axis.set_minor_formatter(minor(axis))


def _mantissa(v: float) -> int:
    """The leading digit of ``v`` (2 for 0.02, 200, 2.5e3)."""
    return int(f"{abs(v):.6e}"[0]) if v else 0


def coupling_trajectory(coupling: Mapping[str, Any], history: Sequence[Mapping[str, Any]], op: str, path: str | Path,
                        keys: Sequence[ScanKey] | None = None, title: str | None = None) -> Path:
    """One run: accuracy (top) and R̄ of every SED stream over training (bottom, log scale; R̄ = 1 dotted).
    ``keys``: what to draw (default: every main measurement of the run)."""
    keys = keys or sorted((k for k in parse_keys(coupling["summary"][op]) if k.is_main), key=str)
    fig = InlineFigure(figsize=(7.5, 6), layout="constrained")
    FigureCanvasAgg(fig)
    a0, a1 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 2]})
    steps = [r["step"] for r in history]
    a0.plot(steps, [r.get(f"train/acc/{op}", np.nan) for r in history], label="train", color="tab:gray")
    a0.plot(steps, [r.get(f"test/acc/{op}", np.nan) for r in history], label="test", color="black")
    a0.set_ylabel("accuracy")
    a0.legend(fontsize=8)
    for key in keys:
        xs, ys = series(coupling, op, key)
        a1.plot(xs, ys, ALIGN_STYLES.get(key.align, "-"), color=SOURCE_COLORS.get(key.source, "tab:purple"), marker="o",
                ms=2.5, label=f"{key.source} SED ({key.align})")
    a1.axhline(1.0, color="gray", ls=":", lw=1)
    a1.set_yscale("log")
    plain_log_ticks(a1)
    a1.set_xlabel("step")
    a1.set_ylabel("R̄ (SED vs random, centroid response)")
    a1.legend(fontsize=8)
    a0.set_title(title or f"SED–LCH coupling over training ({op})")
    return save_figure(fig, path)


def coupling_panels(runs: Mapping[str, Sequence[tuple[str, Mapping[str, Any]]]], path: str | Path,
                    keys: Callable[[str], Sequence[ScanKey]], title: str,
                    op_of_panel: Mapping[str, str] | None = None) -> Path:
    """One panel per op (``runs[op]`` = [(label, coupling.json)]): R̄ over training (log scale) of ``keys(op)``,
    the keys drawn in the panel of ``op``."""
    panels = list(runs)
    cols = min(4, len(panels))
    rows = int(np.ceil(len(panels) / cols))
    fig = InlineFigure(figsize=(max(4.2 * cols, 7.0), 3.4 * rows + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    for ax, panel in zip(axes.flat, panels, strict=False):
        op = (op_of_panel or {}).get(panel, panel)
        for label, coupling in runs[panel]:
            for k in keys(op):
                xs, ys = series(coupling, op, k)
                if xs:
                    ax.plot(xs, ys, ALIGN_STYLES.get(k.align, "-"), color=SOURCE_COLORS.get(k.source, "tab:purple"), lw=1.2,
                            alpha=0.85, label=f"{k.source} ({k.align})" if label == runs[panel][0][0] else None)
        ax.axhline(1.0, color="gray", ls=":", lw=1)
        ax.set_yscale("log")
        plain_log_ticks(ax)
        ax.set_title(panel)
        ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel("R̄")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def ablation(xs: Sequence[float], ours: Sequence[float], path: str | Path, xlabel: str, title: str,
             paper: Mapping[float, float] | None = None, reference: tuple[str, float] | None = None,
             logx: bool = True) -> Path:
    """Peak R against an ablated parameter (window size, ε), ours beside the paper's points."""
    fig, ax = new_figure(title, xlabel, "peak R₁", (5.5, 3.8))
    ax.plot(xs, ours, "o-", color="tab:orange", label="sed_lens")
    if paper:
        ax.plot(list(paper), list(paper.values()), "s", color="black", mfc="none", ms=8, label="paper")
    if reference is not None:
        ax.axhline(reference[1], color="tab:green", ls="--", label=reference[0])
    if logx:
        ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_ticks(ax)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


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


def sed_spectra(history: Sequence[Mapping[str, Any]], path: str | Path, title: str = "SED spectra over training",
                window: int | None = None, k: int | None = None) -> Path:
    """:func:`sed_spectra_figure` written to ``path``."""
    return save_figure(sed_spectra_figure(history, title, window, k), path)


def sed_spectra_figure(history: Sequence[Mapping[str, Any]], title: str = "SED spectra over training",
                       window: int | None = None, k: int | None = None) -> Figure:
    """Per SED stream (columns): singular values σ_j (top), gaps σ_j/σ_{j+1} (middle) and, where logged, the
    overlap of consecutive bases (bottom) against the step, from the ``sed/*`` keys of ``metrics.jsonl`` rows.
    ``window``, ``k``: the SED window W and k, named in the title."""
    from sed_lens.errors import check

    streams = sed_streams(history)
    check(bool(streams), "these metrics hold no sed/STREAM/sigma_j keys; train with --sed to record SED spectra.")
    has_overlap = any(f"sed/{s}/overlap" in r for s in streams for r in history)
    n_rows = 3 if has_overlap else 2
    fig = InlineFigure(figsize=(max(4.0 * len(streams), 6.0), 2.8 * n_rows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, len(streams), squeeze=False, sharex=True)

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
            plain_log_ticks(ax)
            if c == len(streams) - 1 and ax.get_legend_handles_labels()[0]:  # one legend per row, outside
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        if has_overlap:
            ax_o = axes[2, c]
            ax_o.plot(*line(f"sed/{stream}/overlap", log=False), color="tab:gray", lw=1.3)
            ax_o.set_ylim(-0.02, 1.02)
        axes[-1, c].set_xlabel("step")
    axes[0, 0].set_ylabel("singular value")
    axes[1, 0].set_ylabel(r"gap $\sigma_j / \sigma_{j+1}$")
    if has_overlap:
        axes[2, 0].set_ylabel("overlap with the\nprevious basis (mean cos²)")
    if window is not None or k is not None:
        title += " — " + ", ".join(x for x in (f"window W = {window}" if window is not None else "",
                                                f"k = {k}" if k is not None else "") if x)
    fig.suptitle(title, fontsize=11)
    return fig


def final_coupling_figure(final: Mapping[str, Any], title: str = "Coupling of the final SED bases") -> Figure:
    """Bars of R_1..R_k and R̄ per SED stream (and op) of a run's ``final_coupling`` (``summary.json``), log
    scale, with R = 1 (a random direction) dotted."""
    labels: list[str] = []
    values: list[float | None] = []
    colors: list[str] = []
    multi = len(final["ops"]) > 1
    for op, per in final["ops"].items():
        for stream, r in per.items():
            if not isinstance(r, Mapping):
                continue
            own = stream == stream_name("task_gradient", op)  # streams: update, gradient, the op's own task_gradient
            c = SOURCE_COLORS.get("task_gradient" if own else stream, "tab:purple")
            name = f"{stream}" + (f" ({op})" if multi and not own else "")
            for j, v in enumerate(r["R"], 1):
                labels.append(f"{name}\nR{j}")
                values.append(v if v > 0 else None)
                colors.append(c)
            labels.append(f"{name}\nR̄")
            values.append(r["R_mean"] if r["R_mean"] > 0 else None)
            colors.append(c)
    check(len(labels) > 0, "final_coupling holds no measured stream.")
    fig = bar_chart(labels, values, title, "R = A(v) / median A(random)", baseline=1.0, value_format="{:.1f}",
                    colors=colors, size=(max(6.0, 0.55 * len(labels) + 2), 4.2))
    ax = fig.axes[0]
    ax.set_yscale("log")
    ax.tick_params(axis="x", labelsize=7)
    ratio = final.get("gradient_update_ratio") or {}
    if ratio:
        ax.text(0.01, 0.98, "gradient / update R̄: " + ", ".join(f"{v:.2f}" + (f" ({op})" if multi else "")
                                                               for op, v in ratio.items()),
                transform=ax.transAxes, va="top", fontsize=8)
    plain_log_ticks(ax)
    return fig


def final_coupling(final: Mapping[str, Any], path: str | Path, title: str = "Coupling of the final SED bases") -> Path:
    """:func:`final_coupling_figure` written to ``path`` (the grokking run's ``coupling.png``)."""
    return save_figure(final_coupling_figure(final, title), path)
