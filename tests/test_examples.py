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
