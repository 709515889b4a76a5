"""The README's commands are the ones CI runs, and its snippets are real code."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from pathlib import Path

import pytest
import trl
from transformers import Trainer, TrainingArguments

from kto_plugin import KTOConfig, KTOPlugin

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

def _section(title: str) -> str:
    return re.search(rf"\n## {re.escape(title)}\n(.*?)(?=\n## |\Z)", README, re.S).group(1)


def _migration_rows() -> list[tuple[set[str], str]]:
    """(names in the TRL column, the kto_plugin column) for every row of the migration tables."""
    rows = []
    for line in _section("Migrating from TRL's KTOTrainer").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3 and cells[0] not in ("TRL", "---"):
            rows.append((set(re.findall(r"`([A-Za-z_]+)`", cells[0])), cells[1]))
    return rows


def _trl_kto_fields() -> dict[str, dataclasses.Field]:
    """TRL 1.16's own KTOConfig fields: all of its dataclass fields except TrainingArguments' ones."""
    training = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {f.name: f for f in dataclasses.fields(trl.KTOConfig) if f.name not in training}


def test_migration_table_has_a_row_for_every_trl_kto_config_field():
    assert trl.__version__.startswith("1.16")
    fields = _trl_kto_fields()
    assert len(fields) >= 15  # the oracle is TRL's real config, not an empty set
    named = set().union(*(names for names, _ in _migration_rows()))
    assert sorted(set(fields) - named) == []


def test_migration_table_has_a_row_for_every_trl_kto_trainer_argument():
    params = set(inspect.signature(trl.KTOTrainer.__init__).parameters) - {"self"}
    assert {"model", "ref_model", "args", "processing_class", "peft_config"} <= params
    named = set().union(*(names for names, _ in _migration_rows()))
    assert sorted(params - named) == []


def test_fields_marked_same_have_trls_name_and_default():
    trl_fields = _trl_kto_fields()
    ours = {f.name: f for f in dataclasses.fields(KTOConfig)}
    checked = 0
    for names, status in _migration_rows():
        if status != "**same**":
            continue
        for name in names & set(trl_fields):
            assert name in ours, f"README says {name} is the same as TRL's, but KTOConfig has no such field"
            assert ours[name].default == trl_fields[name].default, name
            checked += 1
    assert checked >= 10


def test_data_examples_prepare_as_described(tokenizer):
    block = re.search(r"## Your data: unpaired, paired, conversational\n.*?```python\n(.*?)```", README,
                      re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    kto = KTOPlugin(KTOConfig(max_length=64), tokenizer=tokenizer)
    for name in ("unpaired", "conversational"):
        prepared = kto.prepare_dataset(namespace[name], name=name)
        assert prepared["label"] == [row["label"] for row in namespace[name]]
        report = kto.data_reports[name]
        labels = [r["label"] for r in namespace[name]]
        counts = (report.n_desirable, report.n_undesirable, report.rows_out)
        assert counts == (sum(labels), len(labels) - sum(labels), len(labels))
    for name, completions in (("paired", (" Paris.", " Berlin.")), ("implicit", (" 4", " 5"))):
        prepared = kto.prepare_dataset(namespace[name], name=name)
        assert prepared["label"] == [True, False]  # the pair's chosen row, then its rejected row
        eos = [tokenizer.eos_token_id]
        assert prepared["completion_ids"] == [tokenizer(c, add_special_tokens=False)["input_ids"] + eos
                                              for c in completions]


def test_demo_picture_is_embedded_small_and_a_png():
    assert "![Reward curves of the embedded demo](docs/demo_rewards.png)" in README
    png = ROOT / "docs" / "demo_rewards.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size < 200_000


def test_newcomer_path_links_point_at_sections():
    path = re.search(r"\*\*A newcomer's path\*\*.*?\n\n(.*?)\n\n", README, re.S).group(1)
    anchors = re.findall(r"\]\(#([a-z0-9-]+)\)", path)
    assert len(anchors) == 8
    headings = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.*)$", README, re.M)}
    # sections written by other issues (#6: multi-GPU) may not be merged yet; every other link must resolve
    missing = [a for a in anchors if a not in headings]
    assert missing in ([], ["multi-gpu-and-multi-node"]), missing


def test_lora_null_reference_snippet_trains_an_adapter_against_the_base_model(tokenizer, model, rows,
                                                                             tmp_path):
    snippet = re.search(r"## LoRA with a null reference\n.*?```python\n(.*?)```", README, re.S).group(1)
    namespace = {"model": model, "tokenizer": tokenizer, "raw_rows": rows[:8],
                 "out_dir": str(tmp_path / "adapter"), "args": args(tmp_path, max_steps=1),
                 "Trainer": Trainer, "KTOConfig": KTOConfig, "KTOPlugin": KTOPlugin}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["kto"].reference.describe().startswith("the base model, adapters off")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    first = namespace["trainer"].state.log_history[0]
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)  # fresh LoRA (B = 0): policy == base == reference


def test_configuration_table_names_every_kto_config_field():
    section = README.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([a-z_]+)`", section))
    assert sorted(f.name for f in dataclasses.fields(KTOConfig) if f.name not in named) == []
