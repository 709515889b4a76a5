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
