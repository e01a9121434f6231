"""Coupling along a training trajectory: SED windows around chosen snapshots, R_k at each of them.

Given the model states of a run at every snapshot (every 25 steps in the paper), :func:`scan_coupling`

1. computes the stream vectors at every snapshot — the attention update between consecutive snapshots, the
   gradient on a fixed batch, and per-op gradients for a multitask model (:func:`~sed_lens.hooks.capture.capture_offline`);
2. picks ``n_snapshots`` evenly spaced snapshots (``linspace(0, N-1, n)`` as the paper's code);
3. at each, builds the SED bases of every stream for each window alignment — *leading* (the W entries starting
   at the snapshot, clamped at the end: the paper's code) and *trailing* (the W entries known at the snapshot:
   causal) — and measures the centroid response of all bases and of fresh random directions in one pass;
4. reports R_j = A(v_j) / median A(random), R̄ = mean_j R_j per snapshot, and the peak and final R̄ per stream.

Stream entries and snapshots: a gradient entry i belongs to snapshot i; the update entry j is θ_{j+1} − θ_j
(the paper's ``np.diff``), so the trailing update window at snapshot t ends with entry t−1 and there is none at
t = 0. Optional ablations: other window sizes (k = 1, peak R_1) and finite differences at other ε.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from sed_lens.analysis.centroids import DEFAULT_SITE, READOUTS
from sed_lens.analysis.coupling import METHODS, centroid_response, perturbation_scale, ratios
from sed_lens.analysis.sed import ALIGNMENTS, SEDBasis, sed_over_sequence
from sed_lens.errors import check
from sed_lens.hooks.capture import SOURCES, capture_offline, gradient_batch
from sed_lens.models import model_spec
from sed_lens.subspace import ParamSubspace
from sed_lens.tasks import ModularArithmetic

ARTIFACT_FORMAT = "sed_lens.coupling_snapshot/1"
BASES_FORMAT = "sed_lens.coupling_bases/1"


@dataclass
class ScanConfig:
    """What :func:`scan_coupling` measures; the defaults are the paper's."""

    n_snapshots: int = field(default=40, metadata={"help": "evenly spaced snapshots to measure (paper: 40, multitask 30)"})
    window: int = field(default=20, metadata={"help": "SED window W (snapshots)"})
    k: int = field(default=3, metadata={"help": "SED directions k"})
    aligns: tuple[str, ...] = field(default=("leading", "trailing"), metadata={
        "help": "window alignments: leading (paper's code), trailing (causal)"})
    sources: tuple[str, ...] = field(default=("update", "gradient", "task_gradient"), metadata={
        "help": "SED sources (task_gradient only for a multitask model, where it differs from gradient)"})
    n_probes: int = field(default=1024, metadata={"help": "probe pairs from the whole grid"})
    probe_seed: int = field(default=0, metadata={"help": "seed of the probe set"})
    n_random: int = field(default=20, metadata={"help": "random directions per snapshot (redrawn at each)"})
    random_seed: int = field(default=1, metadata={"help": "seed of the random directions"})
    method: str = field(default="hvp", metadata={
        "help": "centroid response: hvp or jvp (exact, same value; hvp is the faster here) or fd (the paper's finite "
                "difference)", "choices": METHODS})
    eps_rel: float = field(default=0.005, metadata={"help": "finite-difference ε relative to the subspace's weight norm"})
    site: str = field(default=DEFAULT_SITE, metadata={"help": "centroid site (TransformerLens hook name)"})
    readout: str = field(default="correct_logit", metadata={"help": "centroid readout", "choices": READOUTS})
    grad_batch_size: int = field(default=512, metadata={"help": "pairs in the fixed gradient batch"})
    grad_batch_seed: int = field(default=0, metadata={"help": "seed of the fixed gradient batch"})
    grad_batch_split: str = field(default="all", metadata={
        "help": "where the gradient batch comes from: all (the paper's code), train or test", "choices": ("all", "train", "test")})
    ablation_windows: tuple[int, ...] = field(default=(), metadata={
        "help": "window-size ablation on the gradient stream (k=1, peak R_1), e.g. 1,2,5,10,20,40", "cli": False})
    ablation_eps: tuple[float, ...] = field(default=(), metadata={
        "help": "finite-difference ε ablation on the gradient stream, e.g. 0.001,0.005,0.05", "cli": False})
    chunk_size: int = field(default=8, metadata={"help": "directions per vectorised JVP"})

    def validate(self) -> None:
        check(self.n_snapshots >= 1, f"n_snapshots must be at least 1, got {self.n_snapshots}.")
        check(1 <= self.k <= self.window, f"need 1 <= k <= window, got k={self.k}, window={self.window}.")
        bad = [a for a in self.aligns if a not in ALIGNMENTS]
        check(not bad and len(self.aligns) > 0, f"unknown window alignment {', '.join(bad) or '(none)'}.")
        bad = [s for s in self.sources if s not in SOURCES]
        check(not bad and len(self.sources) > 0, f"unknown SED source {', '.join(bad) or '(none)'}.")
        check(self.method in METHODS, f"unknown coupling method {self.method!r}; choose {', '.join(METHODS)}.")
        check(self.readout in READOUTS, f"unknown centroid readout {self.readout!r}; choose {', '.join(READOUTS)}.")
        check(self.n_random >= 1, f"n_random must be at least 1, got {self.n_random}.")
        check(self.eps_rel > 0, f"eps_rel must be positive, got {self.eps_rel}.")
        check(all(w >= 1 for w in self.ablation_windows), "ablation windows must be positive.")
        check(all(e > 0 for e in self.ablation_eps), "ablation ε values must be positive.")


def split_key(key: str) -> tuple[str, str, str]:
    """A measured key of :func:`scan_coupling` as (stream, alignment, variant):
    ``"task_gradient/add/leading/W=5"`` → (``"task_gradient/add"``, ``"leading"``, ``"W=5"``); the variant is ""
    for the main measurement and names an ablation (``W=…``, ``fd_eps=…``) otherwise."""
    parts = key.split("/")
    n = 2 if parts[0] == "task_gradient" else 1
    return "/".join(parts[:n]), parts[n] if len(parts) > n else "", "/".join(parts[n + 1:])


def snapshot_indices(n: int, count: int) -> list[int]:
    """``count`` evenly spaced snapshot indices of ``n`` (``np.linspace(0, n-1, count, dtype=int)``, deduplicated)."""
    return sorted(set(np.linspace(0, n - 1, min(count, n), dtype=int).tolist()))


def random_seed_at(base: int, index: int) -> int:
    """The seed of the random directions at snapshot ``index`` (a fresh draw at every snapshot)."""
    return (base * 1_000_003 + index) % (2**63)


def tensor_digest(t: Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def stream_entry_index(stream: str, snapshot: int, align: str) -> int | None:
    """Index into a stream's entries of the window anchor at ``snapshot`` (None: no such window)."""
    if stream == "update" and align == "trailing":
        return snapshot - 1 if snapshot >= 1 else None
    return snapshot


def scan_coupling(model: HookedTransformer, task: ModularArithmetic, snapshots: Iterable[tuple[int, dict[str, Tensor]]],
                  cfg: ScanConfig | None = None, subspace: ParamSubspace | None = None,
                  artifacts: str | Path | None = None, progress: bool = True,
                  bases_out: dict[str, dict[int, Tensor]] | None = None) -> dict[str, Any]:
    """Measure SED–LCH coupling along a run (see the module docstring); returns a JSON-able dict.

    ``snapshots``: ``(step, state_dict)`` pairs in training order (e.g. a :class:`~sed_lens.hooks.snapshots.SnapshotStore`).
    ``artifacts``: a directory for one ``snapshot_XXXXXX.pt`` per measured snapshot (format in docs/coupling.md).
    ``bases_out``: a dict to fill with the measured SED directions, ``{key: {step: [k, P] float32}}`` (see
    :func:`save_bases`).
    """
    cfg = cfg or ScanConfig()
    cfg.validate()
    subspace = subspace or ParamSubspace.attention(model)
    snaps = list(snapshots)
    check(len(snaps) >= 2, f"a coupling scan needs at least 2 snapshots, got {len(snaps)}.")
    steps = [s for s, _ in snaps]
    multitask = task.multitask
    sources = tuple(s for s in cfg.sources if s != "task_gradient" or multitask)
    capture_sources = tuple(set(sources) | ({"gradient"} if cfg.ablation_windows or cfg.ablation_eps else set()))
    # 1. stream entries at every snapshot
    batch = gradient_batch(task, cfg.grad_batch_size, cfg.grad_batch_seed, cfg.grad_batch_split)
    streams: dict[str, list[Tensor]] = {}
    it = capture_offline(model, task, subspace, snaps, batch, capture_sources)
    for _, vecs in tqdm(it, total=len(snaps), desc="stream vectors", disable=not progress, leave=False):
        for name, v in vecs.items():
            streams.setdefault(name, []).append(v)
    # 2. measured snapshots
    measured = snapshot_indices(len(snaps), cfg.n_snapshots)
    # 3. SED bases per (stream, align[, window])
    bases: dict[str, dict[int, SEDBasis]] = {}
    for name, vecs in streams.items():
        if name == "gradient" and "gradient" not in sources:
            continue
        for align in cfg.aligns:
            anchors = {t: stream_entry_index(name, t, align) for t in measured}
            by_entry = sed_over_sequence(vecs, [a for a in anchors.values() if a is not None], cfg.window, cfg.k, align)
            bases[f"{name}/{align}"] = {t: by_entry[a] for t, a in anchors.items() if a is not None}
    for w in cfg.ablation_windows:
        for align in cfg.aligns:
            by_entry = sed_over_sequence(streams["gradient"], measured, w, 1, align)
            bases[f"gradient/{align}/W={w}"] = {t: by_entry[t] for t in measured}
    if bases_out is not None:
        bases_out.update({k: {steps[t]: b.directions.float() for t, b in by_t.items()} for k, by_t in bases.items()})
    # 4. responses
    probes = task.probes(min(cfg.n_probes, len(task.pairs)), cfg.probe_seed)
    art_dir = Path(artifacts) if artifacts is not None else None
    rows: list[dict[str, Any]] = []
    for t in tqdm(measured, desc="coupling", disable=not progress, leave=False):
        model.load_state_dict(snaps[t][1], strict=False)
        eps = perturbation_scale(model, subspace, cfg.eps_rel)
        seed = random_seed_at(cfg.random_seed, t)
        rand = subspace.random_directions(cfg.n_random, torch.Generator().manual_seed(seed))
        keys = [k for k in bases if t in bases[k]]
        row: dict[str, Any] = {"index": t, "step": steps[t], "eps": eps, "random_seed": seed, "ops": {}}
        for op in task.ops:
            op_keys = [k for k in keys if not k.startswith("task_gradient/") or k.startswith(f"task_gradient/{op}/")]
            dirs = torch.cat([bases[k][t].directions.float() for k in op_keys] + [rand])
            A = centroid_response(model, subspace, dirs, probes, method=cfg.method, eps_rel=cfg.eps_rel,
                                  site=cfg.site, readout=cfg.readout, task=op, chunk_size=cfg.chunk_size)
            A_rand = A[-cfg.n_random:]
            res: dict[str, Any] = {"random": {"A": A_rand.tolist(), "median": float(A_rand.median())}}
            i = 0
            for k in op_keys:
                b = bases[k][t]
                a = A[i:i + b.k]
                i += b.k
                r = ratios(a, A_rand)
                res[k] = {"R": r.tolist(), "R_mean": float(r.mean()), "A": a.tolist(), "rank": b.rank,
                          "sigma": b.singular_values[: b.k + 1].tolist()}
            eps_align = "leading" if "leading" in cfg.aligns else cfg.aligns[0]
            if cfg.ablation_eps and f"gradient/{eps_align}" in bases:
                main = bases[f"gradient/{eps_align}"][t].directions.float()
                for e in cfg.ablation_eps:
                    Af = centroid_response(model, subspace, torch.cat([main, rand]), probes, method="fd", eps_rel=e,
                                           site=cfg.site, readout=cfg.readout, task=op)
                    r = ratios(Af[:-cfg.n_random], Af[-cfg.n_random:])
                    res[f"gradient/{eps_align}/fd_eps={e:g}"] = {"R": r.tolist(), "R_mean": float(r.mean()),
                                                                     "A": Af[:-cfg.n_random].tolist()}
            row["ops"][op] = res
        rows.append(row)
        if art_dir is not None:
            save_artifact(art_dir, model, subspace, t, steps[t], {k: bases[k][t].directions.float() for k in keys},
                          rand, seed, probes, eps, cfg, row)
    return {"config": asdict(cfg), "n_snapshots_total": len(snaps), "steps_all": steps,
            "measured": [steps[t] for t in measured], "snapshots": rows, "summary": summarize(rows, task.ops)}


def summarize(rows: Sequence[dict[str, Any]], ops: Sequence[str]) -> dict[str, Any]:
    """Peak and final R̄ (and peak R_1) of every measured key, per op."""
    out: dict[str, Any] = {}
    for op in ops:
        keys = sorted({k for r in rows for k in r["ops"][op] if k != "random"})
        out[op] = {}
        for k in keys:
            series = [(r["step"], r["ops"][op][k]) for r in rows if k in r["ops"][op]]
            means = [s["R_mean"] for _, s in series]
            r1 = [s["R"][0] for _, s in series]
            ip, i1 = int(np.argmax(means)), int(np.argmax(r1))
            out[op][k] = {"peak_R_mean": means[ip], "peak_step": series[ip][0], "final_R_mean": means[-1],
                          "final_step": series[-1][0], "peak_R1": r1[i1], "peak_R1_step": series[i1][0],
                          "mean_R_mean": float(np.mean(means))}
    return out


def save_artifact(directory: Path, model: HookedTransformer, subspace: ParamSubspace, index: int, step: int,
                  directions: dict[str, Tensor], rand: Tensor, seed: int, probes: tuple[Tensor, Any], eps: float,
                  cfg: ScanConfig, row: dict[str, Any]) -> Path:
    """Everything needed to recompute the R values of one measured snapshot (see docs/coupling.md)."""
    directory.mkdir(parents=True, exist_ok=True)
    tokens, labels = probes
    path = directory / f"snapshot_{step:06d}.pt"
    torch.save({
        "format": ARTIFACT_FORMAT, "step": step, "index": index,
        "model": {"spec": model_spec(model), "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}},
        "subspace": subspace.describe(), "subspace_dim": subspace.dim,
        "directions": directions,
        "random": {"n": rand.shape[0], "seed": seed, "dtype": "float32",
                   "recipe": "ParamSubspace.random_directions(n, torch.Generator().manual_seed(seed)): "
                             "torch.randn(n, P, generator) rows divided by their norms",
                   "sha256": tensor_digest(rand)},
        "probes": {"tokens": tokens, "labels": dict(labels) if isinstance(labels, dict) else labels},
        "eps": eps, "eps_rel": cfg.eps_rel, "method": cfg.method, "site": cfg.site, "readout": cfg.readout,
        "results": row,
    }, path)
    return path


def save_bases(path: str | Path, bases: dict[str, dict[int, Tensor]], summary: dict[str, Any],
               subspace: ParamSubspace, cfg: ScanConfig) -> Path:
    """Save the SED bases of a scan at each main key's peak and final snapshot (``bases`` from
    :func:`scan_coupling`'s ``bases_out``; ablation keys are left out): a few MB instead of every snapshot.

    Format ``sed_lens.coupling_bases/1``: ``bases`` ``{key: {step: [k, P] float32}}``, ``selected``
    ``{op: {key: {"peak": step, "final": step}}}``, ``subspace`` (layout in vector order), ``window``, ``k``.
    """
    selected: dict[str, dict[str, dict[str, int]]] = {}
    keep: dict[str, dict[int, Tensor]] = {}
    for op, keys in summary.items():
        for key, s in keys.items():
            if key not in bases or "/W=" in key:  # finite-difference ablations reuse the main directions
                continue
            selected.setdefault(op, {})[key] = {"peak": s["peak_step"], "final": s["final_step"]}
            for step in (s["peak_step"], s["final_step"]):
                keep.setdefault(key, {})[step] = bases[key][step]
    path = Path(path)
    torch.save({"format": BASES_FORMAT, "window": cfg.window, "k": cfg.k, "subspace": subspace.describe(),
                "subspace_dim": subspace.dim, "selected": selected, "bases": keep}, path)
    return path


def recompute_artifact(path: str | Path, method: str | None = None) -> dict[str, dict[str, list[float]]]:
    """Recompute every R stored in one coupling artifact from its contents alone.

    Rebuilds the model from its TransformerLens config and state, regenerates the random directions from their
    seed (and checks their SHA-256), and measures the stored directions on the stored probes with the stored ε,
    site and readout. Returns ``{op: {key: R list}}`` for the keys measured with the artifact's method.
    """
    from transformer_lens import HookedTransformerConfig

    from sed_lens.models import Readout, new_hooked_transformer

    art = torch.load(path, map_location="cpu", weights_only=False)
    check(isinstance(art, dict) and art.get("format") == ARTIFACT_FORMAT, f"{path} is not a sed_lens coupling artifact.")
    cfg = HookedTransformerConfig(**{k: v for k, v in art["model"]["spec"]["cfg"].items()
                                     if k in HookedTransformerConfig.__dataclass_fields__ and k not in ("dtype", "device")})
    model = new_hooked_transformer(cfg)
    model.load_state_dict(art["model"]["state_dict"])
    r = art["model"]["spec"]["readout"]
    model.sed_readout = Readout(r["position"], tuple(r["ops"]), r["n_classes"])  # type: ignore[assignment]
    subspace = ParamSubspace(model, [(s["name"], s["heads"]) for s in art["subspace"]])
    rand = subspace.random_directions(art["random"]["n"], torch.Generator().manual_seed(art["random"]["seed"]))
    check(tensor_digest(rand) == art["random"]["sha256"], "the regenerated random directions differ from the stored ones.")
    method = method or art["method"]
    probes = (art["probes"]["tokens"], art["probes"]["labels"])
    out: dict[str, dict[str, list[float]]] = {}
    for op, res in art["results"]["ops"].items():
        keys = [k for k in res if k in art["directions"]]
        dirs = torch.cat([art["directions"][k] for k in keys] + [rand])
        A = centroid_response(model, subspace, dirs, probes, method=method, eps_rel=art["eps_rel"], site=art["site"],
                              readout=art["readout"], task=op)
        A_rand, i = A[-len(rand):], 0
        out[op] = {}
        for k in keys:
            n = art["directions"][k].shape[0]
            out[op][k] = ratios(A[i:i + n], A_rand).tolist()
            i += n
    return out
