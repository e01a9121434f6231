import numpy as np
import pytest
import torch

from sed_lens.analysis.sed import window_bounds
from sed_lens.analysis.trajectory_bases import BasesFeed, KeyBases
from sed_lens.errors import SedLensError


def svd_directions(rows, k):
    return np.linalg.svd(torch.stack(rows).double().numpy(), full_matrices=False)[2][:k]


def test_one_walk_feeds_every_key_the_windows_a_numpy_svd_gives():
    """Two streams walked together, keys with leading and trailing windows longer than the spacing of the snapshots:
    each basis equals the SVD of its window, each entry is read once, and bases are handed out in any order."""
    g = torch.Generator().manual_seed(0)
    streams = {"a": [torch.randn(40, generator=g) for _ in range(12)],
               "b": [torch.randn(40, generator=g) for _ in range(11)]}
    reads = []

    def entries():
        for j in range(12):
            reads.append(j)
            yield {n: v[j] for n, v in streams.items() if j < len(v)}

    measured = [0, 2, 4, 7, 11]
    keys = [KeyBases("a", 12, {t: t for t in measured}, 4, 2, "leading", "a"),
            KeyBases("a", 12, {t: t for t in measured}, 3, 1, "trailing", "a"),
            KeyBases("b", 11, {t: t - 1 for t in measured if t >= 1}, 5, 2, "trailing", "b")]
    feed = BasesFeed(entries(), [(kb, None) for kb in keys])
    for t in reversed(measured):  # asked out of order: the walk still reads each entry once
        for kb in keys:
            if t not in kb.anchors:
                continue
            lo, hi = window_bounds(kb.anchors[t], kb.n, kb.window, kb.align)
            want = svd_directions(streams[kb.stream][lo:hi], kb.k)
            got = feed.at(kb, t).directions.double().numpy()
            r = min(kb.k, hi - lo)
            assert np.all(np.abs((got[:r] * want[:r]).sum(1)) > 1 - 1e-5), (kb.stream, kb.align, t)
    assert reads == list(range(12))
    with pytest.raises(SedLensError, match="no SED window of 'a' at snapshot 4"):
        feed.at(keys[0], 4)  # handed out already


def test_a_feed_asked_beyond_its_entries_or_for_a_snapshot_it_was_not_given_says_so():
    kb = KeyBases("a", 10, {9: 9}, 3, 1, "trailing", "a")
    feed = BasesFeed(iter([{"a": torch.ones(4)}] * 5), [(kb, [9])])
    with pytest.raises(SedLensError, match="ended before every SED window was complete"):
        feed.at(kb, 9)
    with pytest.raises(SedLensError, match="no SED window of 'a' at snapshot 3"):
        BasesFeed(iter([]), [(kb, [9])]).at(kb, 3)
