"""Perturbative SED–LCH coupling: how strongly moving the weights along a direction moves the centroids.

For a unit direction v in a :class:`~sed_lens.subspace.ParamSubspace` S, the centroid response is

    A(v) = mean over probes x of ‖ d/dε μ_x(θ + ε v) |_{ε=0} ‖²,

the mean squared norm of the directional derivative of the probes' centroids (see
:mod:`sed_lens.analysis.centroids`). ``method="jvp"`` computes it exactly by forward-over-reverse autodiff (a
``torch.func.jvp`` of the centroid gradient, ``vmap``-ed over directions in chunks); ``method="hvp"`` computes
the same exact value by reverse-over-reverse autodiff (μ̇_x = ∂/∂δ_x ⟨∇_θ R, v⟩, a Hessian-vector-product
pattern: one shared differentiable backward, then one backward per group of directions); ``method="fd"`` uses the
paper's central difference (μ(θ + εv) − μ(θ − εv)) / 2ε with ε = ``eps_rel``·‖θ_S‖, the ± perturbations of a
group of directions stacked into one ``vmap``-ed centroid evaluation. The coupling of k directions is
R_j = A(v_j) / median_r A(r) over random unit directions r in S, and R̄ = mean_j R_j.

How many directions one vectorised call takes: ``chunk_size`` on an accelerator; on a CPU at most that, and fewer
when the probes are many (:data:`CPU_DIRECTION_PROBES`), since there the work per direction is memory-bound
elementwise arithmetic that batching does not shrink, and batched activations that outgrow the caches make a call
slower per direction and cost memory (``python -m benchmarks.coupling_responses`` measures it).
A model or readout that ``torch.func`` cannot vectorise falls back, with a warning, to one direction at a time.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from sed_lens.analysis.centroids import DEFAULT_SITE, CentroidMap, ReadoutFn
from sed_lens.configs import METHODS
from sed_lens.devices import accumulation_dtype, model_device
from sed_lens.errors import SedLensError, check
from sed_lens.subspace import ParamSubspace

Probes = tuple[Int[Tensor, "n pos"], Mapping[str, Tensor] | Tensor | None]


UNIT_RTOL = 1e-3  # a direction's norm may differ from 1 by this much (relative); rows of zeros are allowed

CPU_DIRECTION_PROBES = {"jvp": 2048, "hvp": 256, "fd": 1024}
"""On a CPU, one vectorised call of ``jvp`` / ``hvp`` / ``fd`` takes at most this many (direction × probe) pairs (and at
least one direction, at most ``chunk_size``). Measured on the paper's model with 1 thread
(``benchmarks/coupling_responses.py``): the central difference gains from stacking a few directions' ±
perturbations at small probe sets (~1.5× per direction at 128 probes) and loses again past a few thousand pairs;
at the paper's 1,024 probes one direction (its ± pair) per call: stacking two was ~7 % faster per direction but
needed +563 MiB of workspace instead of +327 MiB, which put a reproduction worker over 1.5 GB (the results are
bit-identical either way: each perturbed weight set is its own slice of the batched products). The batched
reverse-over-reverse backward (``is_grads_batched``) is slower than one backward per direction except for tiny
probe batches, so from 256 probes on ``hvp`` goes one direction at a time. ``jvp`` at 1,024 probes (the paper's model, 1
thread): 2 directions per call took 0.29 s per direction and +737 MiB, 8 per call 0.59 s and +2.6 GiB (the same
values up to rounding: a forward-mode batch of another size sums in another order)."""


def perturbation_scale(model: HookedTransformer, subspace: ParamSubspace, eps_rel: float) -> float:
    """The paper's ε = eps_rel · ‖θ_S‖ (the norm of the subspace's weights at this point of training)."""
    w = subspace.weights(model)
    return eps_rel * float(torch.linalg.vector_norm(w.to(accumulation_dtype(w.device))))


def check_unit_rows(directions: Tensor, what: str = "directions") -> None:
    """Every row of ``directions`` is a unit vector (relative tolerance :data:`UNIT_RTOL`) or all zeros (what a
    rank-deficient SED basis holds); A(v) scales with ‖v‖², so any other norm would scale R silently."""
    norms = torch.linalg.vector_norm(directions.detach().to(accumulation_dtype(directions.device)), dim=1)
    bad = ((norms - 1).abs() > UNIT_RTOL) & (norms != 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise SedLensError(f"{what} must be unit vectors (or zero rows), but row {i} has norm {float(norms[i]):.6g}; "
                           "A(v) grows with the squared norm, so normalise them first: v / v.norm(dim=1, keepdim=True).")


def centroid_response(model: HookedTransformer, subspace: ParamSubspace, directions: Float[Tensor, "n P"],
                      probes: Probes, method: str = "jvp", eps_rel: float = 0.005, site: str = DEFAULT_SITE,
                      readout: ReadoutFn = "correct_logit", task: str | None = None, chunk_size: int = 8,
                      probe_batch: int | None = None) -> Float[Tensor, " n"]:
    """A(v) for each row v of ``directions`` (``[n, P]``: unit rows, or zero rows, else a SedLensError), as a
    float32 CPU tensor; the work runs on the model's device.

    Args:
        probes: ``(tokens, labels)`` as returned by ``task.probes(n)``.
        method: ``"jvp"`` or ``"hvp"`` (exact, equal up to rounding) or ``"fd"`` (central difference with
            ε = eps_rel·‖θ_S‖).
        site, readout, task: the centroid (see :func:`sed_lens.analysis.centroids.centroids`).
        chunk_size: directions per vectorised call (bounds memory); on a CPU a call may take fewer (see
            :data:`CPU_DIRECTION_PROBES`).
        probe_batch: probes per pass (default: all).
    """
    check(method in METHODS, f"unknown method {method!r}; choose {' or '.join(METHODS)}.")
    check(isinstance(eps_rel, (int, float)) and eps_rel > 0, f"eps_rel must be positive, got {eps_rel!r}.")
    check(isinstance(chunk_size, int) and chunk_size >= 1, f"chunk_size must be a positive integer, got {chunk_size!r}.")
    dirs = subspace.check_directions(directions)
    check_unit_rows(dirs)
    device = model_device(model)
    dirs = dirs.to(device)
    tokens, labels = probes
    cmap = CentroidMap(model, tokens, labels, site, readout, task)  # moves the probes to the model's device
    base = {n: p.detach() for n, p in subspace.parameters_of(model).items()}
    n_probes = tokens.shape[0]
    pb = n_probes if probe_batch is None else probe_batch
    check(pb >= 1, f"probe_batch must be positive, got {probe_batch}.")
    was_training = model.training
    model.eval()
    total = torch.zeros(dirs.shape[0], dtype=accumulation_dtype(device), device=device)
    eps = perturbation_scale(model, subspace, eps_rel) if method == "fd" else 0.0
    vectorise = True  # until torch.func fails on this model / readout
    try:
        for lo in range(0, n_probes, pb):
            rows = slice(lo, lo + pb)
            per_call = directions_per_call(method, chunk_size, min(pb, n_probes - lo), device)
            if method == "jvp":
                total += _jvp_sq(cmap, base, subspace, dirs, rows, per_call)
                continue
            if vectorise and (method == "fd" or per_call > 1):  # (hvp with 1 per call is the loop)
                try:
                    total += _batched_sq(method, cmap, model, base, subspace, dirs, rows, eps, per_call)
                    continue
                except (RuntimeError, NotImplementedError) as e:  # not SedLensError (a ValueError): bad inputs
                    vectorise = False
                    first = str(e).splitlines()[0] if str(e) else ""
                    warnings.warn(f"centroid_response(method={method!r}) could not vectorise over directions "
                                  f"({type(e).__name__}: {first[:200]}); measuring one direction at a time.",
                                  RuntimeWarning, stacklevel=2)
            total += _loop_sq(method, cmap, model, base, subspace, dirs, rows, eps)
    finally:
        model.train(was_training)
    return (total / n_probes).to(torch.float32).cpu()


def directions_per_call(method: str, chunk_size: int, n_rows: int, device: torch.device) -> int:
    """Directions per vectorised ``hvp`` / ``fd`` call for ``n_rows`` probes: ``chunk_size`` on an accelerator; on
    a CPU at most :data:`CPU_DIRECTION_PROBES` ``[method] // n_rows`` of them (at least 1)."""
    if device.type != "cpu":
        return chunk_size
    return max(1, min(chunk_size, CPU_DIRECTION_PROBES[method] // max(n_rows, 1)))


def _batched_sq(method: str, cmap: CentroidMap, model: HookedTransformer, base: dict[str, Tensor],
                subspace: ParamSubspace, dirs: Tensor, rows: slice, eps: float, per_call: int) -> Tensor:
    """``hvp`` / ``fd`` with ``per_call`` directions per vectorised call (``torch.func``: a ``RuntimeError`` when it
    cannot vectorise the model or readout, e.g. ``.item()`` or data-dependent control flow inside ``vmap``)."""
    if method == "hvp":
        return _hvp_sq(cmap, model, subspace, dirs, rows, per_call)
    return _fd_sq_batched(cmap, base, subspace, dirs, rows, eps, per_call)


def _loop_sq(method: str, cmap: CentroidMap, model: HookedTransformer, base: dict[str, Tensor],
             subspace: ParamSubspace, dirs: Tensor, rows: slice, eps: float) -> Tensor:
    """``hvp`` / ``fd`` one direction at a time, without ``vmap`` (the fallback of :func:`_batched_sq`)."""
    if method == "hvp":
        return _hvp_sq(cmap, model, subspace, dirs, rows, 1)
    return _fd_sq(cmap, base, subspace, dirs, rows, eps)


def _jvp_sq(cmap: CentroidMap, base: dict[str, Tensor], subspace: ParamSubspace, dirs: Tensor, rows: slice,
            chunk: int) -> Tensor:
    """Σ over the probes in ``rows`` of ‖J_x v‖² for every direction, exactly (forward-over-reverse)."""

    acc = accumulation_dtype(dirs.device)

    def tangent_sq(tangent: dict[str, Tensor]) -> Tensor:
        dmu = torch.func.jvp(lambda p: cmap(p, rows), (base,), (tangent,))[1]
        return (dmu.to(acc) ** 2).sum()

    out = []
    for i in range(0, dirs.shape[0], chunk):
        tangents = subspace.unflatten(dirs[i:i + chunk].to(next(iter(base.values())).dtype), full=True)
        out.append(torch.func.vmap(tangent_sq)(tangents).detach())
    return torch.cat(out)


def _hvp_sq(cmap: CentroidMap, model: HookedTransformer, subspace: ParamSubspace, dirs: Tensor, rows: slice,
            per_call: int = 1) -> Tensor:
    """Σ over the probes in ``rows`` of ‖J_x v‖², exactly, by reverse-over-reverse autodiff.

    R = Σ_x R_x with δ injected at the site; g = ∇_θ R (differentiable, shared by every direction);
    μ̇_x = ∂⟨g, v⟩/∂δ_x, since ∂²R/∂δ_x∂θ · v is the directional derivative of the centroid μ_x = ∂R/∂δ_x.
    ``per_call`` directions share one backward (``is_grads_batched``); with 1, one plain backward per direction.
    """
    named = subspace.parameters_of(model)
    tokens = cmap.tokens[rows]
    labels = None if cmap.labels is None else cmap.labels[rows]
    dtype = next(iter(named.values())).dtype
    delta = torch.zeros((tokens.shape[0], *cmap.shape), dtype=dtype, device=tokens.device, requires_grad=True)
    n = dirs.shape[0]
    with torch.enable_grad():
        total = cmap.readout_sum(delta, {}, tokens, labels)
        grads = torch.autograd.grad(total, list(named.values()), create_graph=True)
        acc = accumulation_dtype(delta.device)
        out = torch.empty(n, dtype=acc, device=delta.device)
        for i in range(0, n, per_call):
            part = dirs[i:i + per_call].to(dtype)
            t = subspace.unflatten(part, full=True)
            keep = i + per_call < n
            if part.shape[0] == 1:
                mu_dot = torch.autograd.grad(grads, delta, grad_outputs=[t[k][0] for k in named], retain_graph=keep)[0][None]
            else:
                mu_dot = torch.autograd.grad(grads, delta, grad_outputs=[t[k] for k in named], retain_graph=keep,
                                             is_grads_batched=True)[0]
            out[i:i + part.shape[0]] = (mu_dot.detach().to(acc) ** 2).flatten(1).sum(1)
    return out


def _fd_sq_batched(cmap: CentroidMap, base: dict[str, Tensor], subspace: ParamSubspace, dirs: Tensor, rows: slice,
                   eps: float, per_call: int) -> Tensor:
    """:func:`_fd_sq`, with the 2·``per_call`` perturbed weights θ ± εv of ``per_call`` directions stacked into one
    ``vmap``-ed centroid evaluation (what does not depend on the weights, e.g. the embedding, is computed once)."""
    acc = accumulation_dtype(dirs.device)
    dtype = next(iter(base.values())).dtype
    centroids_at = torch.func.vmap(lambda params: cmap(params, rows))
    out = []
    with torch.no_grad():
        for i in range(0, dirs.shape[0], per_call):
            t = subspace.unflatten(dirs[i:i + per_call].to(dtype), full=True)
            m = next(iter(t.values())).shape[0]
            mu = centroids_at({n: torch.cat([base[n] + eps * t[n], base[n] - eps * t[n]]) for n in base})
            diff = (mu[:m].to(acc) - mu[m:].to(acc)) / (2 * eps)
            out.append((diff ** 2).flatten(1).sum(1))
    return torch.cat(out)


def _fd_sq(cmap: CentroidMap, base: dict[str, Tensor], subspace: ParamSubspace, dirs: Tensor, rows: slice,
           eps: float) -> Tensor:
    """Σ over the probes in ``rows`` of ‖(μ(θ+εv) − μ(θ−εv)) / 2ε‖² for every direction, one at a time (what
    :func:`_fd_sq_batched` falls back to)."""
    acc = accumulation_dtype(dirs.device)
    out = torch.empty(dirs.shape[0], dtype=acc, device=dirs.device)
    with torch.no_grad():
        for j in range(dirs.shape[0]):
            t = subspace.unflatten(dirs[j].to(next(iter(base.values())).dtype), full=True)
            plus = cmap({n: base[n] + eps * t[n] for n in base}, rows)
            minus = cmap({n: base[n] - eps * t[n] for n in base}, rows)
            out[j] = (((plus.to(acc) - minus.to(acc)) / (2 * eps)) ** 2).sum()
    return out


@dataclass
class CouplingResult:
    """R_j = A(v_j) / median_r A(r): the coupling of each direction relative to random directions in S."""

    R: Float[Tensor, " k"]
    A: Float[Tensor, " k"]
    A_random: Float[Tensor, " n_random"]
    method: str
    eps: float | None  # the absolute ε of the finite difference (None for jvp)

    @property
    def R_mean(self) -> float:
        """R̄ = mean over the directions of R_j."""
        return float(self.R.mean())

    @property
    def median_random(self) -> float:
        return float(self.A_random.median())

    def as_dict(self) -> dict[str, Any]:
        return {"R": self.R.tolist(), "R_mean": self.R_mean, "A": self.A.tolist(), "A_random": self.A_random.tolist(),
                "median_random": self.median_random, "method": self.method, "eps": self.eps}


def ratios(A: Tensor, A_random: Tensor) -> Tensor:
    """R = A / median(A_random) (the median is the lower middle value for an even count, as ``torch.median``)."""
    return A / A_random.median().clamp_min(torch.finfo(A.dtype).tiny)


def coupling(model: HookedTransformer, subspace: ParamSubspace, directions: Float[Tensor, "k P"], probes: Probes,
             n_random: int = 20, seed: int = 0, random_directions: Tensor | None = None, method: str = "jvp",
             eps_rel: float = 0.005, **kwargs: Any) -> CouplingResult:
    """Coupling ratios R_j of ``directions`` against ``n_random`` random unit directions of ``subspace``.

    The random directions are drawn with ``torch.Generator().manual_seed(seed)`` (pass ``random_directions``
    to supply your own). One :func:`centroid_response` call measures all directions together. Other keyword
    arguments (``site``, ``readout``, ``task``, ``chunk_size``, ``probe_batch``) go to it.
    """
    dirs = subspace.check_directions(directions)
    check_unit_rows(dirs)
    if random_directions is None:  # drawn on the CPU, so they do not depend on the device
        check(isinstance(n_random, int) and n_random >= 1, f"n_random must be a positive integer, got {n_random!r}.")
        random_directions = subspace.random_directions(n_random, torch.Generator().manual_seed(seed))
    rand = subspace.check_directions(random_directions)
    check_unit_rows(rand, "random directions")
    device = model_device(model)
    A_all = centroid_response(model, subspace, torch.cat([dirs.to(device), rand.to(device, dirs.dtype)]), probes, method=method,
                              eps_rel=eps_rel, **kwargs)
    A, A_random = A_all[:len(dirs)], A_all[len(dirs):]
    eps = perturbation_scale(model, subspace, eps_rel) if method == "fd" else None
    return CouplingResult(ratios(A, A_random), A, A_random, method, eps)
