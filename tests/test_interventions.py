"""SubspaceProjection: each property checked against an independent (numpy, float64) computation."""

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from sed_lens.errors import SedLensError
from sed_lens.hooks.interventions import SubspaceProjection
from sed_lens.models import op_losses
from sed_lens.subspace import ParamSubspace
from sed_lens.tracking import Run
from sed_lens.training import TrainConfig, Trainer

HEADS = dict(layers=[1, 2], heads=[0, 2], mats="QKV")  # a subspace that leaves out whole and partial parameters


def fill_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def np_keep(V, x):
    """VᵀV x in float64 (the rows of V are orthonormal)."""
    V, x = np.asarray(V, dtype=np.float64), np.asarray(x, dtype=np.float64)
    return V.T @ (V @ x)


def in_span_residual(V, x):
    """‖x − VᵀV x‖ / ‖x‖ with the projector of an orthonormalised V (numpy QR, float64)."""
    q, _ = np.linalg.qr(np.asarray(V, dtype=np.float64).T)
    x = np.asarray(x, dtype=np.float64)
    return np.linalg.norm(x - q @ (q.T @ x)) / np.linalg.norm(x)


def orth_residual(V, x):
    """‖VᵀV x‖ / ‖x‖ (0 when x is orthogonal to the span of V)."""
    q, _ = np.linalg.qr(np.asarray(V, dtype=np.float64).T)
    x = np.asarray(x, dtype=np.float64)
    return np.linalg.norm(q.T @ x) / np.linalg.norm(x)


def min_cos_of_spans(a, b):
    """Smallest cosine of the principal angles between the row spaces of a and b (numpy)."""
    qa, _ = np.linalg.qr(np.asarray(a, dtype=np.float64).T)
    qb, _ = np.linalg.qr(np.asarray(b, dtype=np.float64).T)
    return np.linalg.svd(qa.T @ qb, compute_uv=False).min()


def step_and_see(model, mode, basis, selection=None, optimizer="sgd", seed=0, apply_to="gradient",
                 dtype=torch.float32):
    """One optimizer step of a copy of ``model`` with the projection attached; returns (subspace, gradients the
    optimizer used, model copy, optimizer, weights before)."""
    m = copy.deepcopy(model).to(dtype)
    S = ParamSubspace.attention(m, **(selection or {}))
    fill_grads(m, seed)
    opt = (torch.optim.SGD(m.parameters(), lr=0.1) if optimizer == "sgd"
           else torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.5))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    seen = {}
    proj = SubspaceProjection(S, mode=mode, basis=basis, warmup=0, apply_to=apply_to)
    with proj.attach(m, opt):
        # Registered after the projection's pre-hook, so it sees what the update will use.
        h = opt.register_step_pre_hook(lambda *_: seen.update(grads_of(m)))
        opt.step()
        h.remove()
    return S, seen, m, opt, before


@pytest.mark.parametrize("selection", [None, HEADS], ids=["all-attention", "some-heads"])
def test_gradient_keep_lies_in_the_span_remove_is_orthogonal_and_they_sum_to_the_control(odd_model, selection):
    S0 = ParamSubspace.attention(odd_model, **(selection or {}))
    V = S0.random_basis(3, torch.Generator().manual_seed(7))
    ref = copy.deepcopy(odd_model)
    fill_grads(ref, 0)
    raw = grads_of(ref)
    g = S0.flatten(raw).numpy()
    out = {}
    for mode in ("keep", "remove", "none"):
        S, seen, *_ = step_and_see(odd_model, mode, V, selection)
        out[mode] = S.flatten(seen).numpy()
        for name in raw:  # everything outside the subspace reaches the optimizer untouched
            if name not in S.names:
                assert torch.equal(seen[name], raw[name]), (mode, name)
        for sl in S.slices:
            if sl.heads:
                others = [h for h in range(raw[sl.name].shape[0]) if h not in sl.heads]
                assert torch.equal(seen[sl.name][others], raw[sl.name][others]), (mode, sl.name)
    keep = np_keep(V.numpy(), g)
    scale = np.linalg.norm(g)
    np.testing.assert_allclose(out["keep"], keep, atol=1e-6 * scale)
    np.testing.assert_allclose(out["remove"], g - keep, atol=1e-6 * scale)
    assert in_span_residual(V.numpy(), out["keep"]) <= 1e-5
    assert orth_residual(V.numpy(), out["remove"]) <= 1e-5
    np.testing.assert_allclose(out["keep"] + out["remove"], out["none"], atol=1e-6 * scale)
    np.testing.assert_array_equal(out["none"], g)


def test_gradient_method_adam_moments_see_only_the_projected_gradient(odd_model):
    S0 = ParamSubspace.attention(odd_model)
    V = S0.random_basis(3, torch.Generator().manual_seed(1))
    S, _, m, opt, before = step_and_see(odd_model, "keep", V, optimizer="adamw")
    named = dict(m.named_parameters())
    exp_avg = S.flatten({n: opt.state[named[n]]["exp_avg"] for n in S.names}).numpy()
    assert in_span_residual(V.numpy(), exp_avg) <= 1e-5
    # Decoupled weight decay and Adam's per-coordinate scaling still act: the applied update is not in the span.
    delta = (S.weights() - S.flatten(before)).numpy()
    assert in_span_residual(V.numpy(), delta) > 0.5


@pytest.mark.parametrize("mode", ["keep", "remove"])
def test_update_method_projects_the_applied_update_and_leaves_the_optimizer_state_alone(odd_model, mode):
    S0 = ParamSubspace.attention(odd_model, **HEADS)
    V = S0.random_basis(2, torch.Generator().manual_seed(3))
    # float64 weights: the applied update is read back as θ_new − θ_old, which float32 would round at ~1e-4.
    kw = dict(optimizer="adamw", apply_to="update", dtype=torch.float64)
    S, _, m, opt, before = step_and_see(odd_model, mode, V, HEADS, **kw)
    Sc, _, mc, optc, _ = step_and_see(odd_model, "none", V, HEADS, **kw)
    delta = (S.weights() - S.flatten(before)).numpy()
    delta_control = (Sc.weights() - Sc.flatten(before)).numpy()
    keep = np_keep(V.numpy(), delta_control)
    expected = keep if mode == "keep" else delta_control - keep
    np.testing.assert_allclose(delta, expected, atol=1e-7 * np.linalg.norm(delta_control))
    if mode == "keep":
        assert in_span_residual(V.numpy(), delta) <= 1e-5
    else:
        assert orth_residual(V.numpy(), delta) <= 1e-5
    w, wc = dict(m.named_parameters()), dict(mc.named_parameters())
    for name in w:
        if name not in S.names:
            assert torch.equal(w[name], wc[name]), name  # outside the subspace: the normal step
        assert torch.equal(opt.state[w[name]]["exp_avg"], optc.state[wc[name]]["exp_avg"]), name
    for sl in S.slices:  # unselected heads of a selected parameter: the normal step as well
        others = [h for h in range(w[sl.name].shape[0]) if h not in sl.heads]
        assert torch.equal(w[sl.name][others], wc[sl.name][others])


def structured_stream(S, n, seed=0):
    """Vectors in S with a decaying spectrum (8 directions + noise), like gradients during training."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(S.dim, 8, generator=g))[0].T
    coef = torch.randn(n, 8, generator=g) * torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.12, 0.06])
    return coef @ basis + 0.01 * torch.randn(n, S.dim, generator=g)


@pytest.mark.parametrize("mode", ["keep", "remove", "none"])
@pytest.mark.parametrize("apply_to", ["gradient", "update"])
def test_sed_basis_is_the_svd_of_the_window_of_applied_vectors(odd_model, mode, apply_to):
    m = odd_model
    S = ParamSubspace.attention(m)
    W, k, n = 6, 2, 20
    stream = structured_stream(S, n)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)  # the update is −g: every vector reaches the window
    proj = SubspaceProjection(S, k=k, mode=mode, basis="sed", apply_to=apply_to, window=W)
    applied, bases = [], []
    with proj.attach(m, opt):
        for t in range(n):
            fill_grads(m, 100 + t)
            S.set_grads(stream[t])
            before = S.weights()
            opt.step()
            applied.append((before - S.weights()) if apply_to == "update" else S.grads())
            bases.append(proj.last_basis)
    assert proj.steps == n and [b is None for b in bases] == [t < W or mode == "none" for t in range(n)]
    x = torch.stack(applied).double().numpy()
    for t in range(W, n):
        window = x[t - W:t]  # the W vectors applied before step t
        vt = np.linalg.svd(window, full_matrices=False)[2][:k]
        if mode == "none":
            continue
        assert min_cos_of_spans(bases[t].numpy(), vt) >= 1 - 1e-5, t
        res = in_span_residual(vt, x[t]) if mode == "keep" else orth_residual(vt, x[t])
        assert res <= 1e-4, (t, res)
    # The window holds the last W applied vectors, whatever the mode.
    final_vt = np.linalg.svd(x[n - W:], full_matrices=False)[2][:k]
    assert min_cos_of_spans(proj.window_sed.directions().numpy(), final_vt) >= 1 - 1e-5


def test_random_basis_is_orthonormal_redrawn_every_step_and_seeded(odd_model):
    def run(seed):
        m = copy.deepcopy(odd_model)
        S = ParamSubspace.attention(m)
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        proj = SubspaceProjection(S, k=3, mode="keep", basis="random", warmup=0, seed=seed)
        bases, seen = [], []
        with proj.attach(m, opt):
            for t in range(4):
                fill_grads(m, t)
                opt.step()
                bases.append(proj.last_basis.clone())
                seen.append(S.grads().numpy())
        return bases, seen

    bases, seen = run(0)
    for V, g in zip(bases, seen, strict=True):
        np.testing.assert_allclose(V.double().numpy() @ V.double().numpy().T, np.eye(3), atol=1e-5)
        assert in_span_residual(V.numpy(), g) <= 1e-5
    for a, b in zip(bases, bases[1:], strict=False):
        assert min_cos_of_spans(a.numpy(), b.numpy()) < 0.5  # a new subspace every step
    again, _ = run(0)
    other, _ = run(1)
    assert all(torch.equal(a, b) for a, b in zip(bases, again, strict=True))
    assert not torch.equal(bases[0], other[0])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_plain_user_loop_with_a_real_loss(odd_model, tiny_task, optimizer):
    m = odd_model.double()  # the update is read back as θ_new − θ_old: float64 keeps the rounding out of the check
    S = ParamSubspace.attention(m, layers=[0])
    V = S.random_basis(2, torch.Generator().manual_seed(5))
    opt = (torch.optim.SGD(m.parameters(), lr=0.05) if optimizer == "sgd"
           else torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0))
    w0 = S.weights()
    rs = np.random.RandomState(0)
    proj = SubspaceProjection(S, mode="keep", basis=V, warmup=0)
    with proj.attach(m, opt):
        for _ in range(5):
            x, y = tiny_task.batch(16, rs)
            loss = sum(op_losses(m, x, y).values())
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
    assert proj.steps == 5 and proj.describe()["projected_steps"] == 5
    if optimizer == "sgd":  # the update is −lr · (projected gradient)
        assert in_span_residual(V.numpy(), (S.weights() - w0).numpy()) <= 1e-5
    else:  # Adam's first moment is a sum of projected gradients
        named = dict(m.named_parameters())
        assert in_span_residual(V.numpy(), S.flatten({n: opt.state[named[n]]["exp_avg"] for n in S.names}).numpy()) <= 1e-5


def test_no_hook_remains_after_the_block_also_when_it_raises(odd_model):
    m = odd_model
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    proj = SubspaceProjection(mode="remove", basis="random", warmup=0)
    with proj.attach(m, opt):
        assert proj.attached and len(opt._optimizer_step_pre_hooks) == 1 and len(opt._optimizer_step_post_hooks) == 1
        fill_grads(m, 0)
        opt.step()
    assert not proj.attached and not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    with pytest.raises(RuntimeError, match="user error"):
        with proj.attach(m, opt):
            raise RuntimeError("user error")
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    with pytest.raises(SedLensError, match="closure"):  # an error raised by the hook itself
        with proj.attach(m, opt):
            opt.step(lambda: 0.0)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    # Detached: a step is a plain SGD step and the projection does not advance.
    fill_grads(m, 1)
    g = grads_of(m)
    w = {n: p.detach().clone() for n, p in m.named_parameters()}
    steps = proj.steps
    opt.step()
    assert proj.steps == steps == 1
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), w[n] - 0.1 * g[n], rtol=0, atol=1e-6)


def nan_to_none(rows):
    return [{k: None if isinstance(v, float) and v != v else v for k, v in r.items()} for r in rows]


def quick_config(steps, checkpoint_every=0):
    return TrainConfig(steps=steps, eval_every=4, batch_size=32, checkpoint_every=checkpoint_every, stop_patience=0)


def test_trainer_callback_logs_per_eval_and_writes_a_summary(odd_model, tiny_task, tmp_path):
    proj = SubspaceProjection(k=2, mode="keep", basis="sed", window=4)
    with Run(tmp_path / "r", {}, wandb_mode="disabled") as run:
        res = Trainer(odd_model, tiny_task, quick_config(12), [proj], run=run, progress=False).fit()
    assert proj.subspace is not None and proj.subspace.dim == ParamSubspace.attention(odd_model).dim
    rows = {r["step"]: r for r in res.history}
    assert [rows[s]["intervention/active"] for s in (0, 4, 8, 12)] == [0, 0, 1, 1]
    assert "intervention/kept_fraction" not in rows[4]  # warm-up steps 1..4 are not projected
    assert all(0 < rows[s]["intervention/kept_fraction"] <= 1 + 1e-6 for s in (8, 12))
    assert rows[12]["intervention/projected_steps"] == 8
    assert rows[12]["intervention/sigma_1"] >= rows[12]["intervention/sigma_2"] > 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["intervention"]["mode"] == "keep" and summary["intervention"]["projected_steps"] == 8


@pytest.mark.parametrize(("basis", "apply_to"), [("sed", "gradient"), ("random", "update")])
def test_resume_from_a_checkpoint_is_bit_identical(odd_model, tiny_task, tmp_path, basis, apply_to):
    def proj():
        return SubspaceProjection(k=2, mode="keep", basis=basis, apply_to=apply_to, window=3, seed=4)

    full = Trainer(copy.deepcopy(odd_model), tiny_task, quick_config(16), [proj()], progress=False).fit()
    with Run(tmp_path / "a", {}, wandb_mode="disabled") as run:
        Trainer(copy.deepcopy(odd_model), tiny_task, quick_config(8, checkpoint_every=8), [proj()], run=run,
                progress=False).fit()
    resumed = proj()
    with Run(tmp_path / "a", {}, wandb_mode="disabled", resume=True) as run:
        res = Trainer(copy.deepcopy(odd_model), tiny_task, quick_config(16, checkpoint_every=8), [resumed], run=run,
                      progress=False).fit(resume_from=run.dir / "checkpoints" / "last.pt")
    assert nan_to_none(res.history) == nan_to_none(full.history) and resumed.steps == 16
    other = SubspaceProjection(k=2, mode="remove", basis=basis, apply_to=apply_to, window=3, seed=4)
    with pytest.raises(SedLensError, match="differ"):
        other.load_state_dict(resumed.state_dict())


@pytest.mark.parametrize(("basis", "apply_to"), [("sed", "gradient"), ("random", "update")])
def test_a_final_checkpoint_keeps_no_window_and_refuses_to_continue(odd_model, tiny_task, tmp_path, basis, apply_to):
    from sed_lens import serialization

    def proj():
        return SubspaceProjection(k=2, mode="keep", basis=basis, apply_to=apply_to, window=3, seed=4)

    done = proj()
    with Run(tmp_path / "a", {}, wandb_mode="disabled") as run:
        first = Trainer(copy.deepcopy(odd_model), tiny_task, quick_config(8, checkpoint_every=4), [done], run=run,
                        progress=False).fit(final=True)
        ckpt = run.dir / "checkpoints" / "last.pt"
    state = serialization.load(ckpt)
    assert state["final"] is True and state["step"] == 8 and state["callbacks"][0]["window"] is None
    assert state["callbacks"][0]["steps"] == 8 and "model" in state and "optimizer" in state
    # Reading it back without training (what a finished grid cell met again does) works and changes nothing.
    again = proj()
    with Run(tmp_path / "a", {}, wandb_mode="disabled", resume=True) as run:
        res = Trainer(copy.deepcopy(odd_model), tiny_task, quick_config(8, checkpoint_every=4), [again], run=run,
                      progress=False).fit(resume_from=ckpt, final=True)
    assert nan_to_none(res.history) == nan_to_none(first.history) and again.describe() == done.describe()
    assert serialization.load(ckpt)["callbacks"][0]["window"] is None
    # Training on from it is one clear error, before any optimizer step; the checkpoint stays as it was.
    saved = ckpt.read_bytes()
    with Run(tmp_path / "a", {}, wandb_mode="disabled", resume=True) as run:
        longer = Trainer(copy.deepcopy(odd_model), tiny_task, quick_config(16, checkpoint_every=4), [proj()], run=run,
                         progress=False)
        with pytest.raises(SedLensError, match="checkpoint of a finished run, which keeps no SED window") as err:
            longer.fit(resume_from=ckpt)
    assert "Delete the run directory and train the run again" in str(err.value) and longer.step == 9
    assert all(torch.equal(v, state["model"][k]) for k, v in longer.model.state_dict().items())  # no step taken
    assert ckpt.read_bytes() == saved


def test_project_works_on_a_bare_vector_stream():
    proj = SubspaceProjection(k=1, mode="remove", basis="sed", window=2)
    e1, e2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    assert proj.project(2 * e1) is not None and proj.project(e1 + 0.1 * e2) is not None  # warm-up
    out = proj.project(torch.tensor([1.0, 1.0, 1.0]))
    v = proj.last_basis[0].numpy()
    win = np.array([[2, 0, 0], [1, 0.1, 0]], dtype=np.float64)
    vt = np.linalg.svd(win)[2][0]
    assert abs(abs(v @ vt) - 1) < 1e-6
    np.testing.assert_allclose(out.numpy(), np.ones(3) - vt * (vt @ np.ones(3)), atol=1e-6)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(mode="keepish"), "unknown projection mode"),
    (dict(basis="pca"), "unknown basis"),
    (dict(apply_to="weights"), "unknown apply_to"),
    (dict(k=0), "k must be a positive integer"),
    (dict(k=2.5), "k must be a positive integer"),
    (dict(k=5, window=4), "window must hold at least k=5"),
    (dict(window=0), "window must be a positive integer"),
    (dict(warmup=-1), "warmup must be a non-negative"),
    (dict(warmup=0), "warmup ≥ 1"),
    (dict(basis=torch.ones(6)), "shape \\[k, P\\]"),
    (dict(basis=torch.ones(2, 6)), "orthonormal"),
    (dict(basis=torch.eye(2, 6), k=3), "has 2 rows but k=3"),
    (dict(basis=torch.full((1, 2), float("nan"))), "NaN"),
])
def test_bad_arguments_raise_one_clear_sentence(kwargs, match):
    with pytest.raises(SedLensError, match=match) as e:
        SubspaceProjection(**kwargs)
    assert isinstance(e.value, ValueError) and str(e.value).endswith(".") and "\n" not in str(e.value)


def test_errors_that_need_a_model(odd_model):
    S = ParamSubspace.attention(odd_model, layers=[0], heads=[0], mats="Q")  # dim 24 * 8 = 192
    with pytest.raises(SedLensError, match="exceeds the subspace's dimension 192"):
        SubspaceProjection(S, k=200, window=200)
    with pytest.raises(SedLensError, match="shape must be \\[k, 192\\]"):
        SubspaceProjection(S, basis=torch.eye(3, 100))
    proj = SubspaceProjection(S)
    with pytest.raises(SedLensError, match="another model"):
        with proj.attach(copy.deepcopy(odd_model), torch.optim.SGD(odd_model.parameters(), lr=0.1)):
            pass
    with pytest.raises(SedLensError, match="does not update blocks.0.attn.W_Q"):
        with proj.attach(odd_model, torch.optim.SGD(odd_model.blocks[1].parameters(), lr=0.1)):
            pass
    with pytest.raises(SedLensError, match="torch.optim.Optimizer"):
        with proj.attach(odd_model, "adam"):
            pass
    opt = torch.optim.SGD(odd_model.parameters(), lr=0.1)
    with proj.attach(odd_model, opt):
        with pytest.raises(SedLensError, match="already attached"):
            with proj.attach(odd_model, opt):
                pass
    with pytest.raises(SedLensError, match="dimension 192, got 7"):
        proj.project(torch.ones(7))
    with pytest.raises(SedLensError, match="flat \\[P\\] vector"):
        proj.project(torch.ones(2, 192))
    with pytest.raises(SedLensError, match="not bound to a model"):
        SubspaceProjection().before_step()
    with pytest.raises(SedLensError, match="not bound to a model"):  # a random basis needs the subspace's dimension
        SubspaceProjection(basis="random", warmup=0).project(torch.ones(5))


def test_the_docs_example_runs(capsys):
    text = (Path(__file__).parents[1] / "docs" / "interventions.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    for block in blocks:
        compile(block, "docs/interventions.md", "exec")
    assert "range(100)" in blocks[0]
    exec(blocks[0].replace("range(100)", "range(30)"), {})  # the plain AdamW loop, shortened
    out = capsys.readouterr().out
    assert "'steps': 30, 'projected_steps': 10" in out
