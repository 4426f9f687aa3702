"""Shared fixtures of the SFT tests: an offline byte tokenizer, tiny Llamas, a small dataset."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))  # tests/sft/tinyworld.py

from tinyworld import make_dataset, make_model  # noqa: E402

from sft.models import byte_tokenizer  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def dataset(tok):
    return make_dataset(tok, 16)


@pytest.fixture
def model64():
    return make_model(torch.float64)
