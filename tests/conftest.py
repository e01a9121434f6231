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


def pytest_configure(config):
    """Under pytest-xdist (``-n``), every worker runs PyTorch with one thread: two workers on two cores, each with
    PyTorch's default of one thread per core, would oversubscribe the cores (and slow every test many times over).
    The processes a test starts inherit it (``OMP_NUM_THREADS``), so they round as the test process does."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: without the plugin, pytest runs as usual
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per CPU this process may run on (its affinity: a container's or ``taskset``'s
    share, not the host's core count, nor pytest-xdist's physical-core count, which is 1 on a 2-vCPU machine
    whose vCPUs are one core's hyperthreads)."""
    return max(1, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else max(1, os.cpu_count() or 1)


def pytest_collection_modifyitems(config, items):
    """The grokking-length (``slow``) tests first, so that a parallel run (``-n``) starts its longest tests at once
    instead of leaving one for the end; the order within each group is unchanged."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
