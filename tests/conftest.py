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
