"""coupling() and centroid_response() take unit directions (or zero rows); anything else is one clear error,
since A(v) — and so R — scales with ‖v‖²."""

import pytest
import torch

from sed_lens import (
    ModularArithmetic,
    ParamSubspace,
    RollingSED,
    ScanConfig,
    SnapshotStore,
    TrainConfig,
    Trainer,
    build_model,
    centroid_response,
    coupling,
    scan_coupling,
)
from sed_lens.errors import SedLensError


@pytest.fixture(scope="module")
def setup():
    task = ModularArithmetic(11, ("add",), 0.5, seed=0)
    model = build_model("xu2026", task, init="tl", seed=0)
    S = ParamSubspace.attention(model)
    return task, model, S, task.probes(16, seed=0)


def test_non_unit_directions_are_refused(setup):
    task, model, S, probes = setup
    v = S.random_directions(2, torch.Generator().manual_seed(0))
    with pytest.raises(SedLensError, match=r"unit vectors.*row 1 has norm 10.*v / v.norm\(dim=1, keepdim=True\)"):
        coupling(model, S, torch.stack([v[0], 10 * v[1]]), probes, n_random=3)
    with pytest.raises(SedLensError, match="row 0 has norm 0.5"):
        centroid_response(model, S, 0.5 * v[:1], probes)
    with pytest.raises(SedLensError, match="random directions must be unit"):
        coupling(model, S, v, probes, random_directions=2 * v)


def test_unit_and_zero_rows_are_accepted_and_a_zero_row_has_no_response(setup):
    task, model, S, probes = setup
    v = S.random_directions(2, torch.Generator().manual_seed(0))
    nearly = v[0] * (1 + 5e-4)  # within the 1e-3 relative tolerance
    A = centroid_response(model, S, torch.stack([v[0], nearly, torch.zeros(S.dim)]), probes, method="hvp")
    assert A[2] == 0
    torch.testing.assert_close(A[1], A[0] * (1 + 5e-4) ** 2, rtol=1e-4, atol=0)  # A scales with ‖v‖²
    res = coupling(model, S, torch.stack([v[0], torch.zeros(S.dim)]), probes, n_random=3, method="hvp")
    assert res.R[1] == 0 and res.R[0] > 0


def test_sed_bases_are_unit_even_near_the_rank_cutoff():
    """Float32 windows whose σ_2/σ_1 sits just above the cut-off gave rows ~0.5 % off unit norm before the
    directions were renormalised; the check above would then refuse a genuine SED basis."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(131072, generator=g)
    sed = RollingSED(20, 3)
    for i in range(20):
        sed.push(base * (1 + 0.01 * i) + 1e-2 * torch.randn(131072, generator=g))
    b = sed.basis()
    assert b.rank >= 3
    torch.testing.assert_close(torch.linalg.vector_norm(b.directions.double(), dim=1), torch.ones(3, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    # and against an independent SVD of the window
    _, _, vh = torch.linalg.svd(sed.vectors().double(), full_matrices=False)
    cos = (vh[:1] @ b.directions[:1].double().T).abs()
    assert float(cos) > 0.9999


def test_scan_coupling_still_measures_rank_deficient_bases():
    """Three snapshots, k=3: the update window holds at most 2 vectors, so its bases have zero rows."""
    task = ModularArithmetic(11, ("add",), 0.5, seed=0)
    model = build_model("xu2026", task, init="tl", seed=0)
    store = SnapshotStore(every=2)
    Trainer(model, task, TrainConfig(steps=4, batch_size=32, eval_every=2, checkpoint_every=0), [store],
            progress=False).fit()
    out = scan_coupling(model, task, store, ScanConfig(n_snapshots=3, window=4, k=3, n_probes=16, n_random=3,
                                                       aligns=("trailing",), sources=("update", "gradient")),
                        progress=False)
    last = out["snapshots"][-1]["ops"]["add"]["update/trailing"]
    assert last["rank"] == 2 and last["R"][2] == 0 and last["R"][0] > 0
