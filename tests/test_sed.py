import numpy as np
import pytest
import torch

from sed_lens.analysis.sed import (
    RollingSED,
    iter_sed_over_sequence,
    principal_angles,
    sed_over_sequence,
    subspace_overlap,
    window_bounds,
)
from sed_lens.errors import SedLensError


def numpy_top_k(rows, k):
    _, s, vt = np.linalg.svd(np.asarray(rows, dtype=np.float64), full_matrices=False)
    return s, vt[:k]


def spectrum_vectors(n, p, seed=0):
    """Rows with a decaying spectrum, so the top directions are well separated."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(p, 8, generator=g))[0].T
    coef = torch.randn(n, 8, generator=g) * torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.12, 0.06])
    return coef @ basis + 0.01 * torch.randn(n, p, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_directions_match_numpy_svd_also_after_the_window_wraps(dtype):
    xs = spectrum_vectors(37, 2000)
    sed = RollingSED(window=10, k=3, dtype=dtype)
    for i, x in enumerate(xs):
        sed.push(x)
        lo = max(0, i - 9)
        s_np, v_np = numpy_top_k(xs[lo:i + 1].numpy(), 3)
        if i + 1 < 3:
            continue
        cos = np.abs(np.sum(sed.directions().double().numpy() * v_np, axis=1))
        assert np.all(cos >= 1 - 1e-6), (i, cos)
        np.testing.assert_allclose(sed.singular_values().numpy(), s_np, rtol=1e-4, atol=2e-5 * s_np[0])
    assert sed.n == 10 and sed.n_pushed == 37


def test_directions_are_unit_rows_in_the_span_and_oriented_along_the_drift():
    xs = spectrum_vectors(20, 500, seed=1)
    sed = RollingSED(window=20, k=3)
    for x in xs:
        sed.push(x)
    d = sed.directions().double()
    torch.testing.assert_close(d @ d.T, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    proj = xs.double() @ d.T
    assert torch.all(proj.sum(0) > 0)  # sign convention: the window's net drift is positive on each direction


def test_incremental_gram_equals_recomputed():
    xs = spectrum_vectors(26, 300, seed=2)
    sed = RollingSED(window=7, k=2)
    for x in xs:
        sed.push(x)
    v = sed.vectors().double()
    torch.testing.assert_close(sed.gram(), v @ v.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v.float(), xs[-7:])


def test_gaps_and_overlap():
    xs = spectrum_vectors(12, 400, seed=3)
    sed = RollingSED(window=12, k=3, track_overlap=True)
    for x in xs:
        sed.push(x)
    s = sed.singular_values()
    torch.testing.assert_close(sed.gaps(), s[:3] / s[1:4])
    assert sed.overlap() is not None and 0.5 < sed.overlap() <= 1.0
    prev = sed.directions()
    sed.push(xs[0])
    assert sed.overlap() == pytest.approx(subspace_overlap(prev, sed.directions()))
    assert RollingSED(3, 1).overlap() is None
    a = torch.linalg.qr(torch.randn(50, 3, dtype=torch.float64))[0].T
    assert subspace_overlap(a, a) == pytest.approx(1.0)
    assert subspace_overlap(a, -a[[2, 0, 1]]) == pytest.approx(1.0)  # same span, other order and signs
    b = torch.linalg.qr(torch.randn(50, 3, dtype=torch.float64))[0].T
    b = b - (b @ a.T) @ a
    b = torch.linalg.qr(b.T)[0].T
    assert subspace_overlap(a, b) == pytest.approx(0.0, abs=1e-10)
    torch.testing.assert_close(principal_angles(a, a), torch.zeros(3, dtype=torch.float64), atol=1e-6, rtol=0)


def test_rank_deficient_window_is_flagged_with_well_defined_output():
    sed = RollingSED(window=5, k=3)
    x = torch.randn(100)
    for _ in range(5):
        sed.push(x)  # rank 1
    b = sed.basis()
    assert b.rank == 1 and b.rank_deficient and sed.rank_deficient
    d = sed.directions()
    assert torch.isfinite(d).all() and torch.all(d[1:] == 0)
    assert abs(float(d[0] @ x / x.norm())) == pytest.approx(1.0, abs=1e-6)
    zero = RollingSED(window=3, k=2)
    zero.push(torch.zeros(10))
    assert zero.basis().rank == 0 and torch.all(zero.directions() == 0)
    assert zero.gaps().shape == (2,) and zero.rank_deficient


def test_fewer_vectors_than_k_early_in_training():
    sed = RollingSED(window=20, k=3)
    sed.push(torch.randn(50))
    sed.push(torch.randn(50))
    b = sed.basis()
    assert b.n_vectors == 2 and b.rank == 2 and b.rank_deficient
    assert len(sed.singular_values()) == 2


def test_window_bounds():
    assert window_bounds(0, 10, 4, "trailing") == (0, 1)
    assert window_bounds(6, 10, 4, "trailing") == (3, 7)
    assert window_bounds(2, 10, 4, "leading") == (2, 6)
    assert window_bounds(8, 10, 4, "leading") == (6, 10)  # clamped to end at the last entry
    assert window_bounds(10, 10, 4, "leading") == (6, 10)
    assert window_bounds(1, 3, 4, "leading") == (0, 3)


@pytest.mark.parametrize("align", ["trailing", "leading"])
def test_sed_over_sequence_matches_numpy_per_window(align):
    xs = spectrum_vectors(15, 300, seed=4)
    out = sed_over_sequence(list(xs), range(15), window=5, k=2, align=align)
    for t, b in out.items():
        lo, hi = window_bounds(t, 15, 5, align)
        _, v = numpy_top_k(xs[lo:hi].numpy(), 2)
        r = min(2, hi - lo)
        assert b.rank == hi - lo if hi - lo < 5 else b.rank == 5
        cos = np.abs(np.sum(b.directions[:r].double().numpy() * v[:r], axis=1))
        assert np.all(cos >= 1 - 1e-6), (t, cos)


def test_sed_errors():
    with pytest.raises(SedLensError, match="window of at least k"):
        RollingSED(window=2, k=3)
    with pytest.raises(SedLensError, match="k must be"):
        RollingSED(window=2, k=0)
    with pytest.raises(SedLensError, match="window must be"):
        RollingSED(window=0)
    sed = RollingSED(window=3, k=1)
    with pytest.raises(SedLensError, match="empty"):
        sed.directions()
    sed.push(torch.randn(4))
    with pytest.raises(SedLensError, match="dimension 4"):
        sed.push(torch.randn(5))
    with pytest.raises(SedLensError, match="NaN"):
        sed.push(torch.tensor([1.0, float("nan"), 0.0, 0.0]))
    with pytest.raises(SedLensError, match="flat"):
        sed.push(torch.randn(2, 2))
    with pytest.raises(SedLensError, match="alignment"):
        window_bounds(0, 5, 2, "centred")


def test_sign_falls_back_to_largest_coordinate_when_the_drift_vanishes():
    x = torch.tensor([0.1, -3.0, 0.5, 1.0])
    sed = RollingSED(window=2, k=1)
    sed.push(x)
    sed.push(-x)  # no net drift: the orientation by sum is undefined
    d = sed.directions()[0]
    assert d[1] > 0 and d.abs().argmax() == 1
    torch.testing.assert_close(d.abs(), x.abs() / x.norm())


class CountingSequence(list):
    """A list that records the highest index read."""

    furthest = -1

    def __getitem__(self, i):
        self.furthest = max(self.furthest, i)
        return super().__getitem__(i)


@pytest.mark.parametrize("align", ["trailing", "leading"])
def test_streamed_bases_come_in_order_as_soon_as_their_window_is_read(align):
    xs = spectrum_vectors(30, 64, seed=5)
    wanted = [25, 3, 11, 12, 29]
    whole = sed_over_sequence(list(xs), wanted, window=6, k=2, align=align)
    seq = CountingSequence(xs)
    stream = iter_sed_over_sequence(seq, wanted, window=6, k=2, align=align)
    got = []
    for t, b in stream:
        # the pass has read exactly to the end of this window, not beyond
        assert seq.furthest == window_bounds(t, 30, 6, align)[1] - 1, (t, seq.furthest)
        got.append(t)
        assert torch.equal(b.directions, whole[t].directions) and torch.equal(b.singular_values, whole[t].singular_values)
    assert got == sorted(wanted)
