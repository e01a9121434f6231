import pytest
import torch
import torch.nn.functional as F

from sed_lens.analysis.sed import RollingSED
from sed_lens.errors import SedLensError
from sed_lens.hooks.capture import GradientCapture, capture_offline, capture_task_gradients, gradient_batch, task_gradients
from sed_lens.models import build_model, op_losses, readout_logits
from sed_lens.subspace import ParamSubspace
from sed_lens.tasks import ModularArithmetic
from sed_lens.tracking import Run
from sed_lens.training import Callback, TrainConfig, Trainer


def separate_backward(model, S, tokens, labels, op):
    """The gradient of one op's loss by its own forward and backward pass."""
    model.zero_grad(set_to_none=True)
    op_losses(model, tokens, {op: labels[op]})[op].backward()
    g = S.grads()
    model.zero_grad(set_to_none=True)
    return g


def test_per_op_gradients_equal_separate_backward_passes_and_sum_to_the_aggregate(tiny_multitask):
    model = build_model("xu2026", tiny_multitask, seed=0)
    S = ParamSubspace.attention(model)
    tokens, labels = gradient_batch(tiny_multitask, 64, seed=1)
    grads = capture_task_gradients(model, tiny_multitask, S, (tokens, labels))
    assert set(grads) == {"add", "sub", "mul", "sq"}
    for op, g in grads.items():
        torch.testing.assert_close(g, separate_backward(model, S, tokens, labels, op), rtol=1e-5, atol=1e-7)
    model.zero_grad(set_to_none=True)
    sum(op_losses(model, tokens, labels).values()).backward()
    torch.testing.assert_close(sum(grads.values()), S.grads(), rtol=1e-5, atol=1e-7)
    model.zero_grad(set_to_none=True)
    task_gradients(model, S, tokens, labels)
    assert all(p.grad is None for p in model.parameters())  # the model's .grad is left alone


def test_per_op_gradients_on_a_non_preset_model(odd_model):
    S = ParamSubspace.attention(odd_model, layers=[0, 2], mats="QV")
    tokens = torch.randint(0, 12, (16, 3))
    labels = {"add": torch.randint(0, 11, (16,)), "sub": torch.randint(0, 11, (16,))}
    grads = task_gradients(odd_model, S, tokens, labels)
    for op in ("add", "sub"):
        odd_model.zero_grad(set_to_none=True)
        logits = readout_logits(odd_model, tokens)[:, (0 if op == "add" else 11):(11 if op == "add" else 22)]
        F.cross_entropy(logits, labels[op]).backward()
        torch.testing.assert_close(grads[op], S.grads(), rtol=1e-5, atol=1e-7)


class Recorder(Callback):
    def __init__(self, S):
        self.S, self.weights = S, []

    def on_train_start(self, t):
        self.weights.append(self.S.weights().clone())

    def on_after_step(self, t):
        if t.step % 5 == 0:
            self.weights.append(self.S.weights().clone())


def test_live_capture_equals_offline_recomputation(tiny_multitask):
    model = build_model("xu2026", tiny_multitask, seed=0)
    S = ParamSubspace.attention(model)
    batch = gradient_batch(tiny_multitask, 32)
    cap = GradientCapture(S, window=4, k=2, every=5, batch=batch)
    rec = Recorder(S)
    states = []

    class Keep(Callback):
        def on_train_start(self, t):
            states.append((0, {k: v.clone() for k, v in t.model.state_dict().items()}))

        def on_after_step(self, t):
            if t.step % 5 == 0:
                states.append((t.step, {k: v.clone() for k, v in t.model.state_dict().items()}))

    Trainer(model, tiny_multitask, TrainConfig(steps=30, eval_every=10, checkpoint_every=0), [cap, rec, Keep()],
            progress=False).fit()
    assert cap.seds["update"].n_pushed == 6 and cap.seds["gradient"].n_pushed == 7
    # update stream = consecutive weight differences; rebuild it independently
    upd = RollingSED(4, 2)
    for a, b in zip(rec.weights[:-1], rec.weights[1:], strict=True):
        upd.push(b - a)
    torch.testing.assert_close(cap.seds["update"].directions(), upd.directions())
    # offline capture from stored states gives the same streams
    fresh = build_model("xu2026", tiny_multitask, seed=9)
    S2 = ParamSubspace.attention(fresh)
    off = {name: RollingSED(4, 2) for name in cap.seds}
    for _, vecs in capture_offline(fresh, tiny_multitask, S2, states, batch):
        for name, v in vecs.items():
            off[name].push(v)
    for name in cap.seds:
        torch.testing.assert_close(off[name].directions(), cap.seds[name].directions(), rtol=1e-4, atol=1e-5)


def test_capture_logs_spectra_and_saves_bases(tmp_path, tiny_task):
    model = build_model("xu2026", tiny_task, seed=0)
    cap = GradientCapture(window=3, k=2, every=5, batch_size=32)
    with Run(tmp_path / "r", {}, wandb_mode="disabled") as run:
        res = Trainer(model, tiny_task, TrainConfig(steps=20, eval_every=10, checkpoint_every=0), [cap], run=run,
                      progress=False).fit()
    assert set(cap.seds) == {"update", "gradient"}  # single op: task_gradient/add is the gradient stream
    row = res.history[-1]
    for key in ("sed/update/sigma_1", "sed/update/sigma_3", "sed/gradient/gap_2", "sed/gradient/overlap",
                "sed/update/rank_deficient"):
        assert key in row
    saved = torch.load(tmp_path / "r" / "sed_bases.pt", weights_only=True)
    assert saved["subspace"][0]["name"] == "blocks.0.attn.W_Q" and saved["step"] == 20
    assert saved["bases"]["gradient"]["directions"].shape == (2, 131_072)


def test_capture_argument_errors():
    with pytest.raises(SedLensError, match="unknown SED source"):
        GradientCapture(sources=("updates",))
    with pytest.raises(SedLensError, match="window of at least k"):
        GradientCapture(window=2, k=3)
    with pytest.raises(SedLensError, match="snapshot interval"):
        GradientCapture(every=0)
    with pytest.raises(SedLensError, match="at least one pair"):
        gradient_batch(ModularArithmetic(p=5), 0)


def test_capture_task_gradients_needs_a_tokens_labels_pair(tiny_task):
    model = build_model("xu2026", tiny_task, seed=0)
    S = ParamSubspace.attention(model)
    tokens, labels = tiny_task.probes(8)
    with pytest.raises(SedLensError, match="batch must be a \\(tokens, labels\\) pair.*bare tensor") as e:
        capture_task_gradients(model, tiny_task, S, tokens)
    assert "\n" not in str(e.value)
    with pytest.raises(SedLensError, match="no entry for op add"):
        capture_task_gradients(model, tiny_task, S, (tokens, {"sub": labels["add"]}))
    by_dict = capture_task_gradients(model, tiny_task, S, (tokens, labels))
    by_tensor = capture_task_gradients(model, tiny_task, S, (tokens, labels["add"]))
    assert torch.equal(by_dict["add"], by_tensor["add"])
