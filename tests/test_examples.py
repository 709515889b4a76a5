"""Every script in examples/ runs (short settings), so none rots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_add_kto_to_existing_trainer(tmp_path):
    out = run("add_kto_to_existing_trainer.py", "--max_steps", "3", "--output_dir", str(tmp_path))
    assert "rewards/margins" in out


def test_lora_null_reference(tmp_path):
    out = run("lora_null_reference.py", "--max_steps", "2", "--output_dir", str(tmp_path))
    assert "reference: the base model, adapters off" in out
    assert (tmp_path / "adapter_config.json").exists()


def test_named_ref_adapter(tmp_path):
    out = run("named_ref_adapter.py", "--max_steps", "2", "--output_dir", str(tmp_path))
    assert "reference: PEFT adapter 'ref'" in out
    assert "first loss 0.5000" in out  # the reference is the adapter's initial state


def test_precomputed_reference_computes_once_then_loads_from_the_cache(tmp_path):
    argv = ["--max_steps", "2", "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]
    first = run("precomputed_reference.py", *argv)
    assert "reference model kept in memory: False" in first
    assert "reference log-probs for train (36 rows, batch 16) computed in" in first
    assert "first loss 0.5000" in first  # precomputed reference == initial policy: rewards 0 at step 1
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2  # train and eval
    second = run("precomputed_reference.py", *argv)
    assert "reference log-probs for train (36 rows) loaded from cache" in second
    assert "reference log-probs for eval (12 rows) loaded from cache" in second
    assert "computed in" not in second
    # the same data, weights and log-probs: the run is repeated exactly
    assert first.splitlines()[-1] == second.splitlines()[-1]


def test_custom_loss_plugin_script(tmp_path):
    out = run("custom_loss_plugin/train.py", "--max_steps", "2", "--output_dir", str(tmp_path))
    # policy == reference at step 1: -log sigmoid(0) = log 2 per example, and the metric sigmoid(0) = 0.5
    assert "step 1: loss 0.6931, kto_logsigmoid/grad_weight 0.5000, rewards/margins 0.0000" in out
    assert "step 2: loss" in out
