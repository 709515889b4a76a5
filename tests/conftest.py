"""Shared fixtures: a tokenizer trained in-process, shipped HH-RLHF rows and tiny Llama models. No downloads."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from kto_plugin.demo import build_tiny_model, build_tokenizer, hh_unpaired_rows

os.environ.setdefault("KTO_PLUGIN_DISABLE_AUTOLOAD", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
# The models here are tiny: one thread is faster than two (less synchronisation), and it keeps the suite
# fast on a shared 2-core machine. Subprocesses (CLI, examples, torchrun) inherit OMP_NUM_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def rows():
    """Unpaired KTO rows from the first 60 shipped HH-RLHF pairs (desirable/undesirable interleaved)."""
    return hh_unpaired_rows(60)


@pytest.fixture(scope="session")
def tokenizer(rows):
    return build_tokenizer([r["prompt"] + r["completion"] for r in rows], vocab_size=512)


@pytest.fixture
def tok(tokenizer):
    """A per-test copy, for tests that change the tokenizer."""
    return copy.deepcopy(tokenizer)


@pytest.fixture(scope="session")
def base_model(tokenizer):
    return build_tiny_model(len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, seed=1)


@pytest.fixture
def model(base_model):
    return copy.deepcopy(base_model)
