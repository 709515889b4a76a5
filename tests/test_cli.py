"""The `kto-plugin` command line, run in-process with short settings."""

from __future__ import annotations

import json
import os

import pytest

from kto_plugin import __version__
from kto_plugin.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_train_embedded_default(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--demo_pairs", "24", "--max_steps", "3", "--per_device_train_batch_size", "4",
                 "--logging_steps", "1", "--output_dir", str(out), "--report_to", "none", "--use_cpu", "true",
                 "--max_length", "128", "--eval_strategy", "no"])
    assert code == 0
    assert str(out) in capsys.readouterr().out
    history = json.loads((out / "log_history.json").read_text())
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 3 and "rewards/margins" in steps[0]
    assert json.loads((out / "kto_config.json").read_text())["max_length"] == 128
    assert os.path.exists(out / "model.safetensors") and os.path.exists(out / "tokenizer.json")


def test_train_config_file_and_override(tmp_path):
    config = tmp_path / "kto.yaml"
    config.write_text("beta: 0.25\nloss_type: apo_zero_unpaired\nmax_steps: 1\nper_device_train_batch_size: 4\n"
                      "demo_pairs: 12\nmax_length: 96\nreport_to: none\nuse_cpu: true\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--beta", "0.5", "--output_dir", str(out)]) == 0
    saved = json.loads((out / "kto_config.json").read_text())
    assert saved["beta"] == 0.5 and saved["loss_type"] == "apo_zero_unpaired"


def test_model_without_data_is_refused():
    with pytest.raises(SystemExit, match="name both"):
        main(["train", "--model_name_or_path", "x", "--output_dir", "unused"])
