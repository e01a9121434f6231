import numpy as np
import pytest
import torch

from sed_lens.errors import SedLensError
from sed_lens.tasks import ModularArithmetic, available_ops, get_op, register_op


def test_split_is_deterministic_disjoint_and_covers_the_grid():
    a = ModularArithmetic(p=13, ops=("add",), seed=3)
    b = ModularArithmetic(p=13, ops=("add",), seed=3)
    c = ModularArithmetic(p=13, ops=("add",), seed=4)
    assert torch.equal(a.train_idx, b.train_idx) and torch.equal(a.test_idx, b.test_idx)
    assert not torch.equal(a.train_idx, c.train_idx)
    tr, te = set(a.train_idx.tolist()), set(a.test_idx.tolist())
    assert not tr & te and tr | te == set(range(13 * 13))
    assert len(tr) == int(0.5 * 169)


def test_split_is_python_random_shuffle_of_row_major_pairs():
    import random

    t = ModularArithmetic(p=7, ops=("add",), seed=42, train_frac=0.5)
    pairs = [(x, y) for x in range(7) for y in range(7)]
    random.Random(42).shuffle(pairs)
    got = [tuple(r) for r in t.pairs[t.train_idx].tolist()]
    assert got == pairs[: int(0.5 * 49)]


@pytest.mark.parametrize("op,fn", [("add", lambda a, b: a + b), ("sub", lambda a, b: a - b),
                                   ("mul", lambda a, b: a * b), ("sq", lambda a, b: a * a + b * b)])
def test_labels_per_op(op, fn):
    p = 17
    t = ModularArithmetic(p=p, ops=(op,), seed=0)
    for (a, b), y in zip(t.pairs.tolist(), t.labels[op].tolist(), strict=True):
        assert y == fn(a, b) % p


def test_mul_domain_excludes_zero_and_multitask_shares_pairs():
    t = ModularArithmetic(p=11, ops=("mul",))
    assert t.pairs.min() == 1 and len(t.pairs) == 100
    m = ModularArithmetic(p=11, ops=("add", "sub", "mul", "sq"), seed=0)
    assert m.multitask and len(m.pairs) == 100 and set(m.labels) == {"add", "sub", "mul", "sq"}
    tok, lab = m.batch(64, np.random.RandomState(0))
    a, b = tok[:, 0], tok[:, 1]
    assert torch.equal(lab["add"], (a + b) % 11) and torch.equal(lab["mul"], (a * b) % 11)
    assert torch.equal(lab["sq"], (a * a + b * b) % 11) and torch.equal(lab["sub"], (a - b) % 11)


def test_batch_samples_train_split_with_replacement_and_reproducibly():
    t = ModularArithmetic(p=11, seed=1)
    x1, _ = t.batch(500, np.random.RandomState(5))
    x2, _ = t.batch(500, np.random.RandomState(5))
    assert torch.equal(x1, x2)
    train = {tuple(r) for r in t.tokens[t.train_idx].tolist()}
    assert {tuple(r) for r in x1.tolist()} <= train
    assert len({tuple(r) for r in x1.tolist()}) < 500  # with replacement: 500 draws from 60 pairs repeat
    xt, _ = t.batch(8, torch.Generator().manual_seed(0))
    xg, _ = t.batch(8, np.random.default_rng(0))
    assert xt.shape == xg.shape == (8, 2)


def test_probes_are_fixed_distinct_and_span_train_and_test():
    t = ModularArithmetic(p=13, seed=0)
    x, y = t.probes(100, seed=7)
    x2, _ = t.probes(100, seed=7)
    assert torch.equal(x, x2) and len({tuple(r) for r in x.tolist()}) == 100
    train = {tuple(r) for r in t.tokens[t.train_idx].tolist()}
    kinds = {tuple(r) in train for r in x.tolist()}
    assert kinds == {True, False}
    assert torch.equal(y["add"], (x[:, 0] + x[:, 1]) % 13)


def test_layout_with_equals_token():
    t = ModularArithmetic(p=7, layout="ab=")
    assert t.n_ctx == 3 and t.d_vocab == 8 and (t.tokens[:, 2] == 7).all()
    assert torch.equal(t.with_layout("ab").tokens, t.tokens[:, :2])


def test_register_user_op():
    register_op("cube_sum", lambda a, b, p: a**3 + b**3, overwrite=True)
    assert "cube_sum" in available_ops()
    t = ModularArithmetic(p=7, ops=("cube_sum",))
    assert t.labels["cube_sum"][10].item() == (t.pairs[10, 0] ** 3 + t.pairs[10, 1] ** 3).item() % 7
    with pytest.raises(SedLensError, match="already registered"):
        register_op("add", lambda a, b, p: a)
    assert get_op("add").formula == "a+b"


@pytest.mark.parametrize("kwargs,match", [
    (dict(p=1), "at least 3"), (dict(p=2), "at least 3"), (dict(p=7.5), "integer"), (dict(ops=("nope",)), "unknown op"),
    (dict(ops=()), "at least one op"), (dict(train_frac=0.0), "strictly between"),
    (dict(train_frac=1.5), "strictly between"), (dict(layout="ba"), "unknown layout"),
    (dict(ops=("add", "add")), "repeat"), (dict(p=3, train_frac=0.1), "empty split"),
    (dict(p=91, ops=("add", "mul")), "op mul needs a prime modulus.*p=91 is not prime"),
])
def test_bad_task_arguments(kwargs, match):
    with pytest.raises(SedLensError, match=match):
        ModularArithmetic(**kwargs)


def test_bad_batch_and_probe_arguments():
    t = ModularArithmetic(p=5)
    with pytest.raises(SedLensError, match="grid size"):
        t.probes(26)
    with pytest.raises(SedLensError, match="positive integer"):
        t.batch(0)
    with pytest.raises(SedLensError, match="generator"):
        t.batch(3, generator=42)
    with pytest.raises(SedLensError, match="unknown split"):
        t.split("val")


def test_only_ops_that_need_a_field_reject_a_composite_modulus():
    for op in ("add", "sub", "sq"):
        assert ModularArithmetic(p=15, ops=(op,)).p == 15
    assert get_op("mul").needs_prime and not get_op("add").needs_prime
    register_op("div_like", lambda a, b, p: a * b, needs_prime=True, overwrite=True)
    with pytest.raises(SedLensError, match="op div_like needs a prime modulus"):
        ModularArithmetic(p=9, ops=("div_like",))
    assert ModularArithmetic(p=7, ops=("div_like",)).p == 7
