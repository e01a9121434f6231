import json
import math
import sys

import numpy as np
import pytest
import torch

from sed_lens.errors import SedLensError
from sed_lens.models import build_model, task_logits
from sed_lens.tasks import ModularArithmetic
from sed_lens.tracking import Run, read_jsonl
from sed_lens.training import Callback, TrainConfig, Trainer, evaluate


def quick(steps=60, **kw):
    return TrainConfig(steps=steps, eval_every=20, checkpoint_every=0, **kw)


def test_trainer_lowers_the_loss(tiny_task):
    model = build_model("xu2026", tiny_task, seed=0)
    res = Trainer(model, tiny_task, quick(150, weight_decay=0.1), progress=False).fit()
    first, last = res.history[0], res.history[-1]
    assert last["train/loss"] < 0.5 * first["train/loss"]
    assert res.steps == 150 and [r["step"] for r in res.history] == [0, 20, 40, 60, 80, 100, 120, 140]


def test_evaluate_matches_a_manual_computation(tiny_multitask):
    model = build_model("xu2026", tiny_multitask, seed=1)
    out = evaluate(model, tiny_multitask)
    with torch.no_grad():
        x, y = tiny_multitask.test
        logits = model(x)[:, 0, 22:33]  # mul head
        acc = (logits.argmax(-1) == y["mul"]).float().mean().item()
        loss = torch.nn.functional.cross_entropy(logits, y["mul"]).item()
    assert out["test/acc/mul"] == pytest.approx(acc) and out["test/loss/mul"] == pytest.approx(loss, rel=1e-5)
    assert out["test/acc"] == pytest.approx(np.mean([out[f"test/acc/{o}"] for o in tiny_multitask.ops]))


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_train_start(self, t):
        self.events.append(("start", t.step))

    def on_before_step(self, t):
        self.events.append(("before", t.step))

    def on_after_step(self, t):
        self.events.append(("after", t.step))

    def on_eval(self, t, metrics):
        self.events.append(("eval", t.step))
        metrics["custom"] = 1.0

    def on_train_end(self, t):
        self.events.append(("end", t.step))


def test_callbacks_fire_in_documented_order(tiny_task):
    rec = Recorder()
    model = build_model("xu2026", tiny_task, seed=0)
    res = Trainer(model, tiny_task, TrainConfig(steps=4, eval_every=2, checkpoint_every=0), [rec], progress=False).fit()
    assert rec.events == [("start", 0), ("eval", 0), ("before", 1), ("after", 1), ("before", 2), ("after", 2),
                          ("eval", 2), ("before", 3), ("after", 3), ("before", 4), ("after", 4), ("eval", 4),
                          ("end", 4)]
    assert all(r["custom"] == 1.0 for r in res.history)


class FreezeAttention(Callback):
    """Zero the attention weights' gradients and check the clip has already happened."""

    def __init__(self):
        self.norms = []

    def on_before_step(self, t):
        grads = [p.grad for p in t.model.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        t.model.blocks[0].attn.W_Q.grad.zero_()


def test_callbacks_see_clipped_gradients_and_can_edit_them(tiny_task):
    model = build_model("xu2026", tiny_task, seed=0)
    before_q = model.blocks[0].attn.W_Q.detach().clone()
    before_k = model.blocks[0].attn.W_K.detach().clone()
    cb = FreezeAttention()
    cfg = TrainConfig(steps=5, eval_every=5, checkpoint_every=0, grad_clip=0.01, weight_decay=0.0)
    Trainer(model, tiny_task, cfg, [cb], progress=False).fit()
    assert max(cb.norms) <= 0.01 * (1 + 1e-4)
    assert torch.equal(model.blocks[0].attn.W_Q, before_q)  # zero grad, no weight decay: unchanged
    assert not torch.equal(model.blocks[0].attn.W_K, before_k)


class ScriptedAccuracy(Callback):
    """Replace the measured test accuracy by a script, to test the stop rule exactly."""

    def __init__(self, accs):
        self.accs = list(accs)

    def on_eval(self, t, metrics):
        metrics["test/acc/add"] = self.accs.pop(0)


def test_stop_rule_needs_consecutive_evals_and_grok_step_is_first_eval_above_half(tiny_task):
    model = build_model("xu2026", tiny_task, seed=0)
    script = ScriptedAccuracy([0.0, 0.2, 0.6, 0.99, 0.99, 0.4, 0.99, 0.99, 0.99, 0.1, 0.1])
    cfg = TrainConfig(steps=400, eval_every=10, checkpoint_every=0, stop_patience=3)
    res = Trainer(model, tiny_task, cfg, [script], progress=False).fit()
    assert res.stopped_early and res.steps == 80  # 3 consecutive evals >= 0.98 end at step 80, not 40
    assert res.grok_step["add"] == 20
    assert len(script.accs) == 2


def test_checkpoint_resume_is_bit_identical(tmp_path, tiny_task):
    cfg = TrainConfig(steps=40, eval_every=10, checkpoint_every=20)
    full = Trainer(build_model("xu2026", tiny_task, seed=0), tiny_task, cfg, progress=False).fit()
    with Run(tmp_path / "a", {}, wandb_mode="disabled") as run:
        t = Trainer(build_model("xu2026", tiny_task, seed=0), tiny_task, TrainConfig(steps=20, eval_every=10,
                    checkpoint_every=20), run=run, progress=False)
        t.fit()
    with Run(tmp_path / "a", {}, wandb_mode="disabled", resume=True) as run:
        t2 = Trainer(build_model("xu2026", tiny_task, seed=5), tiny_task, cfg, run=run, progress=False)
        res = t2.fit(resume_from=run.dir / "checkpoints" / "last.pt")
    assert res.final == full.final
    rows = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 10, 20, 30, 40]


def test_corrupted_checkpoint_gives_a_clear_error(tmp_path, tiny_task):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    t = Trainer(build_model("xu2026", tiny_task), tiny_task, quick(), progress=False)
    with pytest.raises(SedLensError, match="truncated or corrupted"):
        t.load_checkpoint(bad)
    with pytest.raises(SedLensError, match="does not exist"):
        t.load_checkpoint(tmp_path / "missing.pt")


class Poison(Callback):
    def on_before_step(self, t):
        if t.step == 3:
            next(iter(t.model.parameters())).data.fill_(math.nan)


def test_nan_stops_training_with_a_clear_message(tiny_task):
    t = Trainer(build_model("xu2026", tiny_task), tiny_task, quick(10), [Poison()], progress=False)
    with pytest.raises(SedLensError, match="diverged at step 4"):
        t.fit()


@pytest.mark.parametrize("kw,match", [(dict(steps=-1), "steps"), (dict(batch_size=0), "batch size"),
                                      (dict(lr=0), "learning rate"), (dict(eval_every=0), "eval-every"),
                                      (dict(beta2=1.0), "betas"), (dict(stop_acc=1.5), "stop accuracy"),
                                      (dict(grad_clip=-1), "grad clip")])
def test_bad_train_config(kw, match, tiny_task):
    with pytest.raises(SedLensError, match=match):
        Trainer(build_model("xu2026", tiny_task), tiny_task, TrainConfig(**kw))


def test_trainer_rejects_a_model_without_the_tasks_heads(tiny_task, tiny_multitask):
    with pytest.raises(SedLensError, match="no head for op"):
        Trainer(build_model("xu2026", ModularArithmetic(p=11, ops=("add", "sub"))), tiny_multitask)


def test_trainer_rejects_a_model_built_for_another_modulus():
    model = build_model("xu2026", ModularArithmetic(p=29, ops=("add",)))
    with pytest.raises(SedLensError, match="predicts 29 classes per op but the task has p=23") as e:
        Trainer(model, ModularArithmetic(p=23, ops=("add",)), progress=False)
    assert "\n" not in str(e.value)


def test_reruns_are_bit_identical(tiny_multitask):
    cfg = TrainConfig(steps=30, eval_every=10, checkpoint_every=0)
    a = Trainer(build_model("xu2026", tiny_multitask, seed=3), tiny_multitask, cfg, progress=False).fit()
    b = Trainer(build_model("xu2026", tiny_multitask, seed=3), tiny_multitask, cfg, progress=False).fit()
    assert a.history == b.history



def test_stop_at_grok_stops_at_the_first_eval_where_every_op_has_grokked():
    task = ModularArithmetic(11, ("add",), 0.8, 0)  # a larger train split: test accuracy rises within 100 steps
    cfg = TrainConfig(steps=100, eval_every=10, checkpoint_every=0, stop_patience=0, grok_acc=0.15, batch_size=64,
                      lr=3e-3, weight_decay=0.1)
    full = Trainer(build_model("xu2026", task, seed=0, init="tl"), task, cfg, progress=False).fit()
    # Independently: the first logged eval at which every op's test accuracy reached grok_acc.
    first = next((r["step"] for r in full.history if all(r[f"test/acc/{op}"] >= cfg.grok_acc for op in task.ops)), None)
    assert first is not None and 0 < first < cfg.steps, "the check needs a run that groks before its last step"
    cfg.stop_at_grok = True
    res = Trainer(build_model("xu2026", task, seed=0, init="tl"), task, cfg, progress=False).fit()
    assert res.stopped_early and res.steps == first and res.grok_step == {"add": first}
    assert res.history == full.history[: len(res.history)]


def test_progress_outside_a_terminal_is_plain_lines_with_accuracies(tiny_task, capsys):
    # 80 evals for 20 lines (a small batch: what is tested is the lines, not the training)
    cfg = TrainConfig(steps=400, eval_every=5, checkpoint_every=0, stop_patience=2, stop_acc=1.0, batch_size=16)
    Trainer(build_model("xu2026", tiny_task), tiny_task, cfg, progress=True).fit()
    err = capsys.readouterr().err  # pytest's capture is not a terminal
    lines = err.strip().splitlines()
    assert "\r" not in err and 1 <= len(lines) <= 21
    assert lines[0].startswith("train (stops early at test acc ≥ 1): step 20/400 | loss ")
    assert all("train acc" in line and "test acc" in line for line in lines)


def test_post_grok_steps_continue_the_same_trajectory_past_the_stop_rule(tiny_task):
    accs = [0.0, 0.2, 0.99, 0.99, 0.99] + [0.99] * 10
    cfg = TrainConfig(steps=400, eval_every=10, checkpoint_every=0, stop_patience=3)
    short = Trainer(build_model("xu2026", tiny_task, seed=0), tiny_task, cfg, [ScriptedAccuracy(list(accs))],
                    progress=False).fit()
    cfg_long = TrainConfig(steps=400, eval_every=10, checkpoint_every=0, stop_patience=3, post_grok_steps=50)
    long = Trainer(build_model("xu2026", tiny_task, seed=0), tiny_task, cfg_long, [ScriptedAccuracy(list(accs))],
                   progress=False).fit()
    # The stop rule fires at step 40 (3 evals >= 0.98 since step 20); the long run goes on to 20 + 50 = 70.
    assert (short.steps, short.stop_step, short.cross_step) == (40, 40, 20)
    assert (long.steps, long.stop_step, long.cross_step) == (70, 40, 20) and long.stopped_early
    # Bitwise the same trajectory up to the stop step.
    assert [r["loss"] for r in long.history[:len(short.history)]] == [r["loss"] for r in short.history]
    assert long.summary()["stop_step"] == 40


def test_progress_is_plain_lines_even_after_something_imported_ipykernel(tiny_task, capsys, monkeypatch):
    # A notebook test (nbclient) imports ipykernel into the test process; only a running kernel means a notebook.
    import types
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    fake_ipython = types.ModuleType("IPython")
    fake_ipython.get_ipython = lambda: None
    monkeypatch.setitem(sys.modules, "IPython", fake_ipython)
    cfg = TrainConfig(steps=40, eval_every=5, checkpoint_every=0)
    Trainer(build_model("xu2026", tiny_task), tiny_task, cfg, progress=True).fit()
    err = capsys.readouterr().err
    assert "\r" not in err and err.startswith("train") and ": step " in err


def test_a_compiled_training_step_is_bit_identical_across_reruns_and_resumes(tmp_path, tiny_multitask):
    """TrainConfig.compile: torch.compile of the step's forward and backward. Reruns and a resume in that mode are
    bit-identical; the trajectory matches the eager one to rounding (not bit for bit: fused kernels round
    differently); the config of an eager run is written as before the option existed."""
    cfg = TrainConfig(steps=20, eval_every=5, checkpoint_every=10, compile=True)
    eager = Trainer(build_model("xu2026", tiny_multitask, seed=3), tiny_multitask,
                    TrainConfig(steps=20, eval_every=5, checkpoint_every=0), progress=False).fit()
    a = Trainer(build_model("xu2026", tiny_multitask, seed=3), tiny_multitask, cfg, progress=False).fit()
    with Run(tmp_path / "r", {}, wandb_mode="disabled") as run:
        Trainer(build_model("xu2026", tiny_multitask, seed=3), tiny_multitask,
                TrainConfig(steps=10, eval_every=5, checkpoint_every=10, compile=True), run=run, progress=False).fit()
    with Run(tmp_path / "r", {}, wandb_mode="disabled", resume=True) as run:
        b = Trainer(build_model("xu2026", tiny_multitask, seed=9), tiny_multitask, cfg, run=run,
                    progress=False).fit(resume_from=run.dir / "checkpoints" / "last.pt")
    assert json.dumps(a.history) == json.dumps(b.history)  # (the loss before step 1 is NaN, never == itself)
    for ra, re in zip(a.history, eager.history, strict=True):
        assert ra["train/loss"] == pytest.approx(re["train/loss"], rel=1e-3)
    assert "compile" not in TrainConfig().to_dict() and cfg.to_dict()["compile"] is True


def test_compile_without_a_cpp_compiler_is_one_clear_error(tiny_task, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SedLensError, match="needs a C\\+\\+ compiler"):
        Trainer(build_model("xu2026", tiny_task), tiny_task, TrainConfig(compile=True), progress=False)


def test_evaluation_records_no_autograd_graph_and_gives_the_numbers_of_a_graph_recording_forward(tiny_multitask):
    model = build_model("xu2026", tiny_multitask, seed=2)
    seen = []
    real = type(tiny_multitask).evaluate

    def spy(self, m, readout):
        seen.append(torch.is_grad_enabled())
        return real(self, m, readout)

    recorded = real(tiny_multitask, model, lambda t: task_logits(model.eval(), t))  # grad enabled: a graph
    model.train()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(tiny_multitask), "evaluate", spy)
        out = evaluate(model, tiny_multitask)
    assert seen == [False] and out == recorded
