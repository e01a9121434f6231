"""Config dataclasses: shared pieces declared once, Literal choices, validation on construction, typed loading."""

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import get_args

import pytest

from sed_lens import configs, grid, tracking
from sed_lens.cli import config_from_dict, parser_for
from sed_lens.configs import (
    PRESETS,
    TRACKING_FIELDS,
    GridOptions,
    ModelOptions,
    PresetName,
    ScanConfig,
    TrackingOptions,
    TrainConfig,
    shared,
)
from sed_lens.devices import DEVICES
from sed_lens.errors import SedLensError
from sed_lens.experiments.coupling import CouplingConfig
from sed_lens.experiments.grokking import GrokkingConfig
from sed_lens.experiments.intervention import InterventionConfig
from sed_lens.experiments.reproduce import ReproduceConfig
from sed_lens.report import ReportConfig

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = {GrokkingConfig: (ModelOptions, TrackingOptions),
               CouplingConfig: (ModelOptions, TrackingOptions, GridOptions),
               InterventionConfig: (ModelOptions, TrackingOptions, GridOptions),
               ReproduceConfig: (TrackingOptions, GridOptions)}
PIECES = (ModelOptions, TrackingOptions, GridOptions)


def declared_by(cls, name):
    return next(base for base in cls.__mro__ if name in base.__dict__.get("__annotations__", {}))


@pytest.mark.parametrize("cls", list(EXPERIMENTS), ids=lambda c: c.__name__)
def test_every_shared_field_is_declared_once_in_its_piece(cls):
    names = {f.name for f in fields(cls)}
    for piece in PIECES:
        own = {f.name for f in fields(piece)}
        if piece in EXPERIMENTS[cls]:
            assert own <= names
            assert all(declared_by(cls, n) is piece for n in own), (cls.__name__, piece.__name__)
        else:
            assert not own & names
    # the experiment's own fields are no piece's
    piece_fields = {f.name for p in PIECES for f in fields(p)}
    assert not {n for n in cls.__dict__.get("__annotations__", {})} & piece_fields


def test_runtime_tuples_are_the_literals():
    assert tuple(PRESETS) == get_args(PresetName)
    assert configs.WANDB_MODES == tracking.WANDB_MODES and configs.BACKENDS == grid.BACKENDS
    assert configs.INITS == ("torch", "tl") and configs.METHODS == ("jvp", "hvp", "fd")
    assert configs.APPLY_TO == ("gradient", "update") and configs.SOURCES == ("update", "gradient", "task_gradient")
    assert TRACKING_FIELDS == ("wandb_mode", "wandb_project", "progress")


def choices(cls, flag):
    ap = parser_for(cls, "x", "")
    return tuple(next(a for a in ap._actions if flag in a.option_strings).choices)


def test_flag_choices_come_from_the_literals():
    assert choices(GrokkingConfig, "--preset") == tuple(PRESETS)
    assert choices(GrokkingConfig, "--init") == configs.INITS
    assert choices(GrokkingConfig, "--wandb-mode") == configs.WANDB_MODES
    assert choices(GrokkingConfig, "--device") == DEVICES
    assert choices(CouplingConfig, "--method") == configs.METHODS
    assert choices(CouplingConfig, "--readout") == configs.READOUTS
    assert choices(CouplingConfig, "--grad-batch-split") == ("all", "train", "test")
    assert choices(CouplingConfig, "--backend") == configs.BACKENDS
    assert choices(InterventionConfig, "--method") == configs.APPLY_TO
    assert choices(ReproduceConfig, "--backend") == configs.BACKENDS


def test_help_lists_each_piece_under_its_heading():
    ap = parser_for(CouplingConfig, "x", "")
    titles = [g.title for g in ap._action_groups]
    assert titles[-3:] == ["task and model", "tracking", "grid"]
    group = next(g for g in ap._action_groups if g.title == "grid")
    assert [a.dest for a in group._group_actions] == ["backend", "workers", "ray_address"]


@pytest.mark.parametrize("cls,kwargs,match", [
    (GrokkingConfig, {"p": "97"}, r"p must be an integer, got '97' \(--p\)"),
    (GrokkingConfig, {"p": 2}, r"p must be at least 3, got 2 \(--p\)"),
    (GrokkingConfig, {"preset": "gpt2"}, r"unknown preset 'gpt2' \(--preset\); choose xu2026, nanda2023"),
    (GrokkingConfig, {"init": "xavier"}, r"unknown init 'xavier' \(--init\)"),
    (GrokkingConfig, {"train_frac": 1.0}, r"\(--train-frac\)"),
    (GrokkingConfig, {"device": "tpu"}, r"unknown device 'tpu' \(--device\)"),
    (GrokkingConfig, {"wandb_mode": "sometimes"}, r"unknown W&B mode 'sometimes' \(--wandb-mode\)"),
    (GrokkingConfig, {"progress": "yes"}, r"progress must be true or false, got 'yes' \(--progress\)"),
    (GrokkingConfig, {"ops": ()}, r"name at least one op \(--ops\)"),
    (GrokkingConfig, {"sed": ("updates",)}, r"unknown SED source updates \(--sed\)"),
    (GrokkingConfig, {"snapshot_every": -1}, r"\(--snapshot-every\)"),
    (GrokkingConfig, {"train": TrainConfig(lr=1e-3), "seed": 1.5}, r"seed must be an integer, got 1.5 \(--seed\)"),
    (CouplingConfig, {"backend": "slurm"}, r"unknown grid backend 'slurm' \(--backend\); choose local, ray"),
    (CouplingConfig, {"workers": 0}, r"workers must be at least 1, got 0 \(--workers\)"),
    (CouplingConfig, {"multitask": True, "ops": ("add",)}, r"at least two ops"),
    (InterventionConfig, {"method": "weights"}, r"unknown method 'weights' \(--method\); choose gradient, update"),
    (InterventionConfig, {"conditions": ("A", "F")}, r"unknown condition F \(--conditions\)"),
    (InterventionConfig, {"k": 4, "window": 3}, r"\(--window\)"),
    (InterventionConfig, {"warmup": 0, "conditions": ("C",)}, r"--warmup 1"),
    (ReproduceConfig, {"seeds": ()}, r"\(--seeds\)"),
    (ReproduceConfig, {"workers": 0}, r"\(--workers\)"),
    (ReportConfig, {"wandb_save": True}, r"--wandb-save needs --wandb"),
    (ScanConfig, {"method": "hvpp"}, r"unknown coupling method 'hvpp' \(--method\)"),
    (ScanConfig, {"aligns": ("centred",)}, r"unknown window alignment centred \(--aligns\)"),
    (TrainConfig, {"lr": 0}, r"learning rate must be positive, got 0 \(--lr\)"),
])
def test_a_bad_value_is_one_sentence_naming_the_flag(cls, kwargs, match):
    with pytest.raises(SedLensError, match=match) as e:
        cls(**kwargs)
    assert "\n" not in str(e.value)


def test_lists_become_tuples_and_validate_rechecks_a_changed_field():
    cfg = GrokkingConfig(ops=["add", "mul"], sed=["update"])
    assert cfg.ops == ("add", "mul") and cfg.sed == ("update",)
    cfg.wandb_mode = "later"
    with pytest.raises(SedLensError, match="unknown W&B mode 'later'"):
        cfg.validate()
    cfg = CouplingConfig()
    cfg.train.steps = -1  # a nested config is validated with its parent
    with pytest.raises(SedLensError, match=r"\(--steps\)"):
        cfg.validate()


def test_configs_are_keyword_only():
    with pytest.raises(TypeError):
        GrokkingConfig(("add",))  # type: ignore[misc]


def test_shared_copies_a_pieces_fields():
    cfg = CouplingConfig(p=31, init="tl", device="cpu", workers=2, wandb_mode="disabled")
    assert shared(cfg, ModelOptions) == {"p": 31, "preset": "xu2026", "init": "tl", "train_frac": 0.5, "device": "cpu"}
    assert shared(cfg, GridOptions, TrackingOptions) == {"backend": "local", "workers": 2, "ray_address": None,
                                                         "wandb_mode": "disabled", "wandb_project": "sed-lens",
                                                         "progress": True}


@pytest.mark.parametrize("cfg", [GrokkingConfig(ops=("add", "sub"), init="tl", sed=()),
                                 CouplingConfig(multitask_seeds=(1,), scan=ScanConfig(ablation_eps=(0.01,))),
                                 InterventionConfig(conditions=("A", "C")), ReproduceConfig(seeds=(42,)),
                                 ReportConfig(run_dirs=("a", "b"))], ids=lambda c: type(c).__name__)
def test_a_config_round_trips_through_json(cfg):
    assert config_from_dict(type(cfg), json.loads(json.dumps(asdict(cfg)))) == cfg


@pytest.mark.parametrize("data,match", [
    ({"p": "97"}, r"GrokkingConfig key 'p' must be an integer, got '97' \(a str\)"),
    ({"ops": 3}, r"GrokkingConfig key 'ops' must be a list \(each item a string\), got 3"),
    ({"ops": ["add", 1]}, r"key 'ops' must be a list \(each item a string\)"),
    ({"init": "xavier"}, r"key 'init' must be one of torch, tl or None, got 'xavier'"),
    ({"progress": 1}, r"key 'progress' must be true or false, got 1"),
    ({"train": {"steps": "5"}}, r"TrainConfig key 'train.steps' must be an integer, got '5'"),
    ({"train": 3}, r"train must be a dict of TrainConfig fields, got 3"),
    ({"sampler_seed": 1}, r"unknown GrokkingConfig field\(s\): sampler_seed"),
    ({"train": {"momentum": 0.9}}, r"unknown TrainConfig field\(s\) in 'train': momentum"),
])
def test_config_from_dict_names_the_bad_key_and_its_type(data, match):
    with pytest.raises(SedLensError, match=match) as e:
        config_from_dict(GrokkingConfig, data)
    assert "\n" not in str(e.value)


def test_config_from_dict_checks_values_too():
    with pytest.raises(SedLensError, match=r"p must be at least 3, got 1 \(--p\)"):
        config_from_dict(GrokkingConfig, {"p": 1})
    with pytest.raises(SedLensError, match="must be a dict of GrokkingConfig fields"):
        config_from_dict(GrokkingConfig, ["p", 97])  # type: ignore[arg-type]
    # a float field takes a JSON integer; an int field does not take a float
    assert config_from_dict(TrainConfig, {"lr": 1, "weight_decay": 0}).lr == 1
    with pytest.raises(SedLensError, match="key 'steps' must be an integer, got 10.0"):
        config_from_dict(TrainConfig, {"steps": 10.0})


def test_todays_config_json_loads():
    """A grokking run's config.json as written today (flat keys, nested train), and the cell configs committed
    with the reproduction (a grokking config and, for coupling cells, a scan config each)."""
    saved = {"experiment": "grokking", **asdict(GrokkingConfig(p=11, run_dir="runs/x", init="tl"))}
    saved = json.loads(json.dumps(saved))
    cfg = config_from_dict(GrokkingConfig, {k: v for k, v in saved.items() if k != "experiment"})
    assert cfg.p == 11 and cfg.ops == ("add",) and cfg.train == TrainConfig()
    cells = sorted((ROOT / "docs" / "reproduction" / "runs").rglob("*.json"))
    assert cells
    for path in cells:
        config = json.loads(path.read_text())["config"]
        grok = config_from_dict(GrokkingConfig, config["grokking"])
        assert asdict(grok).items() >= {k: tuple(v) if isinstance(v, list) else v
                                        for k, v in config["grokking"].items() if k != "train"}.items()
        if "scan" in config:  # as a cell writes it (ScanConfig.to_dict: options added later left out at their default)
            assert config_from_dict(ScanConfig, config["scan"]).to_dict() == {
                k: tuple(v) if isinstance(v, list) else v for k, v in config["scan"].items()}
