"""Figures as PNG files: small helpers on matplotlib's object-oriented API.

Figures are built as ``matplotlib.figure.Figure`` objects drawn by the Agg renderer, without ``pyplot``: nothing
changes matplotlib's global backend or state, so the helpers are safe in scripts, worker processes and
notebooks alike (a returned ``Figure`` displays inline in Jupyter). Every figure has a title, labelled axes and,
where there is more than one series, a legend.

Building blocks: :func:`new_figure`, :func:`save_figure`, :func:`color`; figure types: :func:`curve_overlay`
(groups of curves, one colour per group, e.g. accuracy curves of several seeds per condition) and
:func:`bar_chart` (one bar per label with an error bar for the spread, optional reference markers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sed_lens.errors import check
from sed_lens.tracking import atomic_write_bytes

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")  # matplotlib's tab10, reordered so the first five conditions are easy to tell apart

Curve = tuple[Sequence[float], Sequence[float]]  # (x values, y values)


def color(i: int) -> str:
    """The i-th colour of the palette (cycling)."""
    return PALETTE[i % len(PALETTE)]


def new_figure(title: str, xlabel: str, ylabel: str, size: tuple[float, float] = (7.0, 4.5)) -> tuple[Figure, Axes]:
    """A figure with one titled, labelled axes (constrained layout, light grid)."""
    fig = Figure(figsize=size, layout="constrained")
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
