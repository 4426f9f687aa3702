"""Shared fixtures: a tiny byte-level BPE tokenizer trained offline and a tiny random Llama."""
import pytest

from evalhelpers import make_tiny_llama, make_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    return make_tiny_llama(len(tiny_tokenizer))
