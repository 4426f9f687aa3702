"""Fixtures of the world / analysis tests: a smoke-size world pretrained once per session."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch.set_num_threads(1)  # tiny models: per-op overhead dominates; 1 thread is fastest on a shared box


@pytest.fixture(scope="session")
def smoke_world():
    from sft.worlds import WorldConfig, build_world

    return build_world(WorldConfig.smoke(pretrain_steps=150))


@pytest.fixture(scope="session")
def pretrained(smoke_world, tmp_path_factory):
    from sft.worlds import pretrain

    cache = tmp_path_factory.mktemp("worlds")
    model, info = pretrain(smoke_world, cache_dir=cache)
    return model, info, cache
