import matplotlib
import numpy as np
import pytest
from matplotlib.colors import to_hex

from sed_lens import plots
from sed_lens.errors import SedLensError


def test_curve_overlay_one_colour_per_group_one_line_per_curve(tmp_path):
    before = matplotlib.get_backend()
    groups = {"A": [([0, 1, 2], [0.0, 0.5, 1.0]), ([0, 1], [0.1, 0.2])], "B": [([0, 5], [0.3, 0.4])]}
    fig = plots.curve_overlay(groups, "Title", "step", "accuracy", hline=0.5, hline_label="threshold")
    ax = fig.axes[0]
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("Title", "step", "accuracy")
    lines = ax.get_lines()
    assert len(lines) == 4  # three curves and the threshold
    assert to_hex(lines[0].get_color()) == to_hex(lines[1].get_color()) != to_hex(lines[2].get_color())
    np.testing.assert_array_equal(lines[1].get_xydata(), [[0, 0.1], [1, 0.2]])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["A", "B", "threshold"]
    path = plots.save_figure(fig, tmp_path / "sub" / "c.png")
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert matplotlib.get_backend() == before  # no global state touched


def test_bar_chart_heights_error_bars_and_reference():
    fig = plots.bar_chart(["a", "b", "c"], [1.0, 2.0, None], "Speedup", "x", lower=[1.0, 1.5, None],
                          upper=[1.0, 2.5, None], reference=[1.0, None, 2.2], reference_label="paper", baseline=1.0)
    ax = fig.axes[0]
    bars = ax.patches
    assert [b.get_height() for b in bars[:2]] == [1.0, 2.0] and not bars[2].get_visible()
    err = [c for c in ax.containers if isinstance(c, matplotlib.container.ErrorbarContainer)][0]
    segs = err.lines[2][0].get_segments()
    np.testing.assert_allclose([s[:, 1] for s in segs], [[1.0, 1.0], [1.5, 2.5]])
    offsets = ax.collections[-1].get_offsets()
    np.testing.assert_allclose(offsets, [[0, 1.0], [2, 2.2]])
    assert "paper" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]


def test_plot_errors():
    with pytest.raises(SedLensError, match="at least one group"):
        plots.curve_overlay({}, "t", "x", "y")
    with pytest.raises(SedLensError, match="2 x values but 3 y values"):
        plots.curve_overlay({"A": [([0, 1], [0, 1, 2])]}, "t", "x", "y")
    with pytest.raises(SedLensError, match="2 labels but 1 values"):
        plots.bar_chart(["a", "b"], [1.0], "t", "y")
