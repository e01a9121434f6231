"""Spectral-edge directions (SED): top right singular vectors of a rolling window of vectors.

Stack the last ``window`` vectors (attention updates, gradients or per-task gradients) as the rows of
X ∈ R^{W×P}; the SED directions are the top-k right singular vectors of X (no mean-centring). With P ≫ W they
come from the W×W Gram matrix G = X Xᵀ = U Λ Uᵀ: σ_j = √λ_j and v_j = X ᵀ u_j / σ_j, exactly as an SVD of X but
without ever decomposing a W×P matrix. :class:`RollingSED` keeps G up to date as vectors arrive — one push costs
W dot products, O(W·P) — so memory is O(W·P) however long training runs.

Window alignment: :class:`RollingSED` is causal (the trailing window of the W vectors ending now). The paper's
code uses the *leading* window (the W vectors starting at snapshot t, clamped to end at the last snapshot);
:func:`window_bounds` and :func:`sed_over_sequence` give both over a stored sequence.

Sign convention: v_j is oriented so that the window's rows have a positive sum of projections on it
(Σ_i ⟨x_i, v_j⟩ > 0, i.e. it points along the window's net drift); if that sum vanishes, the largest-magnitude
coordinate of v_j is made positive.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from sed_lens.configs import ALIGNMENTS
from sed_lens.errors import SedLensError, check


@dataclass
class SEDBasis:
    """A computed SED basis: ``directions`` [k, P] (unit rows; zero rows beyond ``rank``) and the spectrum."""

    directions: Float[Tensor, "k P"]
    singular_values: Float[Tensor, " n"]  # all σ of the window, descending
    rank: int  # numerical rank of the window
    n_vectors: int  # vectors in the window

    @property
    def k(self) -> int:
        return self.directions.shape[0]

    @property
    def rank_deficient(self) -> bool:
        """The window has fewer than k independent vectors: the missing directions are zero rows."""
        return self.rank < self.k

    def gaps(self) -> Float[Tensor, " k"]:
        """Gap ratios σ_j/σ_{j+1}, j = 1..k (inf where σ_{j+1} = 0, nan where σ_j = 0)."""
        s = torch.zeros(self.k + 1, dtype=self.singular_values.dtype)
        n = min(len(self.singular_values), self.k + 1)
        s[:n] = self.singular_values[:n]
        with torch.no_grad():
            return s[:-1] / s[1:]


class RollingSED:
    """Top-k right singular vectors of the last ``window`` pushed vectors, with an incremental Gram matrix.

    Args:
        window: W, the number of most recent vectors kept (≥ 1).
        k: directions returned (1 ≤ k ≤ W).
        dtype: precision of the stored window (float32 by default; the Gram matrix and its eigendecomposition
            are always float64).
        rtol: singular values below ``rtol · σ_1`` count as zero (rank deficiency). Default: 2e-3 for a float32
            window (the float32 dot products leave numerically-zero σ near 5e-4·σ_1), 1e-6 for float64.
        track_overlap: keep the basis from before each push, so :meth:`overlap` compares consecutive bases
            (costs one :meth:`directions` per push).
    """

    def __init__(self, window: int = 20, k: int = 3, rtol: float | None = None, dtype: torch.dtype = torch.float32,
                 track_overlap: bool = False) -> None:
        check(isinstance(window, int) and window >= 1, f"window must be a positive integer, got {window!r}.")
        check(isinstance(k, int) and k >= 1, f"k must be a positive integer, got {k!r}.")
        check(k <= window, f"k={k} directions need a window of at least k vectors, got window={window}.")
        if rtol is None:
            rtol = 2e-3 if dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-6
        self.window, self.k, self.rtol, self.dtype = window, k, rtol, dtype
        self.track_overlap = track_overlap
        self.reset()

    def reset(self) -> None:
        """Empty the window (the settings stay)."""
        self._x: Tensor | None = None  # [W, P] ring buffer
        self._g = torch.zeros(self.window, self.window, dtype=torch.float64)  # Gram matrix of the ring buffer slots
        self._next = 0  # slot the next push overwrites
        self.n_pushed = 0
        self._cache: SEDBasis | None = None
        self.previous: Tensor | None = None  # basis before the last push (for overlap)

    # --- state -------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int | None:
        return None if self._x is None else self._x.shape[1]

    @property
    def n(self) -> int:
        """Vectors currently in the window (≤ window)."""
        return min(self.n_pushed, self.window)

    @property
    def full(self) -> bool:
        return self.n_pushed >= self.window

    def _order(self) -> Tensor:
        """Ring slots in chronological order (oldest first)."""
        if self.n_pushed < self.window:
            return torch.arange(self.n_pushed)
        return (torch.arange(self.window) + self._next) % self.window

    def vectors(self) -> Float[Tensor, "n P"]:
        """The window's vectors, oldest first."""
        check(self._x is not None, "the window is empty: push a vector first.")
        assert self._x is not None
        return self._x[self._order()]

    def gram(self) -> Float[Tensor, "n n"]:
        """The Gram matrix X Xᵀ of the window, oldest first (maintained incrementally)."""
        o = self._order()
        return self._g[o][:, o]

    # --- updates -----------------------------------------------------------------------------------------
    def push(self, vec: Float[Tensor, " P"]) -> None:
        """Add a vector, dropping the oldest if the window is full. Costs W dot products."""
        if not isinstance(vec, Tensor) or vec.ndim != 1:
            got = tuple(vec.shape) if isinstance(vec, Tensor) else type(vec).__name__
            raise SedLensError(f"push expects a flat [P] vector, got {got}.")
        if self._x is None:
            self._x = torch.zeros(self.window, vec.shape[0], dtype=self.dtype, device=vec.device)
        elif vec.shape[0] != self._x.shape[1]:
            raise SedLensError(f"push expects vectors of dimension {self._x.shape[1]}, got {vec.shape[0]}.")
        v = vec.detach().to(device=self._x.device, dtype=self.dtype)  # the window's device (CPU after a resume)
        if not bool(torch.isfinite(torch.dot(v, v))):  # any NaN/inf entry (or overflow) shows up here
            raise SedLensError("cannot push a vector with NaN or inf entries into the SED window.")
        if self.track_overlap and self.n_pushed > 0:
            self.previous = self.basis().directions
        slot = self._next
        self._x[slot] = v
        row = (self._x @ v).cpu().to(torch.float64)  # unfilled slots are zero rows, so their entries are 0
        self._g[slot, :] = row
        self._g[:, slot] = row
        self._next = (slot + 1) % self.window
        self.n_pushed += 1
        self._cache = None

    # --- results -----------------------------------------------------------------------------------------
    def basis(self) -> SEDBasis:
        """Directions and spectrum of the current window (cached until the next push)."""
        if self._cache is None:
            check(self.n_pushed > 0 and self._x is not None, "the window is empty: push a vector first.")
            assert self._x is not None
            # Slot order is irrelevant to the decomposition (a permutation of the rows), so read the ring as is.
            if self.full:
                self._cache = basis_from_gram(self._g, self._x, self.k, self.rtol)
            else:
                n = self.n_pushed
                self._cache = basis_from_gram(self._g[:n, :n], self._x[:n], self.k, self.rtol)
        return self._cache

    def directions(self) -> Float[Tensor, "k P"]:
        """Top-k right singular vectors of the window, as unit rows (zero rows if the window's rank < k)."""
        return self.basis().directions

    def singular_values(self) -> Float[Tensor, " n"]:
        """All singular values of the window, descending."""
        return self.basis().singular_values

    def gaps(self) -> Float[Tensor, " k"]:
        """σ_j/σ_{j+1} for j = 1..k."""
        return self.basis().gaps()

    @property
    def rank_deficient(self) -> bool:
        return self.basis().rank_deficient

    def overlap(self) -> float | None:
        """Mean squared cosine of the principal angles between this basis and the one before the last push
        (``None`` without ``track_overlap`` or before the second push)."""
        if self.previous is None or self.n_pushed < 2:
            return None
        return subspace_overlap(self.previous, self.directions())

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "k": self.k, "x": self._x, "g": self._g, "next": self._next,
                "n_pushed": self.n_pushed, "previous": self.previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._x, self._g = state["x"], state["g"]
        self._next, self.n_pushed = int(state["next"]), int(state["n_pushed"])
        self.previous = state["previous"]
        self._cache = None


def basis_from_gram(gram: Float[Tensor, "n n"], x: Float[Tensor, "n P"], k: int, rtol: float = 2e-3) -> SEDBasis:
    """Top-k right singular vectors of ``x`` from its Gram matrix ``gram = x xᵀ`` (eigendecomposition).

    v_j = xᵀ u_j / σ_j with the sign convention folded into u_j, so the only pass over ``x`` is one
    ``[k, n] × [n, P]`` product.
    """
    evals, evecs = torch.linalg.eigh(gram.to(torch.float64))
    evals, evecs = evals.flip(0), evecs.flip(1)  # descending
    sigma = evals.clamp_min(0).sqrt()
    rank = int((sigma > rtol * float(sigma[0])).sum()) if float(sigma[0]) > 0 else 0
    kk = min(k, rank)
    if kk == 0:
        return SEDBasis(torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device), sigma, rank, x.shape[0])
    u = evecs[:, :kk]
    drift = u.sum(0)  # Σ_i ⟨x_i, v_j⟩ = σ_j Σ_i u_ij
    sign = torch.sign(drift)
    ambiguous = drift.abs() <= 1e-6 * u.abs().sum(0)
    sign[ambiguous] = 1.0
    v = ((u * (sign / sigma[:kk])).T).to(x.dtype).to(x.device) @ x  # [kk, P], unit rows up to rounding
    # Near the rank cut-off (σ_j ≈ rtol·σ_1) float32 Gram entries leave ‖v_j‖ off 1 by up to ~1%: renormalise.
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    if bool(ambiguous.any()):
        v[ambiguous] = orient_by_largest(v[ambiguous])
    if kk < k:
        v = torch.cat([v, torch.zeros(k - kk, x.shape[1], dtype=x.dtype, device=x.device)])
    return SEDBasis(v, sigma, rank, x.shape[0])


def orient_by_largest(v: Float[Tensor, "k P"]) -> Float[Tensor, "k P"]:
    """Flip rows so that each row's largest-magnitude coordinate is positive."""
    sign = torch.sign(v.gather(1, v.abs().argmax(1, keepdim=True)).squeeze(1))
    return v * torch.where(sign == 0, torch.ones_like(sign), sign)[:, None]


def subspace_overlap(a: Float[Tensor, "k P"], b: Float[Tensor, "k P"]) -> float:
    """Mean cos² of the principal angles between the row spaces of two orthonormal bases (1 = same span).

    Zero rows (a rank-deficient basis) are ignored; two empty bases overlap 0.
    """
    a = a[torch.linalg.vector_norm(a, dim=1) > 0]
    b = b[torch.linalg.vector_norm(b, dim=1) > 0]
    if len(a) == 0 or len(b) == 0:
        return 0.0
    cos = torch.linalg.svdvals(a.cpu().to(torch.float64) @ b.cpu().to(torch.float64).T).clamp(0, 1)  # MPS: no float64
    return float((cos**2).sum() / max(len(a), len(b)))


def principal_angles(a: Float[Tensor, "k P"], b: Float[Tensor, "k P"]) -> Float[Tensor, " k"]:
    """Principal angles (radians, ascending) between the row spaces of two orthonormal bases."""
    cos = torch.linalg.svdvals(a.to(torch.float64) @ b.to(torch.float64).T).clamp(-1, 1)
    return torch.arccos(cos)


def window_bounds(t: int, n: int, window: int, align: str = "trailing") -> tuple[int, int]:
    """``[start, stop)`` of the window at entry ``t`` of a sequence of ``n``: trailing = the W entries ending at t;
    leading = the W entries starting at t, clamped to end at the last entry (the paper's code; t ≥ n allowed)."""
    check(align in ALIGNMENTS, f"unknown window alignment {align!r}; choose {' or '.join(ALIGNMENTS)}.")
    check(n >= 1 and 0 <= t and (t < n or align == "leading"), f"index {t} is outside the sequence 0..{n - 1}.")
    if align == "trailing":
        return max(0, t - window + 1), t + 1
    start = max(0, min(t, n - window))
    return start, min(n, start + window)


def sed_over_sequence(vectors: Sequence[Tensor] | Tensor, indices: Iterable[int], window: int = 20, k: int = 3,
                      align: str = "trailing", rtol: float | None = None) -> dict[int, SEDBasis]:
    """SED bases at ``indices`` of a stored sequence of vectors, for either window alignment.

    One streaming pass with :class:`RollingSED`: each window ``[start, stop)`` is read off the rolling Gram
    matrix when the stream reaches ``stop`` (memory O(W·P) beyond the sequence itself).
    """
    return dict(iter_sed_over_sequence(vectors, indices, window, k, align, rtol))


def iter_sed_over_sequence(vectors: Sequence[Tensor] | Tensor, indices: Iterable[int], window: int = 20, k: int = 3,
                           align: str = "trailing", rtol: float | None = None) -> Iterator[tuple[int, SEDBasis]]:
    """:func:`sed_over_sequence` as a stream of ``(index, basis)`` pairs in increasing index order (a window's end
    never decreases with its index, for either alignment), each yielded as soon as the pass reaches the end of its
    window: a caller that consumes them as they come holds one basis at a time instead of all of them."""
    n = len(vectors)
    sed_pass = SEDPass(n, indices, window, k, align, rtol)
    for i in range(sed_pass.needed):
        yield from sed_pass.push(vectors[i])


class SEDPass:
    """The windows of one sequence of ``n`` vectors at ``indices`` (either alignment, as :func:`window_bounds`),
    computed as the vectors arrive one at a time: :meth:`push` takes the next vector and returns the ``(index,
    basis)`` pairs whose window it completes. Push-driven, so one producer can feed every pass that reads the same
    sequence as it computes each vector, without the sequence ever being stored (``needed``: how many vectors the
    pass reads; pushes past that are ignored)."""

    def __init__(self, n: int, indices: Iterable[int], window: int = 20, k: int = 3, align: str = "trailing",
                 rtol: float | None = None, dtype: torch.dtype | None = None) -> None:
        self.wanted: dict[int, list[int]] = {}
        for t in sorted(set(int(i) for i in indices)):
            _, stop = window_bounds(t, n, window, align)
            self.wanted.setdefault(stop, []).append(t)
        self.needed = max(self.wanted) if self.wanted else 0
        self.pushed = 0
        self.window, self.k, self.rtol, self.dtype = window, k, rtol, dtype  # dtype None: the first vector's
        self._sed: RollingSED | None = None

    @property
    def done(self) -> bool:
        return self.pushed >= self.needed

    def push(self, vec: Float[Tensor, " P"]) -> list[tuple[int, SEDBasis]]:
        """Take the next vector; the ``(index, basis)`` pairs whose window ends with it."""
        if self.done:
            return []
        if self._sed is None:
            self._sed = RollingSED(self.window, self.k, self.rtol, dtype=self.dtype or vec.dtype)
        sed = self._sed
        sed.push(vec)
        self.pushed += 1
        return [(t, sed.basis()) for t in self.wanted.get(self.pushed, [])]
