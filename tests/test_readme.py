"""The README's commands are the ones CI runs, and the snippets of the README and of the guides in docs/ are
real code; every link between them resolves."""

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
DOCS = ROOT / "docs"
GUIDES = sorted(p.stem for p in DOCS.glob("*.md") if p.name != "README.md")


def doc(name: str) -> str:
    """The text of the guide docs/<name>.md."""
    return (DOCS / f"{name}.md").read_text()


def _setup_commands():
    block = re.search(r"## Set-up: two commands.*?```bash\n(.*?)```", README, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_two_setup_commands_and_ci_runs_the_test_one():
    commands = _setup_commands()
    assert len(commands) == 2
    assert "kto-plugin train" in commands[0] and "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_command_one_installs_what_the_main_job_advises_next():
    """The main job ends by drawing (or pointing at) `kto-plugin plot`, which needs matplotlib: command 1 installs
    the `plot` extra, and that extra is matplotlib (tests/cli/test_cli_sources.py checks the demo draws the PNG)."""
    plot_extra = re.search(r"^plot = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert '"matplotlib' in plot_extra
    assert '-e ".[plot]"' in _setup_commands()[0]


def test_four_line_snippet_names_the_public_api():
    snippet = re.search(r"## Add KTO to your Trainer\n\n```python\n(.*?)```", README, re.S).group(1)
    for name in ("KTOPlugin(KTOConfig(", "kto.prepare_dataset(", "data_collator=kto.collator", "kto.attach(trainer)"):
        assert name in snippet
    compile(snippet, "README", "exec")


def test_writing_a_plugin_snippet_trains_with_its_loss(tokenizer, model, rows, tmp_path):
    snippet = re.search(r"## Writing a plugin\n.*?```python\n(.*?)```", doc("plugins"), re.S).group(1)
    plugin = snippet.split("class ", 1)[1].split("\nkto = ")[0]
    plugin_lines = [line for line in plugin.splitlines() if line.strip()]
    assert len(plugin_lines) == 10  # docs/plugins.md promises a ten-line plugin
    namespace = {"tokenizer": tokenizer}
    exec(compile(snippet, "docs/plugins.md", "exec"), namespace)
    kto = namespace["kto"]
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=kto.prepare_dataset(rows),
                      data_collator=kto.collator)
    kto.attach(trainer)
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)  # -log sigmoid(0)


def test_data_formats_examples_prepare(tokenizer):
    import ast
    import warnings

    from kto_plugin import KTOConfig, KTOPlugin, KTOPluginWarning

    section = doc("data").split("## Data formats", 1)[1].split("\n## ", 1)[0]
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


def _migration_rows() -> list[tuple[set[str], str]]:
    """(names in the TRL column, the kto_plugin column) for every row of the migration tables."""
    rows = []
    for line in doc("migrating-from-trl").splitlines():
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
            assert name in ours, f"docs/migrating-from-trl.md says {name} is the same as TRL's, but KTOConfig has no such field"
            assert ours[name].default == trl_fields[name].default, name
            checked += 1
    assert checked >= 10


def test_data_examples_prepare_as_described(tokenizer):
    block = re.search(r"## Your data: unpaired, paired, conversational\n.*?```python\n(.*?)```", doc("data"),
                      re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "docs/data.md", "exec"), namespace)
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
    links = re.findall(r"\]\(([^)]+)\)", path)
    assert len(links) == 8
    assert [link for link in links if _unresolved(ROOT / "README.md", link)] == []


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
    section = doc("configuration")
    named = set(re.findall(r"`([a-z_]+)`", section))
    assert sorted(f.name for f in dataclasses.fields(KTOConfig) if f.name not in named) == []


def _python_block_after(heading_regex: str, text: str = README) -> str:
    return re.search(heading_regex + r".*?```python\n(.*?)```", text, re.S).group(1)


def _first_step_loss(trainer) -> float:
    return next(h["loss"] for h in trainer.state.log_history if "loss" in h)


def test_four_line_snippet_runs_as_written(tokenizer, model, rows, tmp_path):
    snippet = _python_block_after(r"## Add KTO to your Trainer\n")
    namespace = {"tokenizer": tokenizer, "model": model, "raw_rows": rows[:8], "raw_eval_rows": rows[8:12],
                 "args": args(tmp_path, max_steps=1)}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["kto"].config.beta == 0.1 and namespace["trainer"].state.global_step == 1
    reports = namespace["kto"].data_reports  # the eval set is reported under its own name
    assert (reports["train"].rows_in, reports["eval"].rows_in) == (8, 4)
    assert len(namespace["trainer"].eval_dataset) == reports["eval"].rows_out
    # step 1: policy == its frozen initial copy, so every reward is 0 and the KTO loss is 1 - sigmoid(0)
    assert _first_step_loss(namespace["trainer"]) == pytest.approx(0.5, abs=1e-6)


def test_migration_snippet_runs_as_written(tokenizer, model, rows, tmp_path):
    snippet = re.search(r"```python\n(# kto_plugin\n.*?)```", doc("migrating-from-trl"), re.S).group(1)
    namespace = {"tokenizer": tokenizer, "model": model, "raw": rows[:8], "out": str(tmp_path),
                 "TrainingArguments": TrainingArguments, "Trainer": Trainer, "KTOConfig": KTOConfig,
                 "KTOPlugin": KTOPlugin}
    short = 'train_sampling_strategy="sequential", max_steps=1, logging_steps=1, report_to="none")'
    assert 'train_sampling_strategy="sequential")' in snippet
    snippet = snippet.replace('train_sampling_strategy="sequential")', short)
    exec(compile(snippet, "docs/migrating-from-trl.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.args.learning_rate == 1e-6 and namespace["kto"].config.beta == 0.1
    assert trainer.args.train_sampling_strategy == "sequential" and trainer.processing_class is tokenizer
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "tokenizer.json").exists()  # the tokenizer is saved with the model, as TRL does
    assert _first_step_loss(trainer) == pytest.approx(0.5, abs=1e-6)


def test_peft_config_snippet_wraps_and_trains_an_adapter(tokenizer, model, rows, tmp_path):
    from peft import PeftModel

    snippet = re.search(r"```python\n(from peft import LoraConfig\n\nkto = KTOPlugin.*?)```", doc("models"),
                        re.S).group(1)
    namespace = {"tokenizer": tokenizer, "model": model, "raw": rows[:8], "args": args(tmp_path, max_steps=1),
                 "Trainer": Trainer, "KTOConfig": KTOConfig, "KTOPlugin": KTOPlugin}
    exec(compile(snippet + "trainer.train()\n", "docs/models.md", "exec"), namespace)
    assert isinstance(namespace["trainer"].model, PeftModel)
    assert namespace["kto"].reference.describe().startswith("the base model, adapters off")
    assert _first_step_loss(namespace["trainer"]) == pytest.approx(0.5, abs=1e-6)  # fresh LoRA: policy == base


def test_resume_snippet_resumes_from_the_checkpoint(tokenizer, base_model, rows, tmp_path):
    from transformers import AutoModelForCausalLM

    snippet = _python_block_after(r"## Resuming a run\n", doc("multi-gpu"))
    base_dir = tmp_path / "base"
    base_model.save_pretrained(base_dir)
    run_args = args(tmp_path / "out", max_steps=2, save_strategy="steps", save_steps=1)
    first = KTOPlugin(KTOConfig(beta=0.1), tokenizer=tokenizer)
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(base_dir), args=run_args,
                      train_dataset=first.prepare_dataset(rows[:8]), data_collator=first.collator)
    first.attach(trainer)
    trainer.train()
    uninterrupted = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert checkpoint.is_dir()
    steps_run = []

    class CountingTrainer(Trainer):
        def training_step(self, *a, **kw):
            steps_run.append(self.state.global_step)
            return super().training_step(*a, **kw)

    namespace = {"AutoModelForCausalLM": AutoModelForCausalLM, "base_model": str(base_dir), "tokenizer": tokenizer,
                 "raw_rows": rows[:8], "args": run_args, "Trainer": CountingTrainer, "KTOConfig": KTOConfig,
                 "KTOPlugin": KTOPlugin}
    exec(compile(snippet.replace('"out/checkpoint-500"', repr(str(checkpoint))), "docs/multi-gpu.md", "exec"),
         namespace)
    resumed = namespace["trainer"]
    assert resumed.state.global_step == 2 and steps_run == [1]  # only step 2 ran: it resumed, not restarted
    assert [h["loss"] for h in resumed.state.log_history if "loss" in h][-1] == uninterrupted[-1]


def _github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _prose(text: str) -> str:
    """Markdown without fenced code blocks (a `# comment` in a bash block is no heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _slugs(path: Path) -> set[str]:
    return {_github_slug(h) for h in re.findall(r"^#+ (.*)$", _prose(path.read_text()), re.M)}


def _links(path: Path) -> list[str]:
    """Link and image targets of a Markdown file, outside code blocks and code spans."""
    prose = re.sub(r"`[^`\n]*`", "", _prose(path.read_text()))
    return re.findall(r"\]\(([^)\s]+)\)", prose)


def _unresolved(source: Path, link: str) -> str | None:
    """Why `link` in `source` does not resolve (a missing file or heading), or None where it does.
    Relative links resolve against the source's folder, as on GitHub; web addresses are not fetched."""
    if re.match(r"[a-z]+:", link):
        return None
    target, _, anchor = link.partition("#")
    path = (source.parent / target).resolve() if target else source
    if not path.exists():
        return f"{source.relative_to(ROOT)}: {link}: no file {path}"
    if anchor and (path.suffix != ".md" or anchor not in _slugs(path)):
        return f"{source.relative_to(ROOT)}: {link}: no heading #{anchor} in {path.name}"
    return None


MARKDOWN = [ROOT / "README.md", *sorted(DOCS.glob("*.md")), *sorted((ROOT / "examples").glob("**/*.md"))]


def test_every_anchor_and_relative_link_resolves():
    assert _github_slug("`kl_estimate`: `\"batch\"` or `\"window\"`") == "kl_estimate-batch-or-window"
    assert "kl_estimate-batch-or-window" in _slugs(DOCS / "multi-gpu.md")
    links = {(path, link) for path in MARKDOWN for link in _links(path)}
    anchors = {(path, link) for path, link in links if "#" in link}
    assert len(anchors) >= 15
    assert sorted(filter(None, (_unresolved(path, link) for path, link in links))) == []
    named = {name for path in MARKDOWN
             for name in re.findall(r"`((?:examples|tests|benchmarks|docs|kto_plugin)/[^` :]+)`", path.read_text())}
    assert named and sorted(name for name in named if not (ROOT / name).exists()) == []


def test_readme_is_a_landing_page_that_links_every_guide():
    assert len(README.splitlines()) <= 300  # the landing page; the reference material lives in docs/
    assert len(GUIDES) >= 9
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in _links(ROOT / "README.md")}
    assert sorted(name for name in GUIDES if (DOCS / f"{name}.md").resolve() not in linked) == []
    assert (DOCS / "README.md").resolve() in linked


def test_docs_index_lists_every_guide():
    linked = {(DOCS / link.partition("#")[0]).resolve() for link in _links(DOCS / "README.md")}
    assert sorted(name for name in GUIDES if (DOCS / f"{name}.md").resolve() not in linked) == []


def test_docs_name_only_module_paths_that_stay():
    """The package is being grouped into sub-packages of private modules: the docs name only the top level, its
    sub-packages and the modules users import, never a module that moves (`kto_plugin.sync`, ...)."""
    import kto_plugin

    stay = {"kto_plugin", "kto_plugin.loss", "kto_plugin.hookspecs", "kto_plugin.config", "kto_plugin.demo",
            "kto_plugin.cli", "kto_plugin.data", "kto_plugin.reference", "kto_plugin.integrations", "kto_plugin.hooks",
            "kto_plugin.errors", "kto_plugin.step", "kto_plugin.trainer", "kto_plugin.plugin"}
    named = set()
    for path in MARKDOWN:
        for name in re.findall(r"`(kto_plugin(?:\.\w+)*)", path.read_text()):
            parts = name.split(".")
            while parts[-1][:1].isupper() or (len(parts) == 2 and parts[1] in kto_plugin.__all__):
                parts.pop()  # a class, or a name the top level exports
            named.add((str(path.relative_to(ROOT)), ".".join(parts)))
    assert sorted((file, name) for file, name in named if name not in stay) == []


def test_newcomer_path_names_every_example():
    paragraph = re.search(r"`examples/` holds runnable scripts:(.*?)\n\n", README, re.S).group(1)
    named = set(re.findall(r"`([\w./-]+)`", paragraph))
    examples = {p.name + ("/" if p.is_dir() else "") for p in (ROOT / "examples").iterdir()
                if not p.name.startswith((".", "__"))}
    assert len(examples) >= 6
    assert sorted(examples - named) == []
