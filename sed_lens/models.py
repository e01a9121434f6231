"""Model presets as ``HookedTransformer``s, PyTorch-default initialisation, and per-op readout.

A model reads its logits at one position (the *readout position*); a multitask model has one head per op,
realised as a single unembedding with ``n_ops · n_classes`` outputs sliced per op. Both facts are metadata the
model carries (:class:`Readout`, attached by :func:`set_readout`), so callers never hard-code them. A user's own
``HookedTransformer`` without that metadata reads at the last position with a single head over all outputs.
A sequence task (:class:`~sed_lens.task.SequenceTask`, e.g. the induction task) is read at several positions at
once — the sequence presets (:data:`SEQUENCE_PRESETS`, attention-only, :func:`build_sequence_model`) read at the
task's ``readout_positions`` — and its logits and labels carry a positions axis.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sed_lens.configs import (  # noqa: F401 - defined torch-free for the CLIs
    INITS,
    PRESETS,
    SEQUENCE_PRESETS,
    Preset,
    SequencePreset,
    get_preset,
    get_sequence_preset,
)
from sed_lens.errors import SedLensError, check
from sed_lens.serialization import plain
from sed_lens.task import SequenceTask, Task, cross_entropy
from sed_lens.tasks import ModularArithmetic
from sed_lens.torch_reference import TorchTransformer, hooked_state_dict


@dataclass(frozen=True)
class Readout:
    """Where a model's predictions are read: logits at ``position``, ``n_classes`` consecutive outputs per op.

    ``position`` is one position (logits ``[batch, n_outputs]``, e.g. modular arithmetic) or a tuple of positions
    (logits ``[batch, n_pos, n_outputs]``, e.g. the second half of an induction sequence)."""

    position: int | tuple[int, ...]
    ops: tuple[str, ...]
    n_classes: int

    @property
    def positions(self) -> tuple[int, ...]:
        """The readout positions as a tuple (one entry for a single position)."""
        return self.position if isinstance(self.position, tuple) else (self.position,)

    @property
    def multi_position(self) -> bool:
        """Whether the logits carry a positions axis (``position`` is a tuple)."""
        return isinstance(self.position, tuple)

    def select(self, logits: Float[Tensor, "batch pos d_vocab_out"]) -> Tensor:
        """The logits of every position → those at the readout: ``[batch, n_out]`` or ``[batch, n_pos, n_out]``."""
        if isinstance(self.position, tuple):
            return logits[:, list(self.position)]
        return logits[:, self.position]

    def slice(self, op: str | None = None) -> slice:
        """The output slice of ``op`` (the only head if ``op`` is None and there is one)."""
        return slice(self.index(op) * self.n_classes, (self.index(op) + 1) * self.n_classes)

    def index(self, op: str | None) -> int:
        if op is None:
            check(len(self.ops) == 1, f"this model has {len(self.ops)} heads ({', '.join(self.ops)}); name the op.")
            return 0
        if op not in self.ops:
            if len(self.ops) == 1 and self.ops[0] == "y":
                return 0  # a user's single-head model answers to any op name
            raise SedLensError(f"the model has no head for op {op!r}; its heads are {', '.join(self.ops)}.")
        return self.ops.index(op)


# Where a model's sed_lens metadata lives: one slot per model instance, written only by set_readout /
# set_preset_info and read only by get_readout / has_readout / get_preset_info (typed, validated values). It is on
# the instance rather than in a side table so that copy.deepcopy, pickling (process pools, Ray) and .to() keep it;
# the model stays a plain HookedTransformer whose state dict is TransformerLens' own. model_spec records the
# metadata as JSON and model_from_spec restores it, so a state-dict round trip loses nothing.
_READOUT_SLOT = "_sed_lens_readout"
_PRESET_SLOT = "_sed_lens_preset"


def set_readout(model: HookedTransformer, position: int | Sequence[int], ops: Sequence[str] = ("y",),
                n_classes: int | None = None) -> Readout:
    """Attach readout metadata to a user's ``HookedTransformer`` (position — or a sequence of positions, read
    together —, op names, classes per op)."""
    ops = tuple(ops)
    n_out = model.cfg.d_vocab_out
    n_classes = n_out // len(ops) if n_classes is None else n_classes
    check(len(ops) >= 1, "a readout needs at least one op.")
    check(n_classes * len(ops) <= n_out, f"{len(ops)} heads × {n_classes} classes exceed the model's {n_out} outputs.")
    pos: int | tuple[int, ...] = position if isinstance(position, int) else tuple(int(p) for p in position)
    check(isinstance(pos, int) or len(pos) >= 1, "a readout needs at least one position.")
    for p in (pos,) if isinstance(pos, int) else pos:
        check(-model.cfg.n_ctx <= p < model.cfg.n_ctx,
              f"readout position {p} is outside the model's context of {model.cfg.n_ctx}.")
    r = Readout(pos, ops, n_classes)
    setattr(model, _READOUT_SLOT, r)
    return r


def get_readout(model: HookedTransformer) -> Readout:
    """The model's :class:`Readout`; a model built elsewhere reads the last position with one head."""
    r = getattr(model, _READOUT_SLOT, None)
    if isinstance(r, Readout):
        return r
    return Readout(-1, ("y",), model.cfg.d_vocab_out)


def has_readout(model: HookedTransformer) -> bool:
    """Whether ``model`` carries a :class:`Readout` (from :func:`build_model` or :func:`set_readout`)."""
    return isinstance(getattr(model, _READOUT_SLOT, None), Readout)


@dataclass(frozen=True)
class PresetInfo:
    """How :func:`build_model` made a model: its preset's name, the initialisation and its seed."""

    preset: str
    init: str
    seed: int


def set_preset_info(model: HookedTransformer, info: PresetInfo) -> PresetInfo:
    """Record how ``model`` was built (:func:`build_model` does; :func:`model_from_spec` restores it)."""
    check(isinstance(info, PresetInfo), f"preset info must be a PresetInfo, got {type(info).__name__}.")
    setattr(model, _PRESET_SLOT, info)
    return info


def get_preset_info(model: HookedTransformer) -> PresetInfo | None:
    """The :class:`PresetInfo` of a model made by :func:`build_model` (None for a model built elsewhere).
    (:func:`get_preset` is the preset *definition* by name.)"""
    info = getattr(model, _PRESET_SLOT, None)
    return info if isinstance(info, PresetInfo) else None


def hooked_config(preset: str | Preset, task: ModularArithmetic, device: str | torch.device = "cpu") -> HookedTransformerConfig:
    """The ``HookedTransformerConfig`` of ``preset`` sized for ``task`` (vocabulary, context, one head per op)."""
    pr = get_preset(preset) if isinstance(preset, str) else preset
    check(task.layout == pr.layout,
          f"preset {pr.name!r} reads tokens laid out as {pr.layout!r} but the task uses {task.layout!r}; "
          f"build it with ModularArithmetic(..., layout={pr.layout!r}) or task.with_layout({pr.layout!r}).")
    return HookedTransformerConfig(
        n_layers=pr.n_layers, d_model=pr.d_model, n_heads=pr.n_heads, d_head=pr.d_head, d_mlp=pr.d_mlp,
        act_fn=pr.act_fn, normalization_type="LN" if pr.layer_norm else None, attention_dir=pr.attention_dir,
        n_ctx=task.n_ctx, d_vocab=task.d_vocab, d_vocab_out=task.p * len(task.ops),
        positional_embedding_type="standard", device=str(device), seed=None,
    )


def new_hooked_transformer(cfg: HookedTransformerConfig) -> HookedTransformer:
    """``HookedTransformer(cfg)`` on ``cfg.device``, without TransformerLens 3.x's deprecation warning and print."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, move_to_device=False)
    torch.nn.Module.to(model, cfg.device)
    return model


def torch_reference(preset: str | Preset, task: ModularArithmetic, seed: int) -> TorchTransformer:
    """The bare-PyTorch model of ``preset`` for ``task``, initialised by PyTorch's defaults under ``seed``."""
    pr = get_preset(preset) if isinstance(preset, str) else preset
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TorchTransformer(task.d_vocab, task.n_ctx, pr.d_model, pr.n_heads, pr.d_mlp, pr.n_layers,
                                [task.p] * len(task.ops), act_fn=pr.act_fn, layer_norm=pr.layer_norm,
                                causal=pr.attention_dir == "causal", readout_position=pr.readout_position)


def sequence_config(preset: str | SequencePreset, task: SequenceTask,
                    device: str | torch.device = "cpu") -> HookedTransformerConfig:
    """The attention-only, causal ``HookedTransformerConfig`` of a sequence ``preset`` sized for ``task``."""
    pr = get_sequence_preset(preset) if isinstance(preset, str) else preset
    return HookedTransformerConfig(
        n_layers=pr.n_layers, d_model=pr.d_model, n_heads=pr.n_heads, d_head=pr.d_head, attn_only=True,
        normalization_type="LN" if pr.layer_norm else None, attention_dir="causal",
        n_ctx=task.n_ctx, d_vocab=task.d_vocab, d_vocab_out=task.n_classes * len(task.ops),
        positional_embedding_type="standard", device=str(device), seed=None,
    )


def build_sequence_model(preset: str | SequencePreset, task: Task, *, init: str | None = None, seed: int = 0,
                         device: str | torch.device = "cpu") -> HookedTransformer:
    """An attention-only ``HookedTransformer`` of the sequence ``preset`` (see :data:`SEQUENCE_PRESETS`) for
    ``task`` (a :class:`~sed_lens.task.SequenceTask`), reading logits at ``task.readout_positions``;
    TransformerLens' initialisation under ``seed``. ``preset`` may be a :class:`SequencePreset` of your own."""
    pr = get_sequence_preset(preset) if isinstance(preset, str) else preset
    check(isinstance(task, SequenceTask),
          f"preset {pr.name!r} needs a sequence task with readout positions (e.g. InductionTask), got "
          f"{type(task).__name__}.")
    assert isinstance(task, SequenceTask)
    check(init in (None, "tl"), f"preset {pr.name!r} has no PyTorch-reference model; use init='tl', not {init!r}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = new_hooked_transformer(sequence_config(pr, task, device))
    set_readout(model, task.readout_positions, task.ops, task.n_classes)
    set_preset_info(model, PresetInfo(pr.name, "tl", seed))
    return model


def build_model(preset: str = "xu2026", task: Task | None = None, *, init: str | None = None,
                seed: int = 0, device: str | torch.device = "cpu") -> HookedTransformer:
    """A ``HookedTransformer`` of ``preset`` for ``task``, with its :class:`Readout` attached.

    Args:
        preset: ``"xu2026"`` or ``"nanda2023"`` (see :data:`PRESETS`) for a :class:`ModularArithmetic` task, or
            a sequence preset (``"olsson2022"``, see :data:`SEQUENCE_PRESETS`: :func:`build_sequence_model`) for a
            :class:`~sed_lens.task.SequenceTask` such as ``InductionTask``.
        task: fixes vocabulary, context and the heads (one per op); defaults to the preset's ``add`` mod 97.
        init: ``"torch"`` starts from PyTorch's default initialisation of the equivalent
            ``nn.TransformerEncoder`` model (xavier-uniform packed QKV, zero attention biases, ``nn.Linear``
            defaults elsewhere, N(0,1) tokens, N(0,1/d_model) positions, identical layers); ``"tl"`` keeps
            TransformerLens' initialisation. Default: the preset's (``torch`` for xu2026, ``tl`` for nanda2023).
        seed: the random seed of the initialisation (the global RNG state is left untouched).
    """
    if preset in SEQUENCE_PRESETS:
        check(task is not None, f"preset {preset!r} needs its task (e.g. InductionTask()).")
        assert task is not None
        return build_sequence_model(preset, task, init=init, seed=seed, device=device)
    pr = get_preset(preset)
    task = task if task is not None else ModularArithmetic(layout=pr.layout)
    check(isinstance(task, ModularArithmetic),
          f"preset {preset!r} is built for ModularArithmetic tasks, got {type(task).__name__}; "
          f"sequence presets: {', '.join(SEQUENCE_PRESETS)}.")
    assert isinstance(task, ModularArithmetic)
    init = pr.default_init if init is None else init
    check(init in INITS, f"unknown init {init!r}; choose from {', '.join(INITS)}.")
    cfg = hooked_config(pr, task, device=device)
    if init == "torch":
        cfg.init_weights = False
        model = new_hooked_transformer(cfg)
        state = model.state_dict()
        converted = hooked_state_dict(torch_reference(pr, task, seed))
        missing = set(k for k, v in model.named_parameters()) - set(converted)
        assert not missing, f"torch init left parameters unset: {sorted(missing)}"
        state.update(converted)
        model.load_state_dict(state)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = new_hooked_transformer(cfg)
    set_readout(model, pr.readout_position, task.ops, task.p)
    set_preset_info(model, PresetInfo(pr.name, init, seed))
    return model


# --- readout ------------------------------------------------------------------------------------------------
def readout_logits(model: HookedTransformer, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch d_vocab_out"]:
    """All output logits at the model's readout position(s): ``[batch, d_vocab_out]``, or ``[batch, n_pos,
    d_vocab_out]`` for a readout at several positions."""
    return get_readout(model).select(model(tokens))


def split_logits(model: HookedTransformer, logits: Float[Tensor, "batch d_vocab_out"],
                 ops: Sequence[str] | None = None) -> dict[str, Float[Tensor, "batch n_classes"]]:
    """Readout logits split into one block per op (the last axis; any positions axis is kept)."""
    r = get_readout(model)
    return {op: logits[..., r.slice(op)] for op in (r.ops if ops is None else ops)}


def task_logits(model: HookedTransformer, tokens: Int[Tensor, "batch pos"]) -> dict[str, Float[Tensor, "batch n_classes"]]:
    """``{op: [batch, n_classes]}`` logits of every head at the readout position."""
    return split_logits(model, readout_logits(model, tokens))


def op_losses(model: HookedTransformer, tokens: Int[Tensor, "batch pos"],
              labels: Mapping[str, Tensor] | Tensor) -> dict[str, Tensor]:
    """Mean cross-entropy of each op's head on its own labels (over every readout position), from one forward
    pass."""
    labels = as_label_dict(model, labels)
    logits = split_logits(model, readout_logits(model, tokens), list(labels))
    return {op: cross_entropy(logits[op], y) for op, y in labels.items()}


def as_label_dict(model: HookedTransformer, labels: Mapping[str, Tensor] | Tensor) -> dict[str, Tensor]:
    """Labels keyed by op; a bare tensor is the labels of a single-head model."""
    if isinstance(labels, Tensor):
        return {get_readout(model).ops[0]: labels} if len(get_readout(model).ops) == 1 else _need_op(model)
    return dict(labels)


def _need_op(model: HookedTransformer) -> dict[str, Tensor]:
    raise SedLensError(f"this model has heads {', '.join(get_readout(model).ops)}; pass labels as a dict {{op: labels}}.")


def model_spec(model: HookedTransformer) -> dict[str, Any]:
    """JSON-able description of a model: its TransformerLens config, readout and preset (if any)."""
    cfg = {k: (str(v) if isinstance(v, (torch.dtype, torch.device)) else v) for k, v in model.cfg.to_dict().items()}
    cfg = {k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool, type(None), list))}
    info = get_preset_info(model)
    return plain({"cfg": cfg, "readout": asdict(get_readout(model)), "preset": None if info is None else asdict(info)})


def model_from_spec(spec: Mapping[str, Any], state_dict: Mapping[str, Tensor] | None = None,
                    device: str | torch.device | None = None) -> HookedTransformer:
    """The model :func:`model_spec` describes — its TransformerLens config, :class:`Readout` and
    :class:`PresetInfo` — loaded with ``state_dict`` if given; on ``device`` (default: TransformerLens')."""
    fields = HookedTransformerConfig.__dataclass_fields__
    kwargs: dict[str, Any] = {k: v for k, v in spec["cfg"].items() if k in fields and k not in ("dtype", "device")}
    if device is not None:
        kwargs["device"] = str(device)
    cfg = HookedTransformerConfig(**kwargs)
    model = new_hooked_transformer(cfg)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    if (r := spec.get("readout")) is not None:
        set_readout(model, r["position"], r["ops"], r["n_classes"])
    if (p := spec.get("preset")) is not None:
        set_preset_info(model, PresetInfo(p["preset"], p["init"], p["seed"]))
    return model
