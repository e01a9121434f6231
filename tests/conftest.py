"""Shared fixtures: tiny tasks and models that keep unit tests fast."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")


@pytest.fixture
def tiny_task():
    from sed_lens.tasks import ModularArithmetic

    return ModularArithmetic(p=11, ops=("add",), train_frac=0.5, seed=0)


@pytest.fixture
def tiny_multitask():
    from sed_lens.tasks import ModularArithmetic

    return ModularArithmetic(p=11, ops=("add", "sub", "mul", "sq"), train_frac=0.5, seed=0)


@pytest.fixture
def odd_model():
    """A non-preset HookedTransformer: causal, 3 layers, d_head 8, with a readout for two ops."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from sed_lens.models import set_readout

    cfg = HookedTransformerConfig(n_layers=3, d_model=24, n_heads=3, d_head=8, d_mlp=48, n_ctx=3, d_vocab=12,
                                  d_vocab_out=22, act_fn="gelu", attention_dir="causal", normalization_type="LN")
    torch.manual_seed(0)
    m = HookedTransformer(cfg, move_to_device=False)
    set_readout(m, -1, ("add", "sub"), 11)
    return m
