"""Configuration dataclasses and the names they choose from, importable without torch.

Command lines build their parsers from these, so ``--help`` and a bad flag answer before torch,
TransformerLens or W&B are imported. Each name is re-exported where it belongs: ``TrainConfig`` from
:mod:`sed_lens.training`; ``Preset``, ``PRESETS``, ``get_preset`` and ``INITS`` from :mod:`sed_lens.models`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sed_lens.errors import SedLensError, check

INITS = ("torch", "tl")
"""Initialisations: ``torch`` (PyTorch defaults of ``nn.TransformerEncoder``) or ``tl`` (TransformerLens)."""


@dataclass(frozen=True)
class Preset:
    """An architecture and the token layout / readout it expects."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    act_fn: str
    layer_norm: bool
    attention_dir: str  # "bidirectional" | "causal"
    layout: str  # token layout of the task, see sed_lens.tasks.LAYOUTS
    readout_position: int
    default_init: str
    description: str


PRESETS: dict[str, Preset] = {
    "xu2026": Preset("xu2026", 2, 128, 4, 32, 256, "gelu", True, "bidirectional", "ab", 0, "torch",
                     "Xu (2026): 2-layer pre-norm encoder, GELU, bidirectional, inputs [a, b], readout at position 0"),
    "nanda2023": Preset("nanda2023", 1, 128, 4, 32, 512, "relu", False, "causal", "ab=", -1, "tl",
                        "Nanda et al. (2023): 1 layer, ReLU, no LayerNorm, causal, inputs [a, b, =], readout at '='"),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise SedLensError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}.")
    return PRESETS[name]



@dataclass
class TrainConfig:
    """Training protocol; the defaults are the paper's (Xu 2026, §2)."""

    steps: int = field(default=8000, metadata={"help": "maximum optimizer steps"})
    batch_size: int = field(default=512, metadata={"help": "train pairs per step, sampled with replacement"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1.0, metadata={"help": "AdamW decoupled weight decay"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.98, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "global gradient-norm clip (0 disables)"})
    eval_every: int = field(default=25, metadata={"help": "evaluate the full train and test splits every N steps"})
    stop_acc: float = field(default=0.98, metadata={"help": "early stop: test accuracy every op must reach"})
    stop_patience: int = field(default=20, metadata={
        "help": "early stop after this many consecutive evals at stop-acc (0 disables)"})
    grok_acc: float = field(default=0.5, metadata={"help": "grok step = first eval with test accuracy at least this"})
    post_grok_steps: int = field(default=0, metadata={
        "help": "keep training past the stop rule until this many steps after test accuracy first reached stop-acc "
                "(the same trajectory continued, so that fully post-grok SED windows exist; 0: stop at the stop rule)"})
    stop_at_grok: bool = field(default=False, metadata={
        "help": "stop at the first eval at which every op has grokked (for experiments that only measure the grok step)"})
    checkpoint_every: int = field(default=500, metadata={"help": "write a resumable checkpoint every N steps (0 disables)"})
    sampler_seed: int | None = field(default=None, metadata={"help": "seed of the batch sampler (default: the task seed)"})
    deterministic: bool = field(default=True, metadata={
        "help": "use PyTorch's deterministic algorithms while training, so reruns are bit-identical"})

    def validate(self) -> None:
        check(self.steps >= 0, f"steps must be non-negative, got {self.steps}.")
        check(self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}.")
        check(self.lr > 0 and math.isfinite(self.lr), f"learning rate must be positive, got {self.lr}.")
        check(self.weight_decay >= 0, f"weight decay must be non-negative, got {self.weight_decay}.")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"betas must lie in [0, 1), got ({self.beta1}, {self.beta2}).")
        check(self.grad_clip >= 0, f"grad clip must be non-negative (0 disables it), got {self.grad_clip}.")
        check(self.eval_every >= 1, f"eval-every must be at least 1, got {self.eval_every}.")
        check(0 < self.stop_acc <= 1, f"stop accuracy must lie in (0, 1], got {self.stop_acc}.")
        check(self.stop_patience >= 0, f"stop patience must be non-negative, got {self.stop_patience}.")
        check(0 < self.grok_acc <= 1, f"grok accuracy must lie in (0, 1], got {self.grok_acc}.")
        check(self.post_grok_steps >= 0, f"post-grok steps must be non-negative, got {self.post_grok_steps}.")
        check(self.checkpoint_every >= 0, f"checkpoint-every must be non-negative, got {self.checkpoint_every}.")



# --- coupling scans ------------------------------------------------------------------------------------------
METHODS = ("jvp", "hvp", "fd")
"""Centroid responses: exact forward-over-reverse (``jvp``) or reverse-over-reverse (``hvp``), or the paper's
central finite difference (``fd``); see :mod:`sed_lens.analysis.coupling`."""
READOUTS = ("correct_logit", "logit_sum")
"""Centroid readouts by name (:mod:`sed_lens.analysis.centroids` also takes a vector or a callable)."""
DEFAULT_SITE = "blocks.0.hook_resid_pre"
"""The paper's centroid site: the input embedding (token + position)."""
ALIGNMENTS = ("trailing", "leading")
"""SED window alignments (:func:`sed_lens.analysis.sed.window_bounds`)."""
SOURCES = ("update", "gradient", "task_gradient")
"""SED sources (:mod:`sed_lens.hooks.capture`)."""
MODES = ("keep", "remove", "none")
"""Subspace projection modes (:mod:`sed_lens.hooks.interventions`)."""
BASES = ("sed", "random")
"""Subspace projection bases by name."""
APPLY_TO = ("gradient", "update")
"""What a subspace projection acts on: the gradient before the optimizer step, or the applied update after it."""


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
    analysis_seeds: int = field(default=1, metadata={
        "help": "analysis seeds: the scan is repeated with the seeds of the gradient batch, the probes and the random "
                "directions shifted by 1, 2, … (extra seeds re-measure the first alignment of each source only)"})
    fd_compare: bool = field(default=False, metadata={
        "help": "also measure the paper's finite difference (at --eps-rel) beside the exact value, on the first "
                "alignment of each source (main analysis seed)"})

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
        check(self.analysis_seeds >= 1, f"analysis seeds must be at least 1, got {self.analysis_seeds}.")
        check(self.eps_rel > 0, f"eps_rel must be positive, got {self.eps_rel}.")
        check(all(w >= 1 for w in self.ablation_windows), "ablation windows must be positive.")
        check(all(e > 0 for e in self.ablation_eps), "ablation ε values must be positive.")
