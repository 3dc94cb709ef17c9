"""Shared fixtures of the reader tests."""

from __future__ import annotations

import pytest
import torch

from medrag_ray.models.reader import ReaderConfig, build_tiny_reader
from medrag_ray.models.tokenizer import train_bpe_tokenizer
from tests.unit.models.conftest import CORPUS


@pytest.fixture(scope="module")
def reader():
    """A seeded random tiny LLaVA and its processor (one per test module: some modules modify copies)."""
    tokenizer = train_bpe_tokenizer(CORPUS * 4, vocab_size=400)
    torch.manual_seed(0)
    return build_tiny_reader(ReaderConfig(), tokenizer)
