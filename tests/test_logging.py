"""kto_plugin._logging: the summaries of prepare_dataset and attach() reach a plain script's stderr, once."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kto_plugin._logging import LOGGER_NAME, default_level

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = textwrap.dedent('''
    import sys
    from transformers import Trainer, TrainingArguments
    from kto_plugin import KTOConfig, KTOPlugin
    from kto_plugin.demo import build_tiny_model, build_tokenizer
    if sys.argv[1] == "configured":  # the application sets logging up itself, after importing kto_plugin
        import logging
        logging.basicConfig(level=logging.INFO, format="APP %(name)s| %(message)s")
    rows = [{"prompt": f"{i} + {i} =", "completion": f" {2 * i if i % 2 else i}", "label": bool(i % 2)}
            for i in range(8)]
    tok = build_tokenizer([r["prompt"] + r["completion"] for r in rows], vocab_size=300)
    kto = KTOPlugin(KTOConfig(max_length=64), tokenizer=tok)
    trainer = Trainer(model=build_tiny_model(len(tok), hidden_size=32, num_layers=1, num_heads=2),
                      args=TrainingArguments(output_dir=sys.argv[2], report_to="none", use_cpu=True,
                                             per_device_train_batch_size=4, learning_rate=1e-6),
                      train_dataset=kto.prepare_dataset(rows), data_collator=kto.collator)
    kto.attach(trainer)
''')


def _run(tmp_path, mode: str, **env: str) -> list[str]:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    environ = {k: v for k, v in os.environ.items() if k not in ("KTO_PLUGIN_VERBOSITY", "RANK")}
    environ.update(PYTHONPATH=str(ROOT), HF_DATASETS_DISABLE_PROGRESS_BARS="1", **env)
    done = subprocess.run([sys.executable, str(script), mode, str(tmp_path / "out")], capture_output=True, text=True,
                          env=environ, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stderr.splitlines()


def test_a_plain_script_sees_the_summaries(tmp_path):
    lines = _run(tmp_path, "plain")
    assert sum(line.startswith("kto_plugin: prepared train (unpaired): 8 rows") for line in lines) == 1
    attached = [line for line in lines if line.startswith("kto_plugin: attached: loss=kto beta=0.1")]
    assert len(attached) == 1 and "4 desirable (weight 1.0) / 4 undesirable" in attached[0]


def test_a_script_that_configures_logging_gets_each_line_once_through_its_handler(tmp_path):
    lines = _run(tmp_path, "configured")
    assert sum("kto_plugin: attached:" in line for line in lines) == 1
    assert sum("kto_plugin: prepared train" in line for line in lines) == 1
    assert [line for line in lines if "kto_plugin" in line and not line.startswith("APP kto_plugin| ")] == []


@pytest.mark.parametrize("environ,level", [
    ({}, logging.INFO),
    ({"KTO_PLUGIN_VERBOSITY": "warning"}, logging.WARNING),
    ({"KTO_PLUGIN_VERBOSITY": " Debug "}, logging.DEBUG),
    ({"RANK": "1"}, logging.WARNING),  # other processes: warnings only, as the Trainer's log_level_replica
    ({"RANK": "1", "KTO_PLUGIN_VERBOSITY": "info"}, logging.INFO),
])
def test_default_level(environ, level):
    assert default_level(environ) == (level, None)


def test_an_unknown_verbosity_is_named():
    level, problem = default_level({"KTO_PLUGIN_VERBOSITY": "warnin"})
    assert level == logging.INFO and "KTO_PLUGIN_VERBOSITY='warnin' is not one of debug, info, warning" in problem


def test_the_logger_shows_info_by_default():
    # under pytest the root logger has handlers, so the default handler stays silent; the level is still INFO
    assert logging.getLogger(LOGGER_NAME).isEnabledFor(logging.INFO)
