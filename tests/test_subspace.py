import numpy as np
import pytest
import torch

from sed_lens.errors import SedLensError
from sed_lens.models import build_model
from sed_lens.subspace import ParamSubspace
from sed_lens.tasks import ModularArithmetic


@pytest.fixture
def model():
    return build_model("xu2026", ModularArithmetic(p=97), seed=0)


def test_attention_subspace_is_the_papers(model):
    S = ParamSubspace.attention(model)
    assert S.dim == 2 * 4 * 128 * 128 == 131_072
    assert S.names == [f"blocks.{i}.attn.W_{m}" for i in (0, 1) for m in "QKVO"]
    assert not any("b_" in n for n in S.names)


def test_flatten_unflatten_round_trip(model):
    S = ParamSubspace.attention(model, layers=[1], heads=[0, 2], mats="QO")
    w = S.weights()
    parts = S.unflatten(w)
    assert set(parts) == {"blocks.1.attn.W_Q", "blocks.1.attn.W_O"}
    assert torch.equal(parts["blocks.1.attn.W_Q"], model.blocks[1].attn.W_Q[[0, 2]])
    assert torch.equal(S.flatten({n: p for n, p in model.named_parameters()}), w)
    full = S.unflatten(w, full=True)
    assert full["blocks.1.attn.W_O"].shape == (4, 32, 128)
    assert torch.all(full["blocks.1.attn.W_O"][[1, 3]] == 0)
    assert torch.equal(full["blocks.1.attn.W_O"][2], model.blocks[1].attn.W_O[2])
    v = torch.randn(S.dim)
    assert torch.equal(S.flatten(S.unflatten(v, full=True)), v)


def test_selectors(model):
    assert ParamSubspace.attention(model, mats="QK").dim == 2 * 2 * 4 * 128 * 32
    assert ParamSubspace.attention(model, heads=[0, 2]).dim == 2 * 4 * 2 * 128 * 32
    assert ParamSubspace.attention(model, layers=[0], mats=["V"]).names == ["blocks.0.attn.W_V"]
    S = ParamSubspace.from_names(model, ["blocks.0.mlp.W_in", "unembed.W_U"])
    assert S.dim == 128 * 256 + 128 * 97


def test_set_grads_and_weights_touch_only_the_selection(model):
    S = ParamSubspace.attention(model, layers=[0], heads=[1], mats="K")
    before = model.blocks[0].attn.W_K.detach().clone()
    S.set_weights(torch.zeros(S.dim))
    after = model.blocks[0].attn.W_K.detach()
    assert torch.all(after[1] == 0) and torch.equal(after[[0, 2, 3]], before[[0, 2, 3]])
    S.set_grads(torch.ones(S.dim))
    g = model.blocks[0].attn.W_K.grad
    assert torch.all(g[1] == 1) and torch.all(g[[0, 2, 3]] == 0)
    assert torch.equal(S.grads(), torch.ones(S.dim))


def test_random_directions_and_basis(model):
    S = ParamSubspace.attention(model, layers=[0])
    g = torch.Generator().manual_seed(0)
    d = S.random_directions(5, g)
    torch.testing.assert_close(torch.linalg.vector_norm(d, dim=1), torch.ones(5))
    B = S.random_basis(3, g)
    torch.testing.assert_close(B @ B.T, torch.eye(3), atol=1e-5, rtol=0)
    assert not torch.equal(B, S.random_basis(3, g))


def test_projection_against_numpy(model):
    S = ParamSubspace.attention(model, layers=[1], mats="V")
    B = S.random_basis(3, torch.Generator().manual_seed(1), dtype=torch.float64)
    x = torch.randn(S.dim, dtype=torch.float64)
    Bn, xn = B.numpy(), x.numpy()
    keep_np = Bn.T @ np.linalg.lstsq(Bn.T, xn, rcond=None)[0]  # least-squares projection onto the span
    np.testing.assert_allclose(S.project(x, B, "keep").numpy(), keep_np, atol=1e-10)
    np.testing.assert_allclose(S.project(x, B, "remove").numpy(), xn - keep_np, atol=1e-10)


def test_head_view_splits_norm_over_heads(model):
    S = ParamSubspace.attention(model)
    v = torch.zeros(S.dim)
    s = S.slices[5]  # blocks.1.attn.W_K
    per_head = s.numel // 4
    v[s.offset + 2 * per_head: s.offset + 3 * per_head] = 3.0
    view = S.head_view(v)
    assert len(view.rows) == 2 * 4 * 4
    top = view.top(1)[0]
    assert top[:3] == (1, "K", 2) and top[3] == pytest.approx(3.0 * per_head**0.5)
    assert sum(view.share()) == pytest.approx(1.0)
    assert "share" in str(view)


def test_works_on_a_non_preset_model(odd_model):
    S = ParamSubspace.attention(odd_model, heads=[2])
    assert S.dim == 3 * 4 * 24 * 8
    v = torch.randn(S.dim)
    assert torch.equal(S.flatten(S.unflatten(v, full=True)), v)


def test_subspace_errors(model):
    with pytest.raises(SedLensError, match="mats"):
        ParamSubspace.attention(model, mats="QX")
    with pytest.raises(SedLensError, match="layers"):
        ParamSubspace.attention(model, layers=[2])
    with pytest.raises(SedLensError, match="heads"):
        ParamSubspace.attention(model, heads=[4])
    with pytest.raises(SedLensError, match="selects no parameters"):
        ParamSubspace.from_names(model, [])
    with pytest.raises(SedLensError, match="no parameter"):
        ParamSubspace.from_names(model, ["blocks.0.attn.W_X"])
    S = ParamSubspace.attention(model, layers=[0])
    with pytest.raises(SedLensError, match="dimension"):
        S.unflatten(torch.zeros(5))
    with pytest.raises(SedLensError, match=r"shape \[n, 65536\]"):
        S.check_directions(torch.zeros(2, 7))
    with pytest.raises(SedLensError, match="keep or remove"):
        S.project(torch.zeros(S.dim), S.random_basis(1), "flip")
    with pytest.raises(SedLensError, match="k must be"):
        S.random_basis(0)
