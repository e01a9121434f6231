"""Configuration dataclasses and the names they choose from, importable without torch.

Command lines build their parsers from these, so ``--help`` and a bad flag answer before torch,
TransformerLens or W&B are imported. Each name is re-exported where it belongs: ``TrainConfig`` from
:mod:`sed_lens.training`; ``Preset``, ``PRESETS``, ``get_preset`` and ``INITS`` from :mod:`sed_lens.models`.

Every config is a dataclass deriving from :class:`Config`: constructing one checks each value against its
annotation (a ``Literal`` annotation is the list of choices, which the command lines offer as ``choices``) and
then runs :meth:`Config.validate`; a bad value raises one :class:`SedLensError` sentence naming the flag. (Only
what needs torch or the machine — whether an op is registered, whether a device is there — waits until a run
starts.) The experiment configs are composed from shared pieces, each
declaring its fields, help and checks once: :class:`ModelOptions` (task and model), :class:`TrackingOptions`
(W&B and progress bars: where a run is logged, not what it computes) and :class:`GridOptions` (where a grid's
runs execute). They are mixed in by inheritance, so flags and ``config.json`` stay flat.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, get_args, get_origin

from sed_lens.devices import DEVICES
from sed_lens.errors import SedLensError, check

# --- choices: one Literal each, the runtime tuples derived from it ----------------------------------------------
PresetName = Literal["xu2026", "nanda2023"]
"""Model presets (the keys of :data:`PRESETS`)."""
Init = Literal["torch", "tl"]
INITS: tuple[str, ...] = get_args(Init)
"""Initialisations: ``torch`` (PyTorch defaults of ``nn.TransformerEncoder``) or ``tl`` (TransformerLens)."""
WandbMode = Literal["offline", "online", "disabled"]
WANDB_MODES: tuple[str, ...] = get_args(WandbMode)
"""W&B modes (the same as :data:`sed_lens.tracking.WANDB_MODES`)."""
Backend = Literal["local", "ray"]
BACKENDS: tuple[str, ...] = get_args(Backend)
"""Grid backends (the same as :data:`sed_lens.grid.BACKENDS`)."""


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
    default_init: Init
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


@dataclass(frozen=True)
class SequencePreset:
    """An attention-only causal architecture for a sequence task (:class:`sed_lens.task.SequenceTask`): the
    task fixes vocabulary, context and the readout positions; the preset the rest."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    layer_norm: bool
    description: str


SEQUENCE_PRESETS: dict[str, SequencePreset] = {
    "olsson2022": SequencePreset("olsson2022", 2, 64, 4, 16, True,
                                 "Olsson et al. (2022): 2-layer attention-only causal transformer (LayerNorm, "
                                 "learned positions), logits read at the task's readout positions"),
}
"""Presets for sequence tasks (the induction task); :data:`PRESETS` holds the modular-arithmetic ones."""


def get_sequence_preset(name: str) -> SequencePreset:
    if name not in SEQUENCE_PRESETS:
        raise SedLensError(f"unknown preset {name!r}; choose from {', '.join([*PRESETS, *SEQUENCE_PRESETS])}.")
    return SEQUENCE_PRESETS[name]


# --- checking values against annotations ------------------------------------------------------------------------
def flag(name: str) -> str:
    """The command-line flag of a config field: ``train_frac`` → ``--train-frac``."""
    return f"--{name.replace('_', '-')}"


def _literal(tp: Any) -> tuple[Any, ...] | None:
    """The choices of ``Literal[...]`` or ``Literal[...] | None``; None for any other annotation."""
    if get_origin(tp) is Literal:
        return get_args(tp)
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _literal(args[0])
    return None


def _tuple_item(tp: Any) -> Any:
    """The item annotation of ``tuple[X, ...]`` (also inside ``| None``); None for any other annotation."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        inner = [_tuple_item(a) for a in get_args(tp) if a is not type(None)]
        return inner[0] if len(inner) == 1 else None
    args = get_args(tp)
    return args[0] if get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis else None


def fits(tp: Any, value: Any) -> bool:
    """Whether ``value`` has the type the annotation ``tp`` names (``bool`` is no integer; an integer is a number)."""
    origin = get_origin(tp)
    if tp is Any:
        return True
    if value is None or tp is type(None):
        return value is None and (tp is type(None) or type(None) in get_args(tp))
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return any(fits(a, value) for a in get_args(tp))
    if origin is tuple:
        item = _tuple_item(tp)
        if item is not None:
            return isinstance(value, tuple) and all(fits(item, v) for v in value)
        args = get_args(tp)
        return isinstance(value, tuple) and len(value) == len(args) and all(map(fits, args, value))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def describe(tp: Any) -> str:
    """The annotation ``tp`` in words, for error messages: ``int | None`` → ``an integer or None``."""
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, get_args(tp)))
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return " or ".join(map(describe, args)) + (" or None" if len(args) < len(get_args(tp)) else "")
    item = _tuple_item(tp)
    if item is not None:
        return f"a list (each item {describe(item)})"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    return f"a {tp.__name__}" if isinstance(tp, type) else str(tp)


_HINTS: dict[type, dict[str, Any]] = {}


def type_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config dataclass, inherited fields included (cached)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _bad_value(f: dataclasses.Field[Any], tp: Any, value: Any) -> str:
    """One sentence on why ``value`` does not fit the field ``f`` (annotation ``tp``), naming its flag."""
    where = f" ({flag(f.name)})" if f.metadata.get("cli", True) else ""
    what = f.metadata.get("what", f.name.replace("_", " "))
    choices, item = _literal(tp), _tuple_item(tp)
    if choices is not None and isinstance(value, str):
        return f"unknown {what} {value!r}{where}; choose {', '.join(map(str, choices))}."
    item_choices = _literal(item) if item is not None else None
    if item_choices is not None and isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        bad = [v for v in value if v not in item_choices]
        return f"unknown {what} {', '.join(bad)}{where}; choose from {', '.join(map(str, item_choices))}."
    return f"{f.name} must be {describe(tp)}, got {value!r}{where}."


class Config:
    """Base of the config dataclasses: construction checks every value, then :meth:`validate`.

    A field's annotation says what it holds — ``int``, ``float``, ``str``, ``bool``, ``X | None``, ``tuple[X, ...]``
    (a list is taken as a tuple), a ``Literal`` of choices, a nested config — and a value of another type is a
    :class:`SedLensError`. A field's ``metadata`` gives its command-line ``help`` (and ``what``: what it is called
    in error messages, e.g. "coupling method"). Subclasses and the pieces an experiment config is composed of
    extend :meth:`validate`, each checking its own fields and calling ``super().validate()``.
    """

    if typing.TYPE_CHECKING:  # every Config is a dataclass: tell the type checker (dataclasses.fields takes it)
        __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    later_options: ClassVar[tuple[str, ...]] = ()
    """Options added after results were kept: :meth:`to_dict` leaves them out while they hold their default."""

    def to_dict(self) -> dict[str, Any]:
        """``dataclasses.asdict(self)`` (nested configs too) without the :attr:`later_options` that hold their
        default: the config of a run that does not use a later option is the one written before it existed, so
        finished runs (matched by their config) and a scan's cached responses (by a fingerprint of it) stay valid.
        This is what run directories, grid cells and checkpoints record."""
        flat = dataclasses.asdict(self)
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in self.later_options and value == f.default:
                continue
            out[f.name] = value.to_dict() if isinstance(value, Config) else flat[f.name]
        return out

    def __post_init__(self) -> None:
        hints = type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list) and _tuple_item(hints[f.name]) is not None:
                object.__setattr__(self, f.name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`SedLensError` unless every value is valid. Runs on construction; call it again after
        changing a field in place. This base checks each value against its annotation (choices included) and
        validates the nested configs; subclasses add their checks after ``super().validate()``."""
        hints = type_hints(type(self))
        for f in fields(self):
            value, tp = getattr(self, f.name), hints[f.name]
            if not fits(tp, value):
                raise SedLensError(_bad_value(f, tp, value))
            if isinstance(value, Config):
                value.validate()


@dataclass
class TrainConfig(Config):
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
    compile: bool = field(default=False, metadata={
        "help": "compile the training step's forward and backward with torch.compile (needs a C++ compiler): "
                "about 1.5x faster steps on CPU after a one-off compile (about a minute, then cached on disk); reruns "
                "stay bit-identical, but a compiled run rounds differently from an eager one"})

    later_options: ClassVar[tuple[str, ...]] = ("compile",)

    def validate(self) -> None:
        super().validate()
        check(self.steps >= 0, f"steps must be non-negative, got {self.steps} (--steps).")
        check(self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size} (--batch-size).")
        check(self.lr > 0 and math.isfinite(self.lr), f"learning rate must be positive, got {self.lr} (--lr).")
        check(self.weight_decay >= 0, f"weight decay must be non-negative, got {self.weight_decay} (--weight-decay).")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
              f"betas must lie in [0, 1), got ({self.beta1}, {self.beta2}) (--beta1, --beta2).")
        check(self.grad_clip >= 0, f"grad clip must be non-negative (0 disables it), got {self.grad_clip} (--grad-clip).")
        check(self.eval_every >= 1, f"eval-every must be at least 1, got {self.eval_every} (--eval-every).")
        check(0 < self.stop_acc <= 1, f"stop accuracy must lie in (0, 1], got {self.stop_acc} (--stop-acc).")
        check(self.stop_patience >= 0, f"stop patience must be non-negative, got {self.stop_patience} (--stop-patience).")
        check(0 < self.grok_acc <= 1, f"grok accuracy must lie in (0, 1], got {self.grok_acc} (--grok-acc).")
        check(self.post_grok_steps >= 0,
              f"post-grok steps must be non-negative, got {self.post_grok_steps} (--post-grok-steps).")
        check(self.checkpoint_every >= 0,
              f"checkpoint-every must be non-negative, got {self.checkpoint_every} (--checkpoint-every).")



# --- coupling scans ------------------------------------------------------------------------------------------
Method = Literal["jvp", "hvp", "fd"]
METHODS: tuple[str, ...] = get_args(Method)
"""Centroid responses: exact forward-over-reverse (``jvp``) or reverse-over-reverse (``hvp``), or the paper's
central finite difference (``fd``); see :mod:`sed_lens.analysis.coupling`."""
Readout = Literal["correct_logit", "logit_sum"]
READOUTS: tuple[str, ...] = get_args(Readout)
"""Centroid readouts by name (:mod:`sed_lens.analysis.centroids` also takes a vector or a callable)."""
DEFAULT_SITE = "blocks.0.hook_resid_pre"
"""The paper's centroid site: the input embedding (token + position)."""
Alignment = Literal["trailing", "leading"]
ALIGNMENTS: tuple[str, ...] = get_args(Alignment)
"""SED window alignments (:func:`sed_lens.analysis.sed.window_bounds`)."""
Source = Literal["update", "gradient", "task_gradient"]
SOURCES: tuple[str, ...] = get_args(Source)
"""SED sources (:mod:`sed_lens.analysis.streams`)."""
Mode = Literal["keep", "remove", "none"]
MODES: tuple[str, ...] = get_args(Mode)
"""Subspace projection modes (:mod:`sed_lens.hooks.interventions`)."""
BasisName = Literal["sed", "random"]
BASES: tuple[str, ...] = get_args(BasisName)
"""Subspace projection bases by name."""
ApplyTo = Literal["gradient", "update"]
APPLY_TO: tuple[str, ...] = get_args(ApplyTo)
"""What a subspace projection acts on: the gradient before the optimizer step, or the applied update after it."""
GradBatchSplit = Literal["all", "train", "test"]
"""Where the fixed gradient batch of a coupling scan comes from."""


@dataclass
class ScanConfig(Config):
    """What :func:`scan_coupling` measures; the defaults are the paper's."""

    n_snapshots: int = field(default=40, metadata={"help": "evenly spaced snapshots to measure (paper: 40, multitask 30)"})
    window: int = field(default=20, metadata={"help": "SED window W (snapshots)"})
    k: int = field(default=3, metadata={"help": "SED directions k"})
    aligns: tuple[Alignment, ...] = field(default=("leading", "trailing"), metadata={
        "help": "window alignments: leading (paper's code), trailing (causal)", "what": "window alignment"})
    sources: tuple[Source, ...] = field(default=("update", "gradient", "task_gradient"), metadata={
        "help": "SED sources (task_gradient only for a multitask model, where it differs from gradient)",
        "what": "SED source"})
    n_probes: int = field(default=1024, metadata={"help": "probe pairs from the whole grid"})
    probe_seed: int = field(default=0, metadata={"help": "seed of the probe set"})
    n_random: int = field(default=20, metadata={"help": "random directions per snapshot (redrawn at each)"})
    random_seed: int = field(default=1, metadata={"help": "seed of the random directions"})
    method: Method = field(default="hvp", metadata={
        "help": "centroid response: hvp or jvp (exact, same value; hvp is the faster here) or fd (the paper's finite "
                "difference)", "what": "coupling method"})
    eps_rel: float = field(default=0.005, metadata={"help": "finite-difference ε relative to the subspace's weight norm"})
    site: str = field(default=DEFAULT_SITE, metadata={"help": "centroid site (TransformerLens hook name)"})
    readout: Readout = field(default="correct_logit", metadata={"help": "centroid readout", "what": "centroid readout"})
    grad_batch_size: int = field(default=512, metadata={"help": "pairs in the fixed gradient batch"})
    grad_batch_seed: int = field(default=0, metadata={"help": "seed of the fixed gradient batch"})
    grad_batch_split: GradBatchSplit = field(default="all", metadata={
        "help": "where the gradient batch comes from: all (the paper's code), train or test",
        "what": "gradient batch split"})
    ablation_windows: tuple[int, ...] = field(default=(), metadata={
        "help": "window-size ablation on the gradient stream (k=1, peak R_1), e.g. 1,2,5,10,20,40", "cli": False})
    ablation_eps: tuple[float, ...] = field(default=(), metadata={
        "help": "finite-difference ε ablation on the gradient stream, e.g. 0.001,0.005,0.05", "cli": False})
    chunk_size: int = field(default=8, metadata={
        "help": "directions per vectorised response call (on a CPU, hvp and fd may take fewer: see "
                "sed_lens.analysis.coupling.CPU_DIRECTION_PROBES)"})
    analysis_seeds: int = field(default=1, metadata={
        "help": "analysis seeds: the scan is repeated with the seeds of the gradient batch, the probes and the random "
                "directions shifted by 1, 2, … (extra seeds re-measure the first alignment of each source only)"})
    fd_compare: bool = field(default=False, metadata={
        "help": "also measure the paper's finite difference (at --eps-rel) beside the exact value, on the first "
                "alignment of each source (main analysis seed)"})
    per_op_inputs: bool = field(default=False, metadata={
        "help": "multitask only: also measure the scan with the author's per-op conventions, beside the standard "
                "one (one gradient batch and probe set shared by all ops): per op its own gradient batch "
                "(--grad-batch-size pairs) for its task_gradient SED and its own probe set (--n-probes) for every key "
                "(update, gradient, task_gradient), drawn as a single-op task of that op would draw them (pairs from "
                "0..p-1, from 1..p-1 for mul only); first alignment, keys SOURCE[/OP]/ALIGN/per_op"})

    later_options: ClassVar[tuple[str, ...]] = ("per_op_inputs",)

    def validate(self) -> None:
        super().validate()  # the choices of method, readout, aligns and sources are checked on construction
        check(self.n_snapshots >= 1, f"n_snapshots must be at least 1, got {self.n_snapshots} (--n-snapshots).")
        check(1 <= self.k <= self.window, f"need 1 <= k <= window, got k={self.k}, window={self.window} (--k, --window).")
        check(len(self.aligns) > 0, "name at least one window alignment (--aligns).")
        check(len(self.sources) > 0, "name at least one SED source (--sources).")
        check(self.n_probes >= 1, f"n_probes must be at least 1, got {self.n_probes} (--n-probes).")
        check(self.n_random >= 1, f"n_random must be at least 1, got {self.n_random} (--n-random).")
        check(self.analysis_seeds >= 1, f"analysis seeds must be at least 1, got {self.analysis_seeds} (--analysis-seeds).")
        check(self.eps_rel > 0, f"eps_rel must be positive, got {self.eps_rel} (--eps-rel).")
        check(self.grad_batch_size >= 1, f"grad batch size must be at least 1, got {self.grad_batch_size} (--grad-batch-size).")
        check(self.chunk_size >= 1, f"chunk size must be at least 1, got {self.chunk_size} (--chunk-size).")
        check(all(w >= 1 for w in self.ablation_windows), "ablation windows must be positive.")
        check(all(e > 0 for e in self.ablation_eps), "ablation ε values must be positive.")


# --- the pieces the experiment configs are composed of ------------------------------------------------------------
# Each declares its fields, their help and their checks once; an experiment config inherits the pieces it needs
# (``class GrokkingConfig(ModelOptions, TrackingOptions)``), so its flags and its config.json stay flat.
# ``cli_group`` titles the piece's flags in ``--help``.
@dataclass(kw_only=True)
class ModelOptions(Config):
    """The task and the model of a run: modulus, train split, preset, initialisation, device."""

    cli_group: ClassVar[str] = "task and model"

    p: int = field(default=97, metadata={"help": "modulus"})
    preset: PresetName = field(default="xu2026", metadata={"help": "model preset"})
    init: Init | None = field(default=None, metadata={
        "help": "initialisation: torch (PyTorch defaults of nn.TransformerEncoder; the paper's, so step counts "
                "compare with it) or tl (TransformerLens; groks several times sooner, compare only ratios); "
                "default: the preset's"})
    train_frac: float = field(default=0.5, metadata={"help": "fraction of the pairs used for training"})
    device: str = field(default="auto", metadata={
        "help": "where the model trains: auto (cuda if available, else mps, else cpu), cpu, cuda or mps",
        "choices": DEVICES})  # a str, not a Literal: the API also takes "cuda:1"

    def validate(self) -> None:
        super().validate()
        check(self.p >= 3, f"p must be at least 3, got {self.p} (--p).")
        check(0 < self.train_frac < 1, f"train_frac must lie strictly between 0 and 1, got {self.train_frac} (--train-frac).")
        check(self.device.split(":")[0] in DEVICES, f"unknown device {self.device!r} (--device); choose {', '.join(DEVICES)}.")


@dataclass(kw_only=True)
class TrackingOptions(Config):
    """Where a run is logged — W&B mode and project — and whether it shows progress bars: nothing here changes
    what a run computes (a finished grid cell is reused whatever these were, see :data:`TRACKING_FIELDS`)."""

    cli_group: ClassVar[str] = "tracking"

    wandb_mode: WandbMode = field(default="offline", metadata={
        "help": "W&B mode: offline (local files; wandb sync uploads them later), online or disabled",
        "what": "W&B mode"})
    wandb_project: str = field(default="sed-lens", metadata={"help": "W&B project"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def validate(self) -> None:
        super().validate()
        check(self.wandb_project.strip() != "", "the W&B project must not be empty (--wandb-project).")


TRACKING_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(TrackingOptions))
"""Config keys that change where a run is logged, not what it computes (:mod:`sed_lens.grid` ignores them when it
matches finished cells)."""

OUTPUT_FIELDS: tuple[str, ...] = ("artifacts_at",)
"""Config keys that choose which of its files a finished run keeps (the coupling runs' ``artifacts_at``), not what
it computes: matched like :data:`TRACKING_FIELDS`, so a finished run is reused whatever they were."""


@dataclass(kw_only=True)
class GridOptions(Config):
    """Where the runs of a grid execute (:func:`sed_lens.grid.run_grid`)."""

    cli_group: ClassVar[str] = "grid"

    backend: Backend = field(default="local", metadata={
        "help": "where runs execute: local (a pool of worker processes) or ray (a Ray cluster)", "what": "grid backend"})
    workers: int | None = field(default=None, metadata={"help": "parallel runs (default: one per CPU core)"})
    ray_address: str | None = field(default=None, metadata={
        "help": "Ray cluster address: HOST:PORT, ray://HOST:PORT or auto (default: start a local Ray)"})

    def validate(self) -> None:
        super().validate()
        check(self.workers is None or self.workers >= 1, f"workers must be at least 1, got {self.workers} (--workers).")


def shared(cfg: Any, *pieces: type[Config]) -> dict[str, Any]:
    """The values ``cfg`` holds for the fields that ``pieces`` declare, to hand on to a config made of the same
    pieces: ``GrokkingConfig(ops=..., **shared(cfg, ModelOptions))``."""
    return {f.name: getattr(cfg, f.name) for piece in pieces for f in fields(piece)}
