"""sed_lens.analysis.streams: the stream vectors of one model state, checked against plain autograd, and the
live capture's vectors against the offline ones for the same weights."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sed_lens.analysis.streams import capture_offline, gradient_batch, stream_vectors
from sed_lens.hooks.capture import GradientCapture
from sed_lens.models import build_model, get_readout
from sed_lens.subspace import ParamSubspace
from sed_lens.training import TrainConfig, Trainer


def plain_gradient(model, S, tokens, labels, ops):
    """The subspace gradient of the summed mean cross-entropy of ``ops``, by one forward and ``loss.backward()``,
    read straight off the readout position and each op's block of output logits."""
    r = get_readout(model)
    model.zero_grad(set_to_none=True)
    logits = model(tokens)[:, r.position]
    loss = sum(F.cross_entropy(logits[:, r.ops.index(op) * r.n_classes:(r.ops.index(op) + 1) * r.n_classes],
                               labels[op]) for op in ops)
    loss.backward()
    g = S.flatten({n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in S.parameters_of(model).items()})
    model.zero_grad(set_to_none=True)
    return g


def test_stream_vectors_equal_plain_backward_passes(tiny_multitask):
    model = build_model("xu2026", tiny_multitask, seed=3)
    S = ParamSubspace.attention(model)
    tokens, labels = batch = gradient_batch(tiny_multitask, 48, seed=2)
    vecs = stream_vectors(model, tiny_multitask, S, batch)
    assert set(vecs) == {"gradient", *(f"task_gradient/{op}" for op in tiny_multitask.ops)}
    assert all(v.shape == (S.slices[-1].stop,) for v in vecs.values())
    for op in tiny_multitask.ops:
        torch.testing.assert_close(vecs[f"task_gradient/{op}"], plain_gradient(model, S, tokens, labels, [op]),
                                   rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(vecs["gradient"], plain_gradient(model, S, tokens, labels, tiny_multitask.ops),
                               rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())
    assert stream_vectors(model, tiny_multitask, S, batch, sources=("update",)) == {}
    only_tasks = stream_vectors(model, tiny_multitask, S, batch, sources=("task_gradient",))
    assert set(only_tasks) == {f"task_gradient/{op}" for op in tiny_multitask.ops}


def test_stream_vectors_single_op_on_a_part_of_the_attention(tiny_task):
    model = build_model("xu2026", tiny_task, seed=1)
    S = ParamSubspace.attention(model, heads=[1], mats="QK")
    tokens, labels = batch = gradient_batch(tiny_task, 32, seed=5, split="train")
    vecs = stream_vectors(model, tiny_task, S, batch)
    assert set(vecs) == {"gradient"}  # single op: the task gradient is the gradient, not duplicated
    torch.testing.assert_close(vecs["gradient"], plain_gradient(model, S, tokens, labels, ["add"]),
                               rtol=1e-5, atol=1e-7)
    alone = stream_vectors(model, tiny_task, S, batch, sources=("task_gradient",))
    assert set(alone) == {"task_gradient/add"} and torch.equal(alone["task_gradient/add"], vecs["gradient"])


@pytest.mark.parametrize("sources", [("update", "gradient", "task_gradient"), ("gradient",), ("update",)])
def test_live_capture_vectors_equal_offline_ones_for_the_same_weights(tiny_multitask, sources):
    model = build_model("xu2026", tiny_multitask, seed=0)
    batch = gradient_batch(tiny_multitask, 32, seed=4)
    live, states = [], []

    class Keeping(GradientCapture):
        def on_snapshot(self, trainer, vectors):
            live.append((trainer.step, {k: v.clone() for k, v in vectors.items()}))
            states.append((trainer.step, {k: v.clone() for k, v in trainer.model.state_dict().items()}))

    cap = Keeping(sources=sources, window=4, k=2, every=5, batch=batch)
    Trainer(model, tiny_multitask, TrainConfig(steps=20, eval_every=10, checkpoint_every=0), [cap],
            progress=False).fit()
    assert [s for s, _ in live] == [0, 5, 10, 15, 20]
    fresh = build_model("xu2026", tiny_multitask, seed=9)
    offline = list(capture_offline(fresh, tiny_multitask, ParamSubspace.attention(fresh), states, batch, sources))
    assert [s for s, _ in offline] == [s for s, _ in live]
    for (step, a), (_, b) in zip(live, offline, strict=True):
        assert set(a) == set(b), step
        for name in a:
            assert torch.equal(a[name], b[name]), (step, name)


def test_streams_do_not_import_training_or_hooks():
    code = ("import sys, sed_lens.analysis.streams; "
            "bad = [m for m in sys.modules if m.startswith(('sed_lens.training', 'sed_lens.hooks'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_old_names_are_reexported_from_hooks_capture():
    import sed_lens.analysis.streams as streams
    import sed_lens.hooks.capture as capture

    for name in ("gradient_batch", "task_gradients", "capture_task_gradients", "snapshot_vectors", "capture_offline"):
        assert getattr(capture, name) is getattr(streams, name)
        assert name in capture.__all__

