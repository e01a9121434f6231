"""The induction task: repeated random sequences, in-context loss, head scores and the phase change.

Olsson et al. (2022): a 2-layer attention-only transformer trained on sequences whose second half repeats the
first learns, suddenly, to copy — a previous-token head in layer 0 and an induction head in layer 1 form
together, and the in-context loss drops. :class:`InductionTask` is that data set in the :class:`~sed_lens.task.Task`
protocol:

* a sequence is ``[BOS] f … f x_1 … x_ℓ f … f x_1 … x_ℓ f … f`` (``n_ctx = 2L + pad + 1``): a segment ``x`` of
  length ``ℓ`` drawn per sequence from ``min_len … L`` (``L`` = ``half_len``) and its repeat, with filler tokens
  ``f`` before, between and after the copies (of the ``2(L−ℓ) + pad`` filler positions, the gap between the copies
  is drawn uniformly, then the number before the first copy from what is left). Every
  content token of a sequence is distinct (``x`` and ``f`` together one uniform draw without replacement from
  ``0..vocab-1``), so each second-copy token has exactly one earlier occurrence and copying is never ambiguous;
  ``BOS`` is the token ``vocab``. ``min_len = L, pad = 0`` is the fixed layout ``[BOS] x_1..x_L x_1..x_L``;
* one op, ``"next"``: next-token prediction in the second copy. The readout positions are every position at
  which some sequence has a labelled second-copy token (``min_len+1 … n_ctx−2``); in a sequence the labelled ones
  are the second-copy tokens ``x_1 … x_{ℓ-1}`` with the tokens that follow (``x_2 … x_ℓ``) as labels, and every
  other readout position has the label ``-100`` (``F.cross_entropy``'s ``ignore_index``: no loss, no accuracy,
  no centroid weight). Labels are a function of the tokens alone (:meth:`InductionTask.labels_of`): position ``q``
  is labelled iff the tokens at ``q`` and ``q+1`` both occurred before;
* training batches are fresh samples from the trainer's seeded generator; ``split("test")`` is a fixed held-out
  set and ``split("train")`` a fixed sample of the training distribution (both from the task's seed);
* metrics per eval (:meth:`InductionTask.evaluate`): the loss on the first copy (the positions of ``x_1 … x_{ℓ-1}``
  predicting ``x_2 … x_ℓ``: the same tokens, seen for the first time) and on the second copy, the in-context
  learning score ``icl_score`` = first-half loss − second-half loss, next-token accuracy on the second half, and,
  on the test set, every head's previous-token and induction score (:func:`previous_token_score`,
  :func:`induction_score`) and their maxima over heads;
* the phase change (:func:`phase_change_step`, reported by :meth:`InductionTask.milestones` as
  ``"phase_change"``) is the first eval at which the second-half test loss has fallen to ``ratio`` (default ½) of
  its value at the first eval.

The training loss covers only the second half, so the model is never trained on the first half's positions;
their loss measures what the model predicts for tokens it has not seen yet and may grow past ``ln(vocab)`` after
the phase change (a copying model is confidently wrong there). That is why the phase change is detected from
the second-half loss against its own starting value rather than from the ICL score.

Why the layout varies (trials, 2-layer attention-only ``olsson2022``, vocab 64, L = 16): with the fixed layout
(``min_len = L, pad = 0``) a layer-0 head can copy by *position* alone (attend from ``q`` to ``q − L + 1``).
Trained models took that shortcut — the phase change happened (second-half loss 4.5 → 0.1) with layer-0 heads
scoring ≈ 0.9 on the induction stripe and no previous-token head (scores at the uniform level ≈ 0.1). With the
repeat's length and start drawn per sequence, the distance back to the earlier occurrence varies; with the copies
adjacent, though, a model solved it without an induction head (trial: 98 % accuracy, no previous-token head) by
attending to the recent, all-distinct tokens and picking the earliest one not yet repeated. Filler between the
copies (a gap of random length) breaks that too, so only matching *content* (a previous-token head feeding an
induction head) solves the task. The default is
``min_len = max(2, L // 2)``, ``pad = L``. The induction score (:func:`repeat_induction_score`) is measured per
sequence from its own tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from sed_lens.devices import model_device
from sed_lens.errors import SedLensError, check
from sed_lens.task import Batch, ReadoutLogits, SequenceTask, cross_entropy

OP = "next"
"""The induction task's one op: next-token prediction at the second-half positions."""
IGNORE = -100
"""The label of an unlabelled readout position (``F.cross_entropy``'s default ``ignore_index``)."""


# --- head scores from attention patterns ------------------------------------------------------------------------
def _check_pattern(pattern: Tensor) -> None:
    check(isinstance(pattern, Tensor) and pattern.ndim >= 3 and pattern.shape[-1] == pattern.shape[-2],
          "attention patterns must be [..., head, query, key] with as many keys as queries.")


def previous_token_score(pattern: Tensor) -> Tensor:
    """Per head, the mean attention from each position ``q ≥ 1`` to ``q − 1``.

    ``pattern``: ``[batch, head, query, key]`` (TransformerLens' ``hook_pattern``) or ``[head, query, key]``.
    Returns ``[head]``: 1 for a perfect previous-token head; for uniform causal attention
    ``mean_{q=1..n-1} 1/(q+1)``.
    """
    _check_pattern(pattern)
    p = pattern if pattern.ndim > 3 else pattern[None]
    q = torch.arange(1, p.shape[-1], device=p.device)
    stripe = p[..., q, q - 1]  # [..., head, n-1]
    return stripe.mean(-1).reshape(-1, p.shape[-3]).mean(0)


def induction_score(pattern: Tensor, half_len: int) -> Tensor:
    """Per head, the mean attention from each second-half position of ``[BOS] x_1..x_L x_1..x_L`` to the token
    after the earlier occurrence of its own token: from ``L + i`` (token ``x_i``) to ``i + 1`` (``i = 1..L``).

    ``pattern``: ``[batch, head, 2L+1, 2L+1]`` or ``[head, 2L+1, 2L+1]``. Returns ``[head]``: 1 for a perfect
    induction head; for uniform causal attention ``mean_{q=L+1..2L} 1/(q+1)``.
    """
    _check_pattern(pattern)
    check(isinstance(half_len, int) and half_len >= 1 and pattern.shape[-1] == 2 * half_len + 1,
          f"an induction pattern over [BOS] + 2 × {half_len} tokens needs {2 * half_len + 1} positions, "
          f"got {pattern.shape[-1]}.")
    p = pattern if pattern.ndim > 3 else pattern[None]
    q = torch.arange(half_len + 1, 2 * half_len + 1, device=p.device)
    stripe = p[..., q, q - half_len + 1]
    return stripe.mean(-1).reshape(-1, p.shape[-3]).mean(0)


def occurrences(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """``(earlier, later)`` ``[batch, pos]`` booleans: whether the token at each position also occurs before it /
    after it in its sequence."""
    eq = tokens[:, :, None] == tokens[:, None, :]
    n = tokens.shape[1]
    before = torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril(-1)
    return (eq & before).any(-1), (eq & before.T).any(-1)


def repeat_induction_score(pattern: Tensor, tokens: Tensor) -> Tensor:
    """Per head, the mean attention from every position whose token occurred before to the position *after* that
    earlier occurrence (what an induction head attends to), over every such query of every sequence.

    ``pattern``: ``[batch, head, query, key]``; ``tokens``: ``[batch, pos]`` (the sequences, any layout). On the
    fixed layout ``[BOS] x_1..x_L x_1..x_L`` it equals :func:`induction_score`. Returns ``[head]``."""
    _check_pattern(pattern)
    check(isinstance(tokens, Tensor) and tokens.ndim == 2 and pattern.ndim == 4
          and tuple(tokens.shape) == (pattern.shape[0], pattern.shape[-1]),
          "repeat_induction_score needs patterns [batch, head, n, n] and their tokens [batch, n].")
    n = tokens.shape[1]
    eq = tokens[:, :, None] == tokens[:, None, :]  # [b, q, j]: same token
    before = torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril(-1)
    prev_occ = eq & before  # j < q holds q's token
    target = torch.zeros_like(prev_occ)
    target[:, :, 1:] = prev_occ[:, :, :-1]  # key j + 1
    w = target.to(pattern.dtype)
    n_queries = target.any(-1).sum()
    check(int(n_queries) > 0, "no position repeats an earlier token: the induction score needs repeated sequences.")
    return torch.einsum("bhqk,bqk->h", pattern, w) / n_queries


def head_scores(model: HookedTransformer, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(logits, previous-token scores [layer, head], induction scores [layer, head])`` of ``model`` on
    ``tokens`` from one ``run_with_cache`` forward pass (only the attention patterns are cached); the induction
    score is :func:`repeat_induction_score`, measured from the sequences' own repeats."""
    logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("attn.hook_pattern"))
    check(isinstance(logits, Tensor), "the model must return logits (return_type='logits').")
    assert isinstance(logits, Tensor)
    n_layers = model.cfg.n_layers
    prev = torch.stack([previous_token_score(cache[f"blocks.{layer}.attn.hook_pattern"]) for layer in range(n_layers)])
    ind = torch.stack([repeat_induction_score(cache[f"blocks.{layer}.attn.hook_pattern"], tokens)
                       for layer in range(n_layers)])
    return logits, prev, ind


# --- the phase change -------------------------------------------------------------------------------------------
def phase_change_step(steps: Sequence[int], loss: Sequence[float | None], ratio: float = 0.5,
                      baseline: float | None = None, hold: int = 1) -> int | None:
    """The first step at which ``loss`` (the second-half loss curve) has fallen to ``ratio · baseline`` and stays
    there for ``hold`` consecutive evals (that step is the first of them); None if it never does.

    ``baseline`` defaults to the curve's first finite value (its loss at the start of training, ≈ ln(vocab)).
    ``None`` or NaN entries (evals without the metric) break a hold and never count.
    """
    check(len(steps) == len(loss), f"a curve needs one loss per step, got {len(steps)} steps and {len(loss)} losses.")
    check(0 < ratio < 1, f"ratio must lie strictly between 0 and 1, got {ratio!r}.")
    check(isinstance(hold, int) and hold >= 1, f"hold must be a positive integer, got {hold!r}.")
    finite = [float(v) for v in loss if v is not None and math.isfinite(float(v))]
    if not finite:
        return None
    base = finite[0] if baseline is None else float(baseline)
    run = 0
    for i, v in enumerate(loss):
        ok = v is not None and math.isfinite(float(v)) and float(v) <= ratio * base
        run = run + 1 if ok else 0
        if run >= hold:
            return int(steps[i - hold + 1])
    return None


def phase_change_bounds(steps: Sequence[int], values: Sequence[float | None], start_frac: float = 0.1,
                        end_frac: float = 0.9, min_change: float = 0.0) -> tuple[int | None, int | None]:
    """``(start, end)`` steps of a transition from one curve of the run (e.g. the strongest layer-1 induction score
    rising, or the second-half loss falling): the first eval at which the curve has gone ``start_frac`` of its way
    from its first finite value to its farthest value, and the first at which it has gone ``end_frac`` of it.
    Snapshots before ``start`` are before the phase change, from ``end`` on after it, during it in between (the
    ``(start, end)`` of :func:`sed_lens.analysis.trajectory.phase_bounds`). ``(None, None)`` if the curve never
    moves more than ``min_change`` from its first value (no phase change)."""
    check(len(steps) == len(values), f"a curve needs one value per step, got {len(steps)} steps and {len(values)} values.")
    check(0 < start_frac < end_frac < 1, f"need 0 < start_frac < end_frac < 1, got {start_frac}, {end_frac}.")
    pts = [(int(s), float(v)) for s, v in zip(steps, values, strict=True) if v is not None and math.isfinite(float(v))]
    if not pts:
        return None, None
    first = pts[0][1]
    change = max((v - first for _, v in pts), key=abs)
    if change == 0 or abs(change) <= min_change:
        return None, None
    start = next(s for s, v in pts if (v - first) / change >= start_frac)
    end = next(s for s, v in pts if (v - first) / change >= end_frac)
    return start, end


# --- the task ---------------------------------------------------------------------------------------------------
class InductionTask:
    """Repeated random segments at a varying place (see the module docstring); a
    :class:`~sed_lens.task.SequenceTask`.

    Args:
        vocab: content tokens ``0..vocab-1`` (``BOS`` is ``vocab``); at least the distinct tokens a sequence holds
            (``2·half_len + pad − min_len``).
        half_len: ``L``, the longest repeated segment (≥ 2).
        seed: fixes the held-out test set, the fixed train sample and the default sampler.
        n_eval: sequences in each fixed set (``split("train")``, ``split("test")``).
        phase_ratio, phase_hold: the phase-change rule (:func:`phase_change_step`).
        min_len: the shortest repeated segment (``2 … L``; default ``max(2, L // 2)``).
        pad: filler tokens beyond the two copies of the longest segment (default ``L``); ``min_len = L, pad = 0``
            is the fixed layout ``[BOS] x_1..x_L x_1..x_L``.
    """

    def __init__(self, vocab: int = 64, half_len: int = 16, seed: int = 0, n_eval: int = 512,
                 phase_ratio: float = 0.5, phase_hold: int = 1, min_len: int | None = None,
                 pad: int | None = None) -> None:
        for name, v in (("vocab", vocab), ("half_len", half_len), ("seed", seed), ("n_eval", n_eval),
                        ("phase_hold", phase_hold), ("min_len", min_len), ("pad", pad)):
            check(v is None and name in ("min_len", "pad") or isinstance(v, int) and not isinstance(v, bool),
                  f"{name} must be an integer, got {v!r}.")
        check(half_len >= 2, f"half_len must be at least 2, got {half_len}.")
        min_len = max(2, half_len // 2) if min_len is None else min_len
        pad = half_len if pad is None else pad
        check(2 <= min_len <= half_len, f"min_len must lie in 2..half_len ({half_len}), got {min_len}.")
        check(pad >= 0, f"pad must be non-negative, got {pad}.")
        self.min_len, self.pad = min_len, pad
        distinct = 2 * half_len + pad - min_len
        check(vocab >= distinct, f"vocab ({vocab}) must be at least the {distinct} distinct tokens a sequence holds "
                                 f"(2·half_len + pad − min_len).")
        check(n_eval >= 1, f"n_eval must be positive, got {n_eval}.")
        check(seed >= 0, f"seed must be non-negative, got {seed}.")
        check(isinstance(phase_ratio, (int, float)) and 0 < phase_ratio < 1,
              f"phase_ratio must lie strictly between 0 and 1, got {phase_ratio!r}.")
        check(phase_hold >= 1, f"phase_hold must be positive, got {phase_hold}.")
        self.vocab, self.half_len, self.n_eval = vocab, half_len, n_eval
        self.phase_ratio, self.phase_hold = float(phase_ratio), phase_hold
        self._seed = seed
        self._fixed = {name: self.sample(n_eval, np.random.RandomState([seed, stream]))
                       for name, stream in (("train", 1), ("test", 2))}

    # --- the protocol's layout ---------------------------------------------------------------------------
    @property
    def ops(self) -> tuple[str, ...]:
        return (OP,)

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def multitask(self) -> bool:
        return False

    @property
    def bos(self) -> int:
        """The beginning-of-sequence token."""
        return self.vocab

    @property
    def n_ctx(self) -> int:
        return 2 * self.half_len + self.pad + 1

    @property
    def d_vocab(self) -> int:
        return self.vocab + 1

    @property
    def n_classes(self) -> int:
        """Predicted tokens: the content tokens (BOS is never a label)."""
        return self.vocab

    @property
    def readout_positions(self) -> tuple[int, ...]:
        """``min_len+1 … n_ctx-2``: every position at which some sequence holds a second-copy token whose next
        token is predictable by copying (``L+1 … 2L-1`` in the fixed layout)."""
        return tuple(range(self.min_len + 1, self.n_ctx - 1))

    # --- data --------------------------------------------------------------------------------------------
    def sample(self, n: int, generator: Any) -> Tensor:
        """``n`` fresh sequences ``[n, n_ctx]`` from ``generator`` (a ``numpy.random.RandomState`` or
        ``Generator``, or a ``torch.Generator``): per sequence a segment length ``ℓ``, a start ``r`` and a draw of
        distinct tokens (one uniform ``[n, vocab + 3]`` draw: the last three columns choose ``ℓ``, the gap and ``r``)."""
        check(isinstance(n, int) and n >= 1, f"the number of sequences must be a positive integer, got {n!r}.")
        shape = (n, self.vocab + 3)
        if isinstance(generator, np.random.RandomState):
            keys = torch.from_numpy(generator.random_sample(shape))
        elif isinstance(generator, np.random.Generator):
            keys = torch.from_numpy(generator.random(shape))
        elif isinstance(generator, torch.Generator):
            keys = torch.rand(shape, generator=generator, dtype=torch.float64)
        else:
            raise SedLensError("generator must be a numpy RandomState/Generator or a torch.Generator, "
                               f"got {type(generator).__name__}.")
        perm = keys[:, :self.vocab].argsort(dim=1)  # distinct tokens, uniformly: x = perm[:ℓ], filler after
        span = self.half_len - self.min_len + 1
        ell = self.min_len + (keys[:, self.vocab] * span).long().clamp(max=span - 1)  # [n]
        content = self.n_ctx - 1
        free = content - 2 * ell  # filler tokens: before, between and after the copies
        g = (keys[:, self.vocab + 1] * (free + 1)).long().clamp(max=free)  # the gap between the copies
        r = (keys[:, self.vocab + 2] * (free - g + 1)).long().clamp(max=free - g)  # filler before the first copy
        c = torch.arange(content)[None]  # content index
        ell_, r_, g_ = ell[:, None], r[:, None], g[:, None]
        src = torch.where(c < r_, ell_ + c,  # filler before
              torch.where(c < r_ + ell_, c - r_,  # first copy
              torch.where(c < r_ + ell_ + g_, c,  # filler between
              torch.where(c < r_ + 2 * ell_ + g_, c - r_ - ell_ - g_,  # second copy
                          c - ell_))))  # filler after
        bos = torch.full((n, 1), self.bos, dtype=torch.long)
        return torch.cat([bos, perm.gather(1, src)], dim=1)

    def labels_of(self, tokens: Tensor) -> dict[str, Tensor]:
        """``{"next": [n, n_readout]}``: at each readout position ``q`` the token at ``q+1`` if the tokens at ``q``
        and ``q+1`` both occurred before (a second-copy token followed by one), else ``-100`` (ignored)."""
        earlier, _ = occurrences(tokens)
        q = torch.tensor(self.readout_positions, device=tokens.device)
        labelled = earlier[:, q] & earlier[:, q + 1]
        return {OP: torch.where(labelled, tokens[:, q + 1], torch.full_like(tokens[:, q], IGNORE))}

    def split(self, name: str) -> Batch:
        """The fixed ``"train"`` sample, the held-out ``"test"`` set, or both (``"all"``)."""
        if name == "all":
            tokens = torch.cat([self._fixed["train"], self._fixed["test"]])
        elif name in self._fixed:
            tokens = self._fixed[name]
        else:
            raise SedLensError(f"unknown split {name!r}; choose train, test or all.")
        return tokens.clone(), self.labels_of(tokens)

    @property
    def train(self) -> Batch:
        return self.split("train")

    @property
    def test(self) -> Batch:
        return self.split("test")

    def batch(self, n: int, generator: Any = None) -> Batch:
        """``n`` freshly sampled sequences (``None``: a fresh ``RandomState(seed)``)."""
        tokens = self.sample(n, np.random.RandomState(self.seed) if generator is None else generator)
        return tokens, self.labels_of(tokens)

    @property
    def max_probes(self) -> None:
        """Probes are freshly sampled: any number."""
        return None

    def probes(self, n: int = 1024, seed: int = 0) -> Batch:
        """``n`` sequences drawn by ``seed`` (a stream of their own: neither the training batches nor the
        fixed sets)."""
        tokens = self.sample(n, np.random.RandomState([self.seed, 3, seed]))
        return tokens, self.labels_of(tokens)

    # --- losses, metrics, milestones ---------------------------------------------------------------------
    def losses(self, logits: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Mean next-token cross-entropy over the readout positions (``logits[op]``: ``[batch, L-1, vocab]``)."""
        return {op: cross_entropy(logits[op], y) for op, y in labels.items()}

    def half_losses(self, logits: Tensor, tokens: Tensor) -> tuple[float, float]:
        """Mean next-token loss of the full ``logits [n, n_ctx, ≥vocab]`` on the first copy (the positions of
        ``x_1..x_{ℓ-1}`` predicting ``x_2..x_ℓ``, first seen) and on the second copy (the same tokens, repeated)."""
        earlier, later = occurrences(tokens)
        logp = logits[:, :-1, :self.vocab].float().log_softmax(-1)
        nll = -logp.gather(-1, tokens[:, 1:, None].clamp(max=self.vocab - 1)).squeeze(-1)  # [n, n_ctx-1]
        first = later[:, :-1] & later[:, 1:]
        second = earlier[:, :-1] & earlier[:, 1:]
        return float(nll[first].mean()), float(nll[second].mean())

    def evaluate(self, model: HookedTransformer, readout: ReadoutLogits) -> dict[str, float]:
        """On the fixed train sample and the test set: the op's loss and accuracy (``{split}/loss/next``,
        ``{split}/acc/next``, also as ``{split}/loss`` / ``{split}/acc``), ``{split}/loss/first_half``,
        ``{split}/loss/second_half``, ``{split}/icl_score``; on the test set every head's
        ``test/prev_token_score/L{l}H{h}``, ``test/induction_score/L{l}H{h}`` and their maxima
        ``test/prev_token_score`` (layer 0) and ``test/induction_score`` (layers ≥ 1; layer 0 if there is one)."""
        device = model_device(model)
        out: dict[str, float] = {}
        for split in ("train", "test"):
            tokens, labels = self.split(split)
            tokens = tokens.to(device)
            y = labels[OP].to(device)
            if split == "test":
                full, prev, ind = head_scores(model, tokens)
            else:
                full = model(tokens)
            lg = readout(tokens)[OP]
            out[f"{split}/loss/{OP}"] = float(cross_entropy(lg, y))
            out[f"{split}/acc/{OP}"] = float((lg.argmax(-1) == y)[y != IGNORE].float().mean())
            out[f"{split}/loss"], out[f"{split}/acc"] = out[f"{split}/loss/{OP}"], out[f"{split}/acc/{OP}"]
            first, second = self.half_losses(full, tokens)
            out[f"{split}/loss/first_half"], out[f"{split}/loss/second_half"] = first, second
            out[f"{split}/icl_score"] = first - second
        for layer in range(prev.shape[0]):
            for h in range(prev.shape[1]):
                out[f"test/prev_token_score/L{layer}H{h}"] = float(prev[layer, h])
                out[f"test/induction_score/L{layer}H{h}"] = float(ind[layer, h])
        out["test/prev_token_score"] = float(prev[0].max())
        out["test/induction_score"] = float((ind[1:] if ind.shape[0] > 1 else ind).max())
        return out

    def milestones(self, history: Sequence[Mapping[str, Any]]) -> dict[str, int | None]:
        """``{"phase_change": step}``: :func:`phase_change_step` of the second-half test loss (None: not yet)."""
        rows = [r for r in history if "test/loss/second_half" in r]
        step = phase_change_step([int(r["step"]) for r in rows], [r["test/loss/second_half"] for r in rows],
                                 self.phase_ratio, hold=self.phase_hold) if rows else None
        return {"phase_change": step}

    # --- description -------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"task": "induction", "vocab": self.vocab, "half_len": self.half_len, "min_len": self.min_len,
                "pad": self.pad, "seed": self.seed, "n_eval": self.n_eval, "n_ctx": self.n_ctx,
                "phase_ratio": self.phase_ratio, "phase_hold": self.phase_hold}

    def __repr__(self) -> str:
        return (f"InductionTask(vocab={self.vocab}, half_len={self.half_len}, min_len={self.min_len}, pad={self.pad}, "
                f"seed={self.seed}, n_eval={self.n_eval}; sequences of {self.n_ctx} tokens)")


def _conforms(task: InductionTask) -> SequenceTask:  # mypy checks that InductionTask satisfies the protocol
    return task
