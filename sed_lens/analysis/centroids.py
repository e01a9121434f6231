"""LCH centroids: the gradient of a readout of the logits with respect to an activation site.

For a probe input x, a hook site with activation a_x (any TransformerLens hook name; the paper's site is the
input embedding ``blocks.0.hook_resid_pre``, token + position, ``[pos, d_model]``) and a readout R of the
logits at the model's readout position, the centroid is μ_x = ∂R(logits(x)) / ∂a_x, with the shape of the
activation. Readouts: ``"correct_logit"`` — the logit of the correct label (the paper's single-logit form);
``"logit_sum"`` — the sum of the op's logits, so μ_x = J_xᵀ·1 (the Linear Centroids Hypothesis' form); a
vector ``w`` over the op's classes (μ_x = J_xᵀ w); or a callable ``f(logits [batch, n_classes], labels) ->
[batch]``. A multitask model reads the op's own head (``task=``). A model whose readout spans several positions
(a sequence task, e.g. the induction task's second half; labels ``[n, n_pos]``) averages the readout over those
positions, so μ_x is the mean of the per-position centroids (see :func:`position_mean_readout` for why).

The gradient is taken with respect to an additive perturbation δ injected at the site (δ = 0), which works
for any hook point, including sites whose activation itself depends on the parameters; one backward pass per
batch gives every probe's centroid (probes do not interact in a transformer's forward pass).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.func import functional_call
from transformer_lens import HookedTransformer

from sed_lens.configs import DEFAULT_SITE, READOUTS
from sed_lens.devices import model_device
from sed_lens.errors import SedLensError, check
from sed_lens.models import get_readout

ReadoutFn = str | Tensor | Callable[[Tensor, Tensor | None], Tensor]
"""What a centroid averages per probe: a named readout ("correct_logit", …), a fixed vector over the classes, or
``f(logits, labels) -> values`` (``labels`` is None when the probes come without labels). (Not
:class:`sed_lens.models.Readout`, which says where a model's logits are.)"""


def readout_values(logits: Float[Tensor, "batch n_classes"], labels: Int[Tensor, " batch"] | None,
                   readout: ReadoutFn) -> Float[Tensor, " batch"]:
    """The scalar readout of each probe's logits."""
    if isinstance(readout, str):
        if readout == "correct_logit":
            check(labels is not None, "the 'correct_logit' readout needs the probes' labels.")
            assert labels is not None
            return logits.gather(1, labels[:, None]).squeeze(1)
        if readout == "logit_sum":
            return logits.sum(-1)
        raise SedLensError(f"unknown readout {readout!r}; choose {', '.join(READOUTS)}, a vector over the classes "
                           "or a callable.")
    if isinstance(readout, Tensor):
        check(readout.shape == logits.shape[-1:],
              f"a readout vector needs one weight per class ({logits.shape[-1]}), got shape {tuple(readout.shape)}.")
        return logits @ readout.to(logits.device, logits.dtype)
    if callable(readout):
        out = readout(logits, labels)
        check(isinstance(out, Tensor) and out.shape == logits.shape[:1],
              "a readout callable must return one value per probe (shape [batch]).")
        return out
    raise SedLensError(f"unknown readout {readout!r}; choose {', '.join(READOUTS)}, a vector or a callable.")


def position_mean_readout(logits: Float[Tensor, "batch *pos n_classes"], labels: Tensor | None,
                          readout: ReadoutFn) -> Float[Tensor, " batch"]:
    """The scalar readout of each probe: :func:`readout_values` of its logits at the readout position, or — for
    a readout at several positions (``logits [batch, n_pos, n_classes]``, ``labels [batch, n_pos]``) — the mean
    over the positions of each position's readout value.

    Why the mean and not one position: the centroid of a sequence task (e.g. the induction task's second half)
    should describe the behaviour the whole readout carries — copying at every repeated position — not the
    accident of one position; the mean is linear, so μ_x is exactly the mean of the per-position centroids
    (each position weighted equally, the total scale independent of the number of positions), and with one
    position it is the single-position centroid unchanged.

    Labels ``-100`` (``F.cross_entropy``'s ``ignore_index``) mark positions a probe has no label at (e.g. an
    induction sequence whose repeat sits elsewhere): the mean is then over each probe's labelled positions only."""
    if logits.ndim == 2:
        return readout_values(logits, labels, readout)
    n, n_pos = logits.shape[:2]
    if labels is None:
        return readout_values(logits.reshape(n * n_pos, -1), None, readout).reshape(n, n_pos).mean(1)
    valid = labels >= 0
    flat = readout_values(logits.reshape(n * n_pos, -1), labels.clamp_min(0).reshape(-1), readout).reshape(n, n_pos)
    w = valid.to(flat.dtype)
    return (flat * w).sum(1) / w.sum(1).clamp_min(1)


def site_shape(model: HookedTransformer, tokens: Tensor, site: str) -> tuple[int, ...]:
    """Shape of the activation at ``site`` for ``tokens`` (one forward pass of one probe)."""
    if site not in model.hook_dict:
        raise SedLensError(f"unknown hook site {site!r}; the model's sites include {', '.join(list(model.hook_dict)[:6])}, ….")
    shapes: list[tuple[int, ...]] = []
    with torch.no_grad(), model.hooks(fwd_hooks=[(site, lambda a, hook: shapes.append(tuple(a.shape)))]):
        model(tokens[:1])
    check(len(shapes) == 1, f"hook site {site!r} fires {len(shapes)} times per forward pass; pick a site that fires once.")
    return shapes[0][1:]


class CentroidMap:
    """μ(θ): the probes' centroids as a function of (some of) the model's parameters, for ``torch.func``.

    ``cmap(params)`` runs the model with ``params`` (a ``{name: tensor}`` dict replacing those parameters, as in
    ``torch.func.functional_call``) and returns the centroids ``[n_probes, *site_shape]``. It is differentiable
    in ``params`` (forward mode included), which is what the exact coupling needs.
    """

    def __init__(self, model: HookedTransformer, tokens: Int[Tensor, "batch pos"],
                 labels: Mapping[str, Tensor] | Tensor | None = None, site: str = DEFAULT_SITE,
                 readout: ReadoutFn = "correct_logit", task: str | None = None) -> None:
        r = get_readout(model)
        check(isinstance(tokens, Tensor) and tokens.ndim == 2, "probe tokens must be a [n_probes, pos] integer tensor.")
        check(int(tokens.min()) >= 0 and int(tokens.max()) < model.cfg.d_vocab,
              f"probe tokens must lie in 0..{model.cfg.d_vocab - 1} (the model's vocabulary).")
        device = model_device(model)
        tokens = tokens.to(device)
        self.model, self.tokens, self.site, self.readout = model, tokens, site, readout
        if task is None and isinstance(labels, Mapping) and len(labels) == 1:
            task = next(iter(labels))
        self.task = task if task is not None else (r.ops[0] if len(r.ops) == 1 else None)
        if self.task is None:
            raise SedLensError(f"this model has heads {', '.join(r.ops)}; name the op whose centroids you want (task=).")
        self.slice, self.position, self.readout_spec = r.slice(self.task), r.position, r
        if isinstance(labels, Mapping):
            check(self.task in labels, f"no labels for op {self.task!r} among {', '.join(labels)}.")
            self.labels: Tensor | None = labels[self.task].to(device)
        else:
            self.labels = labels.to(device) if isinstance(labels, Tensor) else labels
        if self.labels is not None:
            want = tokens.shape[:1] + ((len(r.positions),) if r.multi_position else ())
            check(tuple(self.labels.shape) == tuple(want),
                  "probes need one label per probe" + (" and readout position." if r.multi_position else "."))
        self.shape = site_shape(model, tokens, site)
        self._delta: Tensor | None = None

    def _inject(self, act: Tensor, hook: Any) -> Tensor:
        assert self._delta is not None
        return act + self._delta

    def readout_sum(self, delta: Tensor, params: Mapping[str, Tensor], tokens: Tensor, labels: Tensor | None) -> Tensor:
        """Σ over probes of the readout, with ``delta`` added at the site."""
        self._delta = delta
        try:
            with self.model.hooks(fwd_hooks=[(self.site, self._inject)]):
                logits = functional_call(self.model, dict(params), (tokens,))
        finally:
            self._delta = None
        logits = self.readout_spec.select(logits)[..., self.slice]
        return position_mean_readout(logits, labels, self.readout).sum()

    def __call__(self, params: Mapping[str, Tensor] | None = None, rows: slice | None = None) -> Tensor:
        """Centroids ``[n, *site_shape]`` at ``params`` (default: the model's own), for probes ``rows``."""
        tokens = self.tokens if rows is None else self.tokens[rows]
        labels = self.labels if rows is None or self.labels is None else self.labels[rows]
        zeros = torch.zeros((tokens.shape[0], *self.shape), dtype=next(self.model.parameters()).dtype,
                            device=tokens.device)
        return torch.func.grad(self.readout_sum)(zeros, params or {}, tokens, labels)


def centroids(model: HookedTransformer, tokens: Int[Tensor, "batch pos"],
              labels: Mapping[str, Tensor] | Tensor | None = None, site: str = DEFAULT_SITE,
              readout: ReadoutFn = "correct_logit", task: str | None = None,
              batch_size: int | None = None) -> Float[Tensor, "batch ..."]:
    """LCH centroids of ``tokens``: ∂ readout(logits at the readout position) / ∂ activation at ``site``.

    Args:
        model: any ``HookedTransformer`` (its :class:`~sed_lens.models.Readout` says where logits are read).
        tokens, labels: probes, e.g. ``task.probes(1024)``; labels keyed by op, or a tensor for one head.
        site: a TransformerLens hook name firing once per forward pass (default the input embedding).
        readout: ``"correct_logit"``, ``"logit_sum"`` (Jᵀ1), a vector over the op's classes, or a callable.
        task: the op whose head is read (needed for a multitask model unless ``labels`` has one op).
        batch_size: probes per backward pass (default: all at once).

    Returns:
        ``[n_probes, *activation shape]`` — e.g. ``[n, pos, d_model]`` at a residual-stream site.
    """
    cmap = CentroidMap(model, tokens, labels, site, readout, task)
    n = tokens.shape[0]
    step = n if batch_size is None else batch_size
    check(step >= 1, f"batch_size must be positive, got {batch_size}.")
    with torch.no_grad():
        return torch.cat([cmap(None, slice(i, i + step)).detach() for i in range(0, n, step)])
