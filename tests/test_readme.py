"""The README's commands are the ones CI runs, and its snippets are real code."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from transformers import Trainer

from helpers import args

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _setup_commands():
    block = re.search(r"## Set-up: two commands.*?```bash\n(.*?)```", README, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_two_setup_commands_and_ci_runs_the_test_one():
    commands = _setup_commands()
    assert len(commands) == 2
    assert "kto-plugin train" in commands[0] and "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_four_line_snippet_names_the_public_api():
    snippet = re.search(r"## Add KTO to your Trainer\n\n```python\n(.*?)```", README, re.S).group(1)
    for name in ("KTOPlugin(KTOConfig(", "kto.prepare_dataset(", "data_collator=kto.collator", "kto.attach(trainer)"):
        assert name in snippet
    compile(snippet, "README", "exec")


def test_writing_a_plugin_snippet_trains_with_its_loss(tokenizer, model, rows, tmp_path):
    snippet = re.search(r"## Writing a plugin\n.*?```python\n(.*?)```", README, re.S).group(1)
    plugin = snippet.split("class ", 1)[1].split("\nkto = ")[0]
    plugin_lines = [line for line in plugin.splitlines() if line.strip()]
    assert len(plugin_lines) == 10  # the README promises a ten-line plugin
    namespace = {"tokenizer": tokenizer}
    exec(compile(snippet, "README.md", "exec"), namespace)
    kto = namespace["kto"]
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=kto.prepare_dataset(rows),
                      data_collator=kto.collator)
    kto.attach(trainer)
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)  # -log sigmoid(0)


def test_data_formats_examples_prepare(tokenizer):
    import ast
    import warnings

    from kto_plugin import KTOConfig, KTOPlugin
    from kto_plugin.warnings import KTOPluginWarning

    section = README.split("## Data formats", 1)[1].split("\n## ", 1)[0]
    examples = re.findall(r"^\| ([a-z ]+) \| `(\{.*\})` \|$", section, re.M)
    assert len(examples) == 6
    for kind, text in examples:
        kto = KTOPlugin(KTOConfig(), tokenizer=tokenizer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KTOPluginWarning)  # one row of one label
            out = kto.prepare_dataset([ast.literal_eval(text)])
        report = kto.data_reports["train"]
        assert report.conversational == kind.startswith("conversational")
        assert report.format == {"unpaired": "unpaired", "paired": "paired", "implicit prompt": "implicit_prompt"}[
            kind.removeprefix("conversational ")]
        assert len(out) == (1 if report.format == "unpaired" else 2)
