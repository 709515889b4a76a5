"""The README's commands are the ones CI runs, and its four-line snippet is real code."""

from __future__ import annotations

import re
from pathlib import Path

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
