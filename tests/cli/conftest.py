"""Fixtures of the command-line tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def model_dir(tmp_path, base_model, tokenizer):
    """A model folder as `save_pretrained` writes it, with its tokenizer."""
    path = tmp_path / "model"
    base_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
