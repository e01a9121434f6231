import copy
import warnings

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sed_lens.analysis import coupling as coupling_module
from sed_lens.analysis.centroids import CentroidMap, centroids
from sed_lens.analysis.coupling import centroid_response, coupling, directions_per_call, perturbation_scale
from sed_lens.errors import SedLensError
from sed_lens.models import build_model, get_readout, set_readout
from sed_lens.subspace import ParamSubspace
from sed_lens.tasks import ModularArithmetic


@pytest.fixture(scope="module")
def multitask():
    task = ModularArithmetic(p=13, ops=("add", "sub", "mul", "sq"), seed=0)
    model = build_model("xu2026", task, seed=1)
    return task, model


def embedding_gradient(model, tokens, scalar_fn):
    """Independent centroid: the autograd gradient w.r.t. the embedding fed in as a leaf."""
    emb = (model.embed(tokens) + model.pos_embed(tokens)).detach().requires_grad_(True)
    logits = model(emb, start_at_layer=0)
    return torch.autograd.grad(scalar_fn(logits).sum(), emb)[0]


def test_correct_logit_centroid_is_the_embedding_gradient_of_the_ops_head(multitask):
    task, model = multitask
    x, y = task.probes(40, seed=0)
    mu = centroids(model, x, y, task="mul")
    assert mu.shape == (40, 2, 128)
    ref = embedding_gradient(model, x, lambda lg: lg[:, 0, 26:39].gather(1, y["mul"][:, None]).squeeze(1))
    torch.testing.assert_close(mu, ref)
    torch.testing.assert_close(centroids(model, x, y, task="mul", batch_size=7), ref)


def test_logit_sum_is_jacobian_transpose_times_ones(multitask):
    task, model = multitask
    x, y = task.probes(3, seed=1)
    mu = centroids(model, x, y, readout="logit_sum", task="add")
    for i in range(3):
        emb = (model.embed(x[i:i + 1]) + model.pos_embed(x[i:i + 1])).detach()
        J = torch.autograd.functional.jacobian(lambda e: model(e, start_at_layer=0)[0, 0, 0:13], emb)  # [13, 1, 2, 128]
        torch.testing.assert_close(mu[i], J.sum(0)[0], rtol=1e-4, atol=1e-6)


def test_vector_and_callable_readouts(multitask):
    task, model = multitask
    x, y = task.probes(10, seed=2)
    w = torch.randn(13)
    ref = embedding_gradient(model, x, lambda lg: lg[:, 0, 13:26] @ w)
    torch.testing.assert_close(centroids(model, x, y, readout=w, task="sub"), ref)
    fn = lambda logits, labels: logits.logsumexp(-1)  # noqa: E731
    ref2 = embedding_gradient(model, x, lambda lg: lg[:, 0, 13:26].logsumexp(-1))
    torch.testing.assert_close(centroids(model, x, y, readout=fn, task="sub"), ref2)


def test_centroid_at_a_deeper_site(multitask):
    task, model = multitask
    x, y = task.probes(8, seed=3)
    mu = centroids(model, x, y, site="blocks.1.hook_resid_pre", task="add")
    _, cache = model.run_with_cache(x)
    resid = cache["blocks.1.hook_resid_pre"].detach().requires_grad_(True)
    logits = model(resid, start_at_layer=1)[:, 0, 0:13]
    ref = torch.autograd.grad(logits.gather(1, y["add"][:, None]).sum(), resid)[0]
    torch.testing.assert_close(mu, ref)


def fd_by_hand(model, S, v, x, y, op, eps):
    """Central difference of centroids of two perturbed copies of the model (no sed_lens autodiff)."""
    out = []
    for sign in (1, -1):
        m = copy.deepcopy(model)
        S2 = ParamSubspace.attention(m)
        S2.set_weights(S2.weights() + sign * eps * v)
        sl = get_readout(m).slice(op)  # the readout survives the deep copy
        out.append(embedding_gradient(m, x, lambda lg, sl=sl: lg[:, 0, sl].gather(1, y[op][:, None]).squeeze(1)))
    d = (out[0].double() - out[1].double()) / (2 * eps)
    return float((d**2).sum((1, 2)).mean())


def test_jvp_response_matches_finite_differences(multitask):
    task, model = multitask
    S = ParamSubspace.attention(model)
    x, y = task.probes(64, seed=4)
    dirs = S.random_directions(3, torch.Generator().manual_seed(0))
    jvp = centroid_response(model, S, dirs, (x, y), method="jvp", task="sq", chunk_size=2)
    fd = centroid_response(model, S, dirs, (x, y), method="fd", eps_rel=1e-3, task="sq")
    torch.testing.assert_close(fd, jvp, rtol=1e-3, atol=0)
    hvp = centroid_response(model, S, dirs, (x, y), method="hvp", task="sq")
    torch.testing.assert_close(hvp, jvp, rtol=1e-4, atol=0)
    eps = perturbation_scale(model, S, 1e-3)
    assert eps == pytest.approx(1e-3 * float(S.weights().double().norm()))
    by_hand = fd_by_hand(model, S, dirs[0], x, y, "sq", eps)
    assert float(jvp[0]) == pytest.approx(by_hand, rel=1e-3)
    # the vectorised central difference (all 3 directions' ± perturbations in one vmap) is the same difference, up
    # to float32 rounding: the batched kernels sum in another order than the by-hand loop, and the difference divides
    # that rounding of μ(θ ± εv) by 2ε (5e-6 relative on AVX2 kernels, under 1e-6 on the Intel Xeon the test was
    # written on; fd vs exact differ by 1e-3)
    assert float(fd[0]) == pytest.approx(by_hand, rel=5e-5)
    assert float(fd[2]) == pytest.approx(fd_by_hand(model, S, dirs[2], x, y, "sq", eps), rel=5e-5)
    assert torch.allclose(centroid_response(model, S, dirs, (x, y), task="sq", probe_batch=20), jvp, rtol=1e-5)


def loop_responses(model, S, dirs, probes, method, eps_rel=0.005, task=None, readout="correct_logit"):
    """A(v) by the one-direction-at-a-time loops (no vmap), in float64: the reference of the vectorised paths."""
    cmap = CentroidMap(model, *probes, readout=readout, task=task)
    base = {n: p.detach() for n, p in S.parameters_of(model).items()}
    rows = slice(0, probes[0].shape[0])
    eps = perturbation_scale(model, S, eps_rel)
    was_training = model.training
    model.eval()
    try:
        return coupling_module._loop_sq(method, cmap, model, base, S, dirs, rows, eps) / probes[0].shape[0]
    finally:
        model.train(was_training)


def no_fallback(record):
    return not [w for w in record if "could not vectorise" in str(w.message)]


@pytest.mark.parametrize("method", ["hvp", "fd"])
def test_vectorised_hvp_and_fd_equal_the_one_direction_loops(multitask, method):
    """Groups of 1, 2, 3 (not dividing 7), 7 and 8 (> n) directions per call, a zero row and a row 5e-4 off unit
    norm among them: every A(v) as the loop's, to float32 rounding; the zero row exactly 0."""
    task, model = multitask
    S = ParamSubspace.attention(model)
    x, y = task.probes(32, seed=5)
    d = S.random_directions(6, torch.Generator().manual_seed(3))
    dirs = torch.cat([d[:3], torch.zeros(1, S.dim), d[3:5], d[5:] * (1 + 5e-4)])
    ref = loop_responses(model, S, dirs, (x, y), method, task="mul")
    assert ref[3] == 0 and (ref[[0, 1, 2, 4, 5, 6]] > 0).all()
    for chunk in (1, 2, 3, 7, 8):
        assert directions_per_call(method, chunk, 32, torch.device("cpu")) == chunk  # the CPU cap does not bind here
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            A = centroid_response(model, S, dirs, (x, y), method=method, task="mul", chunk_size=chunk)
        assert no_fallback(record)
        assert A[3] == 0
        torch.testing.assert_close(A.double(), ref, rtol=1e-5, atol=0)
    # probe batches that do not divide the probes: the sums over them still add up
    A = centroid_response(model, S, dirs, (x, y), method=method, task="mul", chunk_size=3, probe_batch=13)
    torch.testing.assert_close(A.double(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("method", ["hvp", "fd"])
def test_vectorised_paths_in_float64(multitask, method):
    task, model = multitask
    model64 = copy.deepcopy(model).double()
    model64.cfg.dtype = torch.float64  # else TransformerLens' LayerNorm casts back to float32
    S = ParamSubspace.attention(model64)
    x, y = task.probes(24, seed=6)
    dirs = S.random_directions(5, torch.Generator().manual_seed(4), dtype=torch.float64)
    cmap = CentroidMap(model64, x, y, task="add")
    base = {n: p.detach() for n, p in S.parameters_of(model64).items()}
    rows, eps = slice(0, 24), perturbation_scale(model64, S, 0.005)
    model64.eval()
    ref = coupling_module._loop_sq(method, cmap, model64, base, S, dirs, rows, eps)
    for per_call in (2, 3, 5):
        got = coupling_module._batched_sq(method, cmap, model64, base, S, dirs, rows, eps, per_call)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)
    if method == "fd":  # and, at a small ε, the vectorised central difference is the exact response (float64 only)
        exact = coupling_module._hvp_sq(cmap, model64, S, dirs, rows, 1)
        small = coupling_module._batched_sq("fd", cmap, model64, base, S, dirs, rows, perturbation_scale(model64, S, 1e-5), 5)
        torch.testing.assert_close(small, exact, rtol=1e-8, atol=0)


def test_the_vectorised_central_difference_does_not_depend_on_how_many_directions_share_a_call(multitask):
    """Bit for bit in float32: how many directions one call stacks is a memory/speed choice
    (:data:`~sed_lens.analysis.coupling.CPU_DIRECTION_PROBES`), never a change of the numbers."""
    task, model = multitask
    model = copy.deepcopy(model)
    S = ParamSubspace.attention(model)
    x, y = task.probes(64, seed=8)
    dirs = S.random_directions(6, torch.Generator().manual_seed(6))
    cmap = CentroidMap(model, x, y, task="add")
    base = {n: p.detach() for n, p in S.parameters_of(model).items()}
    rows, eps = slice(0, 64), perturbation_scale(model, S, 0.005)
    model.eval()
    one = coupling_module._batched_sq("fd", cmap, model, base, S, dirs, rows, eps, 1)
    for per_call in (2, 3, 6):
        assert torch.equal(coupling_module._batched_sq("fd", cmap, model, base, S, dirs, rows, eps, per_call), one)


def test_a_readout_vmap_cannot_take_falls_back_to_the_loop_with_a_warning(multitask):
    task, model = multitask
    S = ParamSubspace.attention(model)
    x, y = task.probes(16, seed=7)
    dirs = S.random_directions(3, torch.Generator().manual_seed(5))

    def data_dependent(logits, labels):  # .item() inside vmap is a RuntimeError
        return logits.logsumexp(-1) * (2.0 if logits.abs().max().item() > 1e-3 else 1.0)

    ref = loop_responses(model, S, dirs, (x, y), "fd", task="sq", readout=data_dependent)
    with pytest.warns(RuntimeWarning, match=r"could not vectorise over directions \(RuntimeError.*one direction at a time"):
        A = centroid_response(model, S, dirs, (x, y), method="fd", task="sq", readout=data_dependent, probe_batch=8)
    torch.testing.assert_close(A.double(), ref, rtol=1e-5, atol=0)
    # hvp vectorises only the backward, which this readout does not stop
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        A = centroid_response(model, S, dirs, (x, y), method="hvp", task="sq", readout=data_dependent)
    assert no_fallback(record)
    torch.testing.assert_close(A.double(), loop_responses(model, S, dirs, (x, y), "hvp", task="sq", readout=data_dependent),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("method", ["hvp", "fd"])
def test_any_failure_of_the_vectorised_path_falls_back_once(multitask, method, monkeypatch):
    task, model = multitask
    S = ParamSubspace.attention(model)
    x, y = task.probes(20, seed=8)
    dirs = S.random_directions(4, torch.Generator().manual_seed(6))
    ref = loop_responses(model, S, dirs, (x, y), method, task="add")
    calls = []

    def fails(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("out of memory\nsecond line")

    monkeypatch.setattr(coupling_module, "_batched_sq", fails)
    with pytest.warns(RuntimeWarning, match=r"\(RuntimeError: out of memory\); measuring one direction at a time"):
        A = centroid_response(model, S, dirs, (x, y), method=method, task="add", chunk_size=2, probe_batch=7)
    assert len(calls) == 1  # not retried for the later probe batches
    torch.testing.assert_close(A.double(), ref, rtol=1e-5, atol=0)


def test_directions_per_call():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert directions_per_call("fd", 8, 1024, cpu) == 1 and directions_per_call("hvp", 8, 1024, cpu) == 1
    assert directions_per_call("fd", 8, 512, cpu) == 2 and directions_per_call("jvp", 8, 1024, cpu) == 2
    assert directions_per_call("jvp", 8, 64, cpu) == 8 and directions_per_call("jvp", 8, 1024, gpu) == 8
    assert directions_per_call("fd", 8, 64, cpu) == 8 and directions_per_call("hvp", 8, 64, cpu) == 4
    assert directions_per_call("hvp", 3, 64, cpu) == 3 and directions_per_call("hvp", 8, 256, cpu) == 1
    assert directions_per_call("fd", 8, 100_000, cpu) == 1
    assert directions_per_call("hvp", 8, 1024, gpu) == 8 and directions_per_call("fd", 5, 10**6, gpu) == 5


def test_jvp_on_a_cpu_takes_only_as_many_directions_per_call_as_its_probes_allow(multitask, monkeypatch):
    """Many probes: the default chunk of 8 would hold gigabytes of forward-mode activations, so a call takes fewer."""
    task, model = multitask
    S = ParamSubspace.attention(model)
    dirs = S.random_directions(4, torch.Generator().manual_seed(9))
    seen, jvp_sq = [], coupling_module._jvp_sq
    monkeypatch.setattr(coupling_module, "CPU_DIRECTION_PROBES", {**coupling_module.CPU_DIRECTION_PROBES, "jvp": 40})
    monkeypatch.setattr(coupling_module, "_jvp_sq", lambda *a: seen.append(a[-1]) or jvp_sq(*a))
    capped = centroid_response(model, S, dirs, task.probes(20, seed=3), method="jvp", task="add")
    assert seen == [2]
    whole = centroid_response(model, S, dirs, task.probes(20, seed=3), method="jvp", task="add", chunk_size=1)
    torch.testing.assert_close(capped, whole, rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def tiny():
    cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16, n_ctx=2, d_vocab=5,
                                  d_vocab_out=5, act_fn="gelu", attention_dir="bidirectional", normalization_type="LN")
    torch.manual_seed(0)
    m = HookedTransformer(cfg, move_to_device=False)
    set_readout(m, 0, ("add",), 5)
    x = torch.cartesian_prod(torch.arange(5), torch.arange(5))
    return m, x, {"add": (x[:, 0] + x[:, 1]) % 5}


def test_top_singular_vector_of_the_centroid_jacobian_couples_far_more_than_random(tiny):
    m, x, y = tiny
    S = ParamSubspace.attention(m)
    w0 = S.weights()

    def flat_centroids(w):
        params = {n: t for n, t in S.unflatten(w, full=True).items()}
        emb = (m.embed(x) + m.pos_embed(x)).detach().requires_grad_(True)
        logits = torch.func.functional_call(m, params, (emb,), {"start_at_layer": 0})[:, 0]
        g = torch.autograd.grad(logits.gather(1, y["add"][:, None]).sum(), emb, create_graph=True)[0]
        return g.reshape(-1)

    J = torch.autograd.functional.jacobian(flat_centroids, w0)  # [n_probes·2·8, P]
    v1 = torch.linalg.svd(J.double(), full_matrices=False)[2][0].float()
    res = coupling(m, S, v1[None], (x, y), n_random=20, seed=0)
    assert res.R[0] > 10  # the most responsive direction dominates random ones
    # and its A(v) is the top squared singular value of J, over the probe count
    top = torch.linalg.svdvals(J.double())[0] ** 2 / len(x)
    assert float(res.A[0]) == pytest.approx(float(top), rel=1e-4)


def test_random_versus_random_coupling_is_about_one(tiny):
    m, x, y = tiny
    S = ParamSubspace.attention(m)
    probe = S.random_directions(30, torch.Generator().manual_seed(7))
    res = coupling(m, S, probe, (x, y), n_random=20, seed=1)
    assert 0.6 < float(res.R.median()) < 1.6
    assert res.R_mean == pytest.approx(float(res.R.mean()))
    d = res.as_dict()
    assert d["method"] == "jvp" and len(d["A_random"]) == 20


def test_coupling_errors(multitask, tiny):
    task, model = multitask
    S = ParamSubspace.attention(model)
    x, y = task.probes(4)
    d = S.random_directions(1)
    with pytest.raises(SedLensError, match="name the op"):
        centroids(model, x, None)
    with pytest.raises(SedLensError, match="unknown readout"):
        centroids(model, x, y, readout="max_logit", task="add")
    with pytest.raises(SedLensError, match="unknown hook site"):
        centroids(model, x, y, site="blocks.9.hook_resid_pre", task="add")
    with pytest.raises(SedLensError, match="vocabulary"):
        centroids(model, x + 100, y, task="add")
    with pytest.raises(SedLensError, match="one weight per class"):
        centroids(model, x, y, readout=torch.ones(3), task="add")
    with pytest.raises(SedLensError, match="unknown method"):
        centroid_response(model, S, d, (x, y), method="exact", task="add")
    with pytest.raises(SedLensError, match="eps_rel must be positive"):
        centroid_response(model, S, d, (x, y), method="fd", eps_rel=0, task="add")
    with pytest.raises(SedLensError, match=r"shape \[n, 131072\]"):
        centroid_response(model, S, torch.zeros(2, 5), (x, y), task="add")
    with pytest.raises(SedLensError, match="n_random"):
        coupling(model, S, d, (x, y), n_random=0, task="add")
