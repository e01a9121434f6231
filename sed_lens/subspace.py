"""``ParamSubspace``: an ordered set of named parameter slices of a model, seen as one flat vector.

The paper's attention subspace S is every ``blocks.L.attn.W_Q/W_K/W_V/W_O`` (no biases); SED directions,
random directions, perturbations and projections all live in it. A subspace may select layers, heads and
matrices, or any parameters by name. Vectors in the subspace are flat ``[P]`` tensors, in the order of
:attr:`ParamSubspace.slices` (layer, then matrix in the order given, then head); :meth:`unflatten` maps them
back to ``{parameter name: tensor}``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from sed_lens.errors import SedLensError, check

ATTENTION_MATS = "QKVO"


@dataclass(frozen=True)
class Slice:
    """One parameter, or some of its heads (dimension 0 of TransformerLens' ``[n_heads, ...]`` weights)."""

    name: str  # parameter name, e.g. "blocks.0.attn.W_Q"
    shape: tuple[int, ...]  # shape of the selected part
    heads: tuple[int, ...] | None  # selected heads, None = the whole parameter
    offset: int  # start in the flat vector
    layer: int | None = None
    matrix: str | None = None  # "Q", "K", "V", "O" for attention weights

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def stop(self) -> int:
        return self.offset + self.numel


@dataclass
class HeadView:
    """How a [P] vector splits over (layer, matrix, head) blocks: norms and shares of the squared norm."""

    rows: list[tuple[int | None, str | None, int | None, float]]  # (layer, matrix, head, norm)

    @property
    def total(self) -> float:
        return sum(r[3] ** 2 for r in self.rows) ** 0.5

    def share(self) -> list[float]:
        tot = self.total ** 2 or 1.0
        return [r[3] ** 2 / tot for r in self.rows]

    def top(self, n: int = 5) -> list[tuple[int | None, str | None, int | None, float]]:
        return sorted(self.rows, key=lambda r: -r[3])[:n]

    def __str__(self) -> str:
        lines = ["layer  matrix  head      norm   share"]
        for (layer, mat, head, norm), share in zip(self.rows, self.share(), strict=True):
            lines.append(f"{'-' if layer is None else layer:>5}  {mat or '-':>6}  {'-' if head is None else head:>4}"
                         f"  {norm:9.4g}  {share:6.1%}")
        return "\n".join(lines)


class ParamSubspace:
    """An ordered set of parameter slices of ``model``; vectors in it are flat ``[P]`` tensors.

    Build it with :meth:`attention` (the paper's S) or :meth:`from_names`.
    """

    def __init__(self, model: nn.Module, selection: Sequence[tuple[str, Sequence[int] | None]]) -> None:
        params = dict(model.named_parameters())
        check(len(selection) > 0, "the subspace selects no parameters.")
        slices: list[Slice] = []
        offset = 0
        for name, heads in selection:
            if name not in params:
                raise SedLensError(f"the model has no parameter {name!r}.")
            shape = tuple(params[name].shape)
            if heads is not None:
                heads = tuple(int(h) for h in heads)
                check(len(heads) > 0 and all(0 <= h < shape[0] for h in heads) and len(set(heads)) == len(heads),
                      f"heads {list(heads)} are not distinct heads of {name} (it has {shape[0]}).")
                shape = (len(heads), *shape[1:])
            m = re.fullmatch(r"blocks\.(\d+)\.attn\.W_([QKVO])", name)
            s = Slice(name, shape, heads, offset, int(m.group(1)) if m else None, m.group(2) if m else None)
            slices.append(s)
            offset = s.stop
        self.slices: tuple[Slice, ...] = tuple(slices)
        self.dim: int = offset
        self._params = {s.name: params[s.name] for s in slices}
        self._index = {s.name: torch.tensor(s.heads, device=params[s.name].device) for s in slices if s.heads}

    # --- construction ------------------------------------------------------------------------------------
    @classmethod
    def attention(cls, model: nn.Module, layers: Iterable[int] | None = None, heads: Iterable[int] | None = None,
                  mats: str | Sequence[str] = ATTENTION_MATS) -> ParamSubspace:
        """Attention weights ``W_Q, W_K, W_V, W_O`` (no biases) of the selected layers, heads and matrices.

        ``layers``/``heads``: indices (default all); ``mats``: any of ``"QKVO"`` (e.g. ``"QK"``, ``["V", "O"]``).
        """
        mats = [m.upper() for m in mats]
        bad = [m for m in mats if m not in ATTENTION_MATS]
        check(not bad and len(mats) > 0, f"mats must be letters from {ATTENTION_MATS}, got {''.join(mats) or 'nothing'}.")
        n_layers = _n_layers(model)
        layer_list = list(range(n_layers)) if layers is None else [int(x) for x in layers]
        bad_layers = [x for x in layer_list if not 0 <= x < n_layers]
        check(not bad_layers and len(layer_list) > 0, f"layers {layer_list} are not layers of this {n_layers}-layer model.")
        head_list = None if heads is None else [int(h) for h in heads]
        names = dict(model.named_parameters())
        sel: list[tuple[str, Sequence[int] | None]] = []
        for layer in layer_list:
            for m in ATTENTION_MATS:
                name = f"blocks.{layer}.attn.W_{m}"
                if m not in mats:
                    continue
                if name not in names:
                    raise SedLensError(f"the model has no parameter {name!r} (grouped-query attention is not supported).")
                sel.append((name, head_list))
        return cls(model, sel)

    @classmethod
    def from_names(cls, model: nn.Module, names: Iterable[str]) -> ParamSubspace:
        """Whole parameters by name (e.g. ``["blocks.0.mlp.W_in"]``), in the order given."""
        return cls(model, [(n, None) for n in names])

    # --- description -------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slices]

    @property
    def parameters(self) -> list[nn.Parameter]:
        """The distinct parameters (of the model the subspace was built on) that it reads."""
        return list(self._params.values())

    def parameters_of(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """``{name: parameter}`` of the subspace's parameters in ``model`` (any model with the same names)."""
        params = dict(model.named_parameters())
        missing = [n for n in self._params if n not in params]
        check(not missing, f"the model has no parameter {missing[0]!r} of this subspace." if missing else "")
        return {n: params[n] for n in self._params}

    def describe(self) -> list[dict[str, Any]]:
        """JSON-able layout: name, shape of the selected part, heads, offset — enough to unflatten a vector."""
        return [{"name": s.name, "shape": list(s.shape), "heads": None if s.heads is None else list(s.heads),
                 "offset": s.offset, "layer": s.layer, "matrix": s.matrix} for s in self.slices]

    def __repr__(self) -> str:
        more = "…" if len(self.slices) > 4 else ""
        return f"ParamSubspace(dim={self.dim}, {len(self.slices)} slices: {', '.join(self.names[:4])}{more})"

    # --- flat vectors ------------------------------------------------------------------------------------
    def _select(self, s: Slice, t: Tensor) -> Tensor:
        return t.index_select(0, self._index[s.name].to(t.device)) if s.heads else t

    def flatten(self, tensors: Mapping[str, Tensor]) -> Float[Tensor, " P"]:
        """Concatenate the selected parts of full-shape tensors keyed by parameter name."""
        missing = [s.name for s in self.slices if s.name not in tensors]
        check(not missing, f"flatten needs tensors for {', '.join(missing)}.")
        return torch.cat([self._select(s, tensors[s.name].detach()).reshape(-1) for s in self.slices])

    def unflatten(self, vec: Float[Tensor, "*batch P"], full: bool = False) -> dict[str, Tensor]:
        """``{parameter name: tensor}`` from a flat vector (or a batch ``[..., P]`` of them): the selected parts,
        or ``full=True`` full-shape tensors with zeros outside the selection."""
        self._check_vec(vec, batched=True)
        lead = tuple(vec.shape[:-1])
        out: dict[str, Tensor] = {}
        for s in self.slices:
            part = vec[..., s.offset:s.stop].reshape(*lead, *s.shape)
            if full and s.heads:
                shape = (*lead, *self._params[s.name].shape)
                z = torch.zeros(shape, dtype=vec.dtype, device=vec.device)
                out[s.name] = z.index_copy(len(lead), self._index[s.name].to(vec.device), part)
            else:
                out[s.name] = part
        return out

    def weights(self, model: nn.Module | None = None) -> Float[Tensor, " P"]:
        """The model's current values in the subspace."""
        params = self._params if model is None else dict(model.named_parameters())
        return self.flatten(params)

    def grads(self, model: nn.Module | None = None) -> Float[Tensor, " P"]:
        """The model's ``.grad`` in the subspace (zeros where a parameter has no gradient)."""
        params = self._params if model is None else dict(model.named_parameters())
        return self.flatten({n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in params.items()
                             if n in self._params})

    @torch.no_grad()
    def set_grads(self, vec: Float[Tensor, " P"]) -> None:
        """Write ``vec`` into the selected parts of the parameters' ``.grad`` (other entries untouched)."""
        self._write(vec, grads=True)

    @torch.no_grad()
    def set_weights(self, vec: Float[Tensor, " P"]) -> None:
        """Write ``vec`` into the selected parts of the parameters (other entries untouched)."""
        self._write(vec, grads=False)

    def _write(self, vec: Tensor, grads: bool) -> None:
        self._check_vec(vec)
        for s in self.slices:
            p = self._params[s.name]
            if grads and p.grad is None:
                p.grad = torch.zeros_like(p)
            target = p.grad if grads else p.data
            assert target is not None
            part = vec[s.offset:s.stop].reshape(s.shape).to(target.device, target.dtype)
            if s.heads:
                target.index_copy_(0, self._index[s.name].to(target.device), part)
            else:
                target.copy_(part)

    def _check_vec(self, vec: Tensor, batched: bool = False) -> None:
        ok_ndim = vec.ndim >= 1 if isinstance(vec, Tensor) and batched else isinstance(vec, Tensor) and vec.ndim == 1
        if not ok_ndim or vec.shape[-1] != self.dim:
            shape = tuple(vec.shape) if isinstance(vec, Tensor) else type(vec).__name__
            raise SedLensError(f"expected a vector of the subspace's dimension {self.dim}, got shape {shape}.")

    def check_directions(self, dirs: Tensor) -> Float[Tensor, "n P"]:
        """``dirs`` as an ``[n, P]`` matrix (a single ``[P]`` vector becomes one row)."""
        if isinstance(dirs, Tensor) and dirs.ndim == 1:
            dirs = dirs[None]
        if not isinstance(dirs, Tensor) or dirs.ndim != 2 or dirs.shape[1] != self.dim:
            shape = tuple(dirs.shape) if isinstance(dirs, Tensor) else type(dirs).__name__
            raise SedLensError(f"directions must have shape [n, {self.dim}] (the subspace's dimension), got {shape}.")
        return dirs

    # --- directions and projections ----------------------------------------------------------------------
    def random_directions(self, n: int, generator: torch.Generator | None = None,
                          dtype: torch.dtype = torch.float32) -> Float[Tensor, "n P"]:
        """``n`` independent uniformly random unit vectors (normalised Gaussians)."""
        check(isinstance(n, int) and n >= 1, f"the number of random directions must be a positive integer, got {n!r}.")
        r = torch.randn(n, self.dim, generator=generator, dtype=dtype)
        return r / torch.linalg.vector_norm(r, dim=1, keepdim=True)

    def random_basis(self, k: int, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32) -> Float[Tensor, "k P"]:
        """An orthonormal ``[k, P]`` basis of a uniformly random k-dimensional subspace (QR of a Gaussian)."""
        check(isinstance(k, int) and 1 <= k <= self.dim, f"k must be an integer in 1..{self.dim}, got {k!r}.")
        q, r = torch.linalg.qr(torch.randn(self.dim, k, generator=generator, dtype=dtype))
        return (q * torch.sign(torch.diagonal(r))).T.contiguous()

    def project(self, vec: Tensor, basis: Float[Tensor, "k P"], mode: str = "keep") -> Tensor:
        """``keep``: VᵀV x (the part in the span of the orthonormal rows of ``basis``); ``remove``: (I − VᵀV) x."""
        check(mode in ("keep", "remove"), f"unknown projection mode {mode!r}; choose keep or remove.")
        basis = self.check_directions(basis).to(vec.device, vec.dtype)
        inside = (vec @ basis.T) @ basis
        return inside if mode == "keep" else vec - inside

    def head_view(self, vec: Float[Tensor, " P"]) -> HeadView:
        """Norm of ``vec`` in every (layer, matrix, head) block — which heads a direction lives in."""
        self._check_vec(vec)
        rows: list[tuple[int | None, str | None, int | None, float]] = []
        for s in self.slices:
            part = vec[s.offset:s.stop].reshape(s.shape)
            if s.matrix is not None:
                heads = s.heads if s.heads else tuple(range(s.shape[0]))
                for i, h in enumerate(heads):
                    rows.append((s.layer, s.matrix, h, float(torch.linalg.vector_norm(part[i]))))
            else:
                rows.append((s.layer, s.name, None, float(torch.linalg.vector_norm(part))))
        return HeadView(rows)


def _n_layers(model: nn.Module) -> int:
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "n_layers"):
        return int(cfg.n_layers)
    layers = {int(m.group(1)) for n, _ in model.named_parameters() if (m := re.match(r"blocks\.(\d+)\.", n))}
    check(len(layers) > 0, "the model has no TransformerLens blocks.N parameters.")
    return max(layers) + 1
