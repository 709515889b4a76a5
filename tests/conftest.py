"""Shared fixtures: a tokenizer trained in-process, shipped HH-RLHF rows and tiny Llama models. No downloads."""

from __future__ import annotations

import copy
import inspect
import os
import sys
import types

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

# The Trainer integration, also run by .ci/run in a second environment at the lowest versions pyproject.toml
# accepts (.ci/floor-constraints.txt) as `pytest -m floor`. Module basenames, so that the selection survives
# moving a file into a sub-directory (a name that matches no module fails `-m floor`: rename it with the file);
# a test that uses TRL (the oracle, which needs newer versions) is left out.
FLOOR_MODULES = (
    "test_compat",
    "test_compute_loss",
    "test_ledger",
    "test_encoder_decoder",
    "test_generation",
    "test_guidance",
    "test_hooks",
    "test_metrics",
    "test_metrics_accumulator",
    "test_models",
    "test_nonfinite",
    "test_offload",
    "test_plugin",
    "test_plugin_manager",
    "test_precompute",
    "test_prepare",
    "test_reference",
    "test_resume",
    "test_router",
    "test_shared_prompt",
    "test_sync",
    "test_training_options",
)


def _uses_trl(code: types.CodeType, namespace: dict, seen: set[int]) -> bool:
    """Whether `code` imports trl or calls `run_trl`, itself, in a nested function or comprehension, or through
    a function defined in its own module that it names (``from trl ...`` and ``run_trl`` put those names in
    ``co_names``; a local variable called ``trl`` does not)."""
    if id(code) in seen:
        return False
    seen.add(id(code))
    for name in code.co_names:
        if name == "trl" or name.startswith(("trl.", "run_trl")):
            return True
        helper = namespace.get(name)
        if (
            inspect.isfunction(helper)
            and helper.__module__ == namespace.get("__name__")
            and _uses_trl(helper.__code__, namespace, seen)
        ):
            return True
    return any(isinstance(c, types.CodeType) and _uses_trl(c, namespace, seen) for c in code.co_consts)


def _function_uses_trl(function) -> bool:
    function = inspect.unwrap(function)
    module = sys.modules.get(function.__module__)
    return _uses_trl(function.__code__, vars(module) if module else {}, set())


def pytest_ignore_collect(collection_path, config):
    """Under ``-m floor`` only the floor modules are imported: the others may import at module level what the
    floor environment lacks (trl, PIL)."""
    name = collection_path.name
    if config.getoption("markexpr") == "floor" and name.startswith("test_") and name.endswith(".py"):
        return collection_path.stem not in FLOOR_MODULES or None
    return None


def pytest_collection_modifyitems(config, items):
    found = set()
    for item in items:
        module = getattr(item, "module", None)
        if module is None or module.__name__.rpartition(".")[2] not in FLOOR_MODULES:
            continue
        found.add(module.__name__.rpartition(".")[2])
        fixtures = [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
        if not any(_function_uses_trl(f) for f in [item.function, *fixtures]):
            item.add_marker(pytest.mark.floor)
    missing = sorted(set(FLOOR_MODULES) - found)
    if config.getoption("markexpr") == "floor" and not config.option.file_or_dir and missing:
        # a renamed module would otherwise drop out of the floor run silently
        raise pytest.UsageError(f"FLOOR_MODULES in tests/conftest.py names modules that do not exist: {missing}")


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
