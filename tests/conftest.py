"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The project's tiny byte-level BPE (pad/eos/bos), trained on a small demo corpus."""
    from wprctl.data import demo_tokenizer_corpus
    from wprctl.models import build_tiny_tokenizer

    return build_tiny_tokenizer(demo_tokenizer_corpus(seed=0, n_posts=500), vocab_size=512)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama + tokenizer saved as a Hugging Face folder (default [model.tiny] sizes)."""
    from wprctl.manifest import TinyModelConfig
    from wprctl.models import build_tiny_model

    return build_tiny_model(TinyModelConfig(), seed=0, out_dir=tmp_path_factory.mktemp("tiny"))
