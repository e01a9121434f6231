"""The second task family: the Task protocol, the induction task, its head scores, the phase change, the
attention-only preset, and training + SED capture + coupling on it."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from sed_lens.analysis.centroids import centroids
from sed_lens.analysis.coupling import centroid_response, coupling
from sed_lens.analysis.streams import gradient_batch, stream_vectors
from sed_lens.configs import SEQUENCE_PRESETS, SequencePreset, TrainConfig
from sed_lens.errors import SedLensError
from sed_lens.hooks.capture import GradientCapture
from sed_lens.induction import (
    InductionTask,
    induction_score,
    occurrences,
    phase_change_bounds,
    phase_change_step,
    previous_token_score,
    repeat_induction_score,
)
from sed_lens.models import (
    build_model,
    build_sequence_model,
    get_readout,
    model_from_spec,
    model_spec,
    op_losses,
    task_logits,
)
from sed_lens.subspace import ParamSubspace
from sed_lens.task import SequenceTask, Task, cross_entropy
from sed_lens.tasks import ModularArithmetic
from sed_lens.training import Trainer, evaluate

TINY = SequencePreset("tiny", 2, 16, 2, 8, True, "a tiny 2-layer attention-only model for tests")


@pytest.fixture(scope="module")
def small():
    task = InductionTask(vocab=12, half_len=4, seed=0, n_eval=32)
    model = build_sequence_model(TINY, task, seed=1)
    return task, model


# --- the protocol -----------------------------------------------------------------------------------------------
def test_both_task_families_satisfy_the_protocol():
    ma, ind = ModularArithmetic(p=5), InductionTask()
    assert isinstance(ma, Task) and isinstance(ind, Task)
    assert isinstance(ind, SequenceTask) and not isinstance(ma, SequenceTask)
    assert ma.n_classes == 5 and ind.n_classes == 64 and ind.d_vocab == 65 and ind.n_ctx == 49
    assert (ind.min_len, ind.pad) == (8, 16)
    assert ma.milestones([]) == {}


def test_cross_entropy_is_the_plain_one_for_one_position_and_the_flat_mean_for_many():
    g = torch.Generator().manual_seed(0)
    lg, y = torch.randn(6, 5, generator=g), torch.randint(0, 5, (6,), generator=g)
    assert torch.equal(cross_entropy(lg, y), torch.nn.functional.cross_entropy(lg, y))
    lg3, y3 = torch.randn(6, 3, 5, generator=g), torch.randint(0, 5, (6, 3), generator=g)
    per = torch.stack([torch.nn.functional.cross_entropy(lg3[:, j], y3[:, j]) for j in range(3)])
    torch.testing.assert_close(cross_entropy(lg3, y3), per.mean())
    # -100 marks an unlabelled position: the mean is over the labelled ones
    masked = y3.clone()
    masked[:, 1] = -100
    keep = torch.cat([lg3[:, 0], lg3[:, 2]]), torch.cat([y3[:, 0], y3[:, 2]])
    torch.testing.assert_close(cross_entropy(lg3, masked), torch.nn.functional.cross_entropy(*keep))


# --- the data ---------------------------------------------------------------------------------------------------
def test_the_fixed_layout_repeats_distinct_tokens_after_bos():
    task = InductionTask(vocab=20, half_len=6, seed=3, n_eval=16, min_len=6, pad=0)
    tokens, labels = task.batch(50, np.random.RandomState(0))
    L = 6
    assert tokens.shape == (50, 13) and tokens.dtype == torch.long
    assert (tokens[:, 0] == 20).all() and (tokens[:, 1:] < 20).all()
    assert torch.equal(tokens[:, 1:L + 1], tokens[:, L + 1:])
    assert all(len(set(row[1:L + 1].tolist())) == L for row in tokens)
    assert task.readout_positions == (7, 8, 9, 10, 11)
    assert torch.equal(labels["next"], tokens[:, 8:])
    # each readout position's label is the token after the earlier occurrence of its own token
    for q, j in zip(task.readout_positions, range(5), strict=True):
        assert torch.equal(labels["next"][:, j], tokens[:, q - L + 1])


def test_the_repeat_varies_in_length_and_start_and_labels_mark_only_the_second_copy():
    task = InductionTask(vocab=40, half_len=8, seed=0, n_eval=8)  # min_len 4, pad 8: 25 tokens
    assert task.n_ctx == 25 and task.readout_positions == tuple(range(5, 24))
    tokens, labels = task.batch(400, np.random.RandomState(1))
    y = labels["next"]
    assert tokens.shape == (400, 25) and y.shape == (400, 19) and (tokens[:, 0] == 40).all()
    lengths, starts, gaps = [], [], []
    for row, lab in zip(tokens.tolist(), y.tolist(), strict=True):
        content = row[1:]
        repeated = [t for t in set(content) if content.count(t) == 2]
        assert all(content.count(t) <= 2 for t in content)  # distinct except the repeat
        ell = len(repeated)
        start = min(content.index(t) for t in repeated)
        x = content[start:start + ell]
        second = content.index(x[0], start + 1)
        assert content[second:second + ell] == x and set(x) == set(repeated)
        lengths.append(ell)
        starts.append(start)
        gaps.append(second - start - ell)
        # labels: the second copy's x_1..x_{ℓ-1} predict x_2..x_ℓ; everything else is ignored
        want = [-100] * 19
        for i in range(ell - 1):
            q = 1 + second + i
            want[q - 5] = x[i + 1]
        assert lab == want
    assert set(lengths) == set(range(4, 9)) and min(starts) == 0 and max(starts) > 8
    assert min(gaps) == 0 and max(gaps) > 8
    # labels are the token after the earlier occurrence of the readout token
    earlier, later = occurrences(tokens)
    assert (earlier.sum(1) == torch.tensor(lengths)).all() and (later.sum(1) == torch.tensor(lengths)).all()


def test_batches_are_fresh_and_seeded_and_the_fixed_sets_are_fixed():
    task = InductionTask(vocab=16, half_len=4, seed=1, n_eval=8)
    rng = np.random.RandomState(5)
    a, b = task.batch(10, rng)[0], task.batch(10, rng)[0]
    assert not torch.equal(a, b)
    assert torch.equal(a, task.batch(10, np.random.RandomState(5))[0])
    assert torch.equal(task.batch(4, torch.Generator().manual_seed(0))[0], task.batch(4, torch.Generator().manual_seed(0))[0])
    assert task.batch(4, np.random.default_rng(0))[0].shape == (4, 13)
    assert torch.equal(task.test[0], InductionTask(vocab=16, half_len=4, seed=1, n_eval=8).test[0])
    assert not torch.equal(task.test[0], task.train[0])
    assert task.split("all")[0].shape == (16, 13)
    assert torch.equal(task.probes(5, seed=2)[0], task.probes(5, seed=2)[0])
    assert not torch.equal(task.probes(5, seed=2)[0], task.probes(5, seed=3)[0])
    batch = gradient_batch(task, 12, seed=0)
    assert task.n_ctx == 13 and batch[0].shape == (12, 13) and batch[1]["next"].shape == (12, 9)


def test_bad_induction_arguments():
    with pytest.raises(SedLensError, match="distinct tokens"):
        InductionTask(vocab=4, half_len=8)
    with pytest.raises(SedLensError, match="min_len"):
        InductionTask(half_len=8, min_len=9)
    with pytest.raises(SedLensError, match="pad"):
        InductionTask(pad=-1)
    with pytest.raises(SedLensError, match="half_len must be at least 2"):
        InductionTask(half_len=1)
    with pytest.raises(SedLensError, match="unknown split"):
        InductionTask().split("val")
    with pytest.raises(SedLensError, match="generator"):
        InductionTask().batch(3, generator=7)


# --- head scores on hand-built patterns -------------------------------------------------------------------------
def _rows(n: int, keys) -> torch.Tensor:
    """A [n, n] attention pattern with all of row q on key keys(q)."""
    p = torch.zeros(n, n)
    for q in range(n):
        p[q, keys(q)] = 1.0
    return p


def test_previous_token_and_induction_scores_of_perfect_and_uniform_heads():
    L = 5
    n = 2 * L + 1
    prev = _rows(n, lambda q: max(q - 1, 0))
    ind = _rows(n, lambda q: q - L + 1 if q > L else 0)
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    pattern = torch.stack([prev, ind, uniform])  # [head, q, k]
    p_scores = previous_token_score(pattern)
    i_scores = induction_score(pattern, L)
    assert p_scores[0] == pytest.approx(1.0) and i_scores[1] == pytest.approx(1.0)
    assert p_scores[2] == pytest.approx(np.mean([1 / (q + 1) for q in range(1, n)]))
    assert i_scores[2] == pytest.approx(np.mean([1 / (q + 1) for q in range(L + 1, n)]))
    assert i_scores[0] == pytest.approx(0.0) and p_scores[1] == pytest.approx(1 / (n - 1))  # only q = 1 → 0
    # a batch axis is averaged over: two copies give the same scores
    torch.testing.assert_close(previous_token_score(torch.stack([pattern, pattern])), p_scores)
    with pytest.raises(SedLensError, match="needs 9 positions, got 11"):
        induction_score(pattern, 4)


def test_the_token_based_induction_score_reads_each_sequences_own_repeat():
    fixed = InductionTask(vocab=20, half_len=5, min_len=5, pad=0)
    tokens = fixed.batch(3, np.random.RandomState(0))[0]
    g = torch.Generator().manual_seed(0)
    pattern = torch.rand(3, 4, 11, 11, generator=g).tril()
    pattern = pattern / pattern.sum(-1, keepdim=True)
    torch.testing.assert_close(repeat_induction_score(pattern, tokens), induction_score(pattern, 5))
    # a perfect induction head on varied layouts: each query whose token occurred before attends after it
    task = InductionTask(vocab=40, half_len=8, seed=0)
    tokens = task.batch(6, np.random.RandomState(2))[0]
    n = task.n_ctx
    perfect = torch.zeros(6, 1, n, n)
    for b, row in enumerate(tokens.tolist()):
        for q in range(n):
            j = row.index(row[q])
            perfect[b, 0, q, j + 1 if j < q else 0] = 1.0
    assert float(repeat_induction_score(perfect, tokens)[0]) == pytest.approx(1.0)
    with pytest.raises(SedLensError, match="repeated"):
        repeat_induction_score(perfect[:, :, :3, :3], tokens[:, :3])


# --- the phase change -------------------------------------------------------------------------------------------
def test_phase_change_on_synthetic_curves():
    steps = list(range(0, 3000, 50))
    loss = [0.2 + 4.0 / (1 + math.exp((s - 1475) / 40)) for s in steps]  # 4.2 → 0.2, centred at 1475
    assert phase_change_step(steps, loss) == 1500
    assert phase_change_step(steps, loss, ratio=0.1) > 1500
    flat = [4.2] * len(steps)
    assert phase_change_step(steps, flat) is None
    spiky = list(loss)
    spiky[10] = 1.0  # one noisy eval at step 500
    assert phase_change_step(steps, spiky) == 500
    assert phase_change_step(steps, spiky, hold=2) == 1500
    assert phase_change_step(steps, [None, *loss[1:]]) == 1500  # the baseline is the first finite value
    assert phase_change_step(steps, loss, baseline=3.0) == 1550
    assert phase_change_step([], []) is None
    with pytest.raises(SedLensError, match="ratio"):
        phase_change_step(steps, loss, ratio=1.5)


def test_phase_change_bounds_from_the_loss_curve():
    steps = list(range(0, 3000, 50))
    loss = [0.2 + 4.0 / (1 + math.exp((s - 1475) / 40)) for s in steps]
    start, end = phase_change_bounds(steps, loss)
    assert start < phase_change_step(steps, loss) < end
    assert loss[steps.index(start)] <= 4.2 - 0.4 < loss[steps.index(start) - 1]
    assert loss[steps.index(end)] <= 4.2 - 0.9 * 4.0 + 1e-9 < loss[steps.index(end) - 1]
    assert phase_change_bounds(steps, [4.2] * len(steps)) == (None, None)
    assert phase_change_bounds([], []) == (None, None)
    with pytest.raises(SedLensError, match="start_frac"):
        phase_change_bounds(steps, loss, start_frac=0.9, end_frac=0.5)
    # a rising curve (an induction score): the same fractions of its rise; a small wobble is no phase change
    score = [0.03 + 0.9 / (1 + math.exp(-(s - 800) / 50)) for s in steps]
    start, end = phase_change_bounds(steps, score, min_change=0.2)
    assert start < 800 < end and score[steps.index(start)] >= 0.03 + 0.09 * 0.999
    assert phase_change_bounds(steps, [0.03 + 0.01 * (s % 2) for s in range(len(steps))], min_change=0.2) == (None, None)


def test_milestones_read_the_second_half_test_loss():
    task = InductionTask(vocab=8, half_len=3, n_eval=4, phase_hold=1)
    rows = [{"step": s, "test/loss/second_half": v} for s, v in [(0, 2.0), (25, 1.9), (50, 0.9), (75, 0.1)]]
    assert task.milestones(rows) == {"phase_change": 50}
    assert task.milestones([{"step": 0, "loss": 1.0}]) == {"phase_change": None}


# --- the model --------------------------------------------------------------------------------------------------
def test_the_attention_only_preset_reads_the_second_half(small):
    task = InductionTask(vocab=24, half_len=6, n_eval=8, min_len=6, pad=0)
    model = build_model("olsson2022", task, seed=0)
    pr = SEQUENCE_PRESETS["olsson2022"]
    assert model.cfg.attn_only and model.cfg.n_layers == pr.n_layers == 2 and model.cfg.n_heads == 4
    assert model.cfg.attention_dir == "causal" and model.cfg.d_vocab == 25 and model.cfg.d_vocab_out == 24
    r = get_readout(model)
    assert r.position == task.readout_positions and r.multi_position and r.n_classes == 24 and r.ops == ("next",)
    tokens, labels = task.batch(3, np.random.RandomState(0))
    logits = task_logits(model, tokens)["next"]
    assert logits.shape == (3, 5, 24)
    torch.testing.assert_close(logits, model(tokens)[:, 7:12])
    torch.testing.assert_close(op_losses(model, tokens, labels)["next"], task.losses({"next": logits}, labels)["next"])
    again = model_from_spec(model_spec(model), model.state_dict())
    assert get_readout(again) == r
    with pytest.raises(SedLensError, match="init='tl'"):
        build_model("olsson2022", task, init="torch")
    with pytest.raises(SedLensError, match="ModularArithmetic"):
        build_model("xu2026", task)
    with pytest.raises(SedLensError, match="sequence task"):
        build_model("olsson2022", ModularArithmetic(p=5))


def test_trainer_rejects_a_model_reading_other_positions(small):
    task, model = small
    with pytest.raises(SedLensError, match="positions"):
        Trainer(model, InductionTask(vocab=12, half_len=3, n_eval=4), TrainConfig(steps=1), progress=False)


def test_evaluate_reports_half_losses_and_head_scores(small):
    task, model = small
    m = evaluate(model, task)
    for split in ("train", "test"):
        for key in ("loss/next", "acc/next", "loss", "acc", "loss/first_half", "loss/second_half", "icl_score"):
            assert math.isfinite(m[f"{split}/{key}"])
        assert m[f"{split}/icl_score"] == pytest.approx(m[f"{split}/loss/first_half"] - m[f"{split}/loss/second_half"])
        assert m[f"{split}/loss/second_half"] == pytest.approx(m[f"{split}/loss/next"], rel=1e-5)
    heads = [f"L{layer}H{h}" for layer in range(2) for h in range(2)]
    assert all(0 <= m[f"test/prev_token_score/{k}"] <= 1 and 0 <= m[f"test/induction_score/{k}"] <= 1 for k in heads)
    assert m["test/prev_token_score"] == max(m[f"test/prev_token_score/L0H{h}"] for h in range(2))
    assert m["test/induction_score"] == max(m[f"test/induction_score/L1H{h}"] for h in range(2))
    assert model.training  # evaluate restores the mode


# --- training, SED capture and coupling -------------------------------------------------------------------------
def test_a_short_run_trains_captures_sed_and_measures_coupling():
    task = InductionTask(vocab=12, half_len=4, seed=0, n_eval=32)
    model = build_sequence_model(TINY, task, seed=0)
    S = ParamSubspace.attention(model)
    cap = GradientCapture(S, sources=("update", "gradient"), window=4, k=2, every=2, batch_size=16)
    cfg = TrainConfig(steps=24, eval_every=8, batch_size=16, lr=3e-3, weight_decay=0.01, stop_patience=0)
    res = Trainer(model, task, cfg, callbacks=[cap], progress=False).fit()
    assert res.steps == 24 and [r["step"] for r in res.history] == [0, 8, 16, 24]
    assert "phase_change" in res.milestones and res.summary()["milestones"] == res.milestones
    assert "test/icl_score" in res.final and "sed/gradient/sigma_1" in res.history[-1]
    assert res.history[-1]["test/loss/second_half"] < res.history[0]["test/loss/second_half"]
    bases = cap.bases()
    assert set(bases) == {"update", "gradient"} and bases["gradient"]["directions"].shape == (2, S.dim)
    probes = task.probes(8, seed=0)
    r = coupling(model, S, bases["gradient"]["directions"], probes, n_random=4, method="jvp")
    assert r.R.shape == (2,) and torch.isfinite(r.R).all() and (r.A > 0).all()
    r_hvp = coupling(model, S, bases["gradient"]["directions"], probes, n_random=4, method="hvp")
    torch.testing.assert_close(r_hvp.A, r.A, rtol=1e-3, atol=1e-9)
    # the gradient stream is the gradient of the second-half loss, by plain autograd
    vec = stream_vectors(model, task, S, cap.batch, ("gradient",))["gradient"]
    tokens, labels = cap.batch
    model.zero_grad()
    cross_entropy(model(tokens)[:, 3:12], labels["next"]).backward()
    ref = S.flatten({n: p.grad for n, p in S.parameters_of(model).items()})
    model.zero_grad()
    torch.testing.assert_close(vec, ref, rtol=1e-4, atol=1e-6)


def _embedding_centroid(model, tokens, labels, positions):
    """Independent centroid: autograd of the mean over each probe's labelled readout positions (label ≠ -100) of
    the correct logits with respect to the embedding (token + position) fed in as a leaf."""
    emb = (model.embed(tokens) + model.pos_embed(tokens)).detach().requires_grad_(True)
    logits = model(emb, start_at_layer=0)[:, list(positions)]
    valid = (labels >= 0).float()
    correct = logits.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    value = ((correct * valid).sum(1) / valid.sum(1)).sum()
    return torch.autograd.grad(value, emb)[0]


def test_the_sequence_centroid_averages_the_readout_positions(small):
    task, model = small
    tokens, labels = task.probes(6, seed=1)
    mu = centroids(model, tokens, labels)
    assert mu.shape == (6, task.n_ctx, 16)
    assert (labels["next"] == -100).any()  # the varied layout: each probe averages its own labelled positions
    torch.testing.assert_close(mu, _embedding_centroid(model, tokens, labels["next"], task.readout_positions))
    # the fixed layout (every readout position labelled): the mean of the per-position centroids
    fixed = InductionTask(vocab=12, half_len=4, seed=0, n_eval=4, min_len=4, pad=0)
    fmodel = build_sequence_model(TINY, fixed, seed=1)
    tokens, labels = fixed.probes(6, seed=1)
    mu = centroids(fmodel, tokens, labels)
    per = [_embedding_centroid(fmodel, tokens, labels["next"][:, [j]], [q]) for j, q in enumerate(fixed.readout_positions)]
    torch.testing.assert_close(mu, torch.stack(per).mean(0), rtol=1e-4, atol=1e-6)
    with pytest.raises(SedLensError, match="readout position"):
        centroids(model, tokens, labels["next"][:, 0])


def test_the_centroid_response_matches_finite_differences_of_the_autograd_centroid(small):
    task, model = small
    tokens, labels = task.probes(5, seed=2)
    S = ParamSubspace.attention(model)
    dirs = S.random_directions(3, torch.Generator().manual_seed(4))
    A = centroid_response(model, S, dirs, (tokens, labels), method="jvp")
    eps = 1e-3
    for j in range(3):
        tangent = S.unflatten(dirs[j], full=True)
        shifted = []
        for sign in (1, -1):
            m = copy.deepcopy(model)
            with torch.no_grad():
                for name, p in m.named_parameters():
                    if name in tangent:
                        p.add_(sign * eps * tangent[name])
            shifted.append(_embedding_centroid(m, tokens, labels["next"], task.readout_positions))
        fd = (((shifted[0] - shifted[1]) / (2 * eps)) ** 2).sum() / tokens.shape[0]
        assert float(A[j]) == pytest.approx(float(fd), rel=2e-2)


@pytest.mark.parametrize("method", ["hvp", "fd"])
def test_vectorised_responses_over_several_readout_positions_equal_the_loops(small, method, recwarn):
    """The readout averaged over the labelled positions (labels -100 elsewhere) under vmap: hvp / fd with 3
    directions per call (of 4, a zero row among them) as one direction at a time; hvp as the exact jvp."""
    from sed_lens.analysis import coupling as coupling_module
    from sed_lens.analysis.centroids import CentroidMap
    from sed_lens.analysis.coupling import perturbation_scale

    task, model = small
    tokens, labels = task.probes(6, seed=3)
    S = ParamSubspace.attention(model)
    d = S.random_directions(3, torch.Generator().manual_seed(5))
    dirs = torch.cat([d[:2], torch.zeros(1, S.dim), d[2:]])
    A = centroid_response(model, S, dirs, (tokens, labels), method=method, chunk_size=3)
    assert not [w for w in recwarn if "could not vectorise" in str(w.message)]
    cmap = CentroidMap(model, tokens, labels)
    base = {n: p.detach() for n, p in S.parameters_of(model).items()}
    was_training = model.training
    model.eval()
    loop = coupling_module._loop_sq(method, cmap, model, base, S, dirs, slice(0, 6), perturbation_scale(model, S, 0.005))
    model.train(was_training)
    torch.testing.assert_close(A.double(), loop / 6, rtol=1e-5, atol=0)
    assert A[2] == 0
    if method == "hvp":
        torch.testing.assert_close(A, centroid_response(model, S, dirs, (tokens, labels), method="jvp"), rtol=1e-4, atol=0)
