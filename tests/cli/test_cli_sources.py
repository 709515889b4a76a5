"""`kto-plugin train` on data and models from where users keep them, its grouped `--help`, several trackers,
the progress lines of each phase, and the demo's own reward plot."""

from __future__ import annotations

import json
import logging
import re
import sys

import datasets
import pytest
import torch
from helpers import cache_hub_dataset, offline_datasets_cache

from kto_plugin.cli import main, parse_train_args

FAST = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--report_to", "none",
        "--use_cpu", "true", "--max_length", "128"]
PAIRS = [{"prompt": f"What is {i} + 1?", "chosen": f" {i + 1}.", "rejected": f" {i + 2}."} for i in range(12)]


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    return offline_datasets_cache(tmp_path, monkeypatch)


def _history(out):
    return json.loads((out / "log_history.json").read_text())


def test_a_hub_dataset_by_name_offline_and_one_line_per_phase(tmp_path, model_dir, offline_hub_cache, caplog):
    cache_hub_dataset(offline_hub_cache, "kto-org/pairs", PAIRS, tmp_path)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="kto_plugin"):
        assert main(["train", "--model_name_or_path", str(model_dir), "--dataset_name", "kto-org/pairs",
                     "--output_dir", str(out), *FAST]) == 0
    assert len([h for h in _history(out) if "loss" in h]) == 2
    lines = [r.getMessage() for r in caplog.records]

    def one(pattern):
        found = [line for line in lines if re.search(pattern, line)]
        assert len(found) == 1, (pattern, lines)

    one(rf"^kto-plugin: loaded model {re.escape(str(model_dir))}: 0\.\dM parameters \(0\.\dM trainable\) in [\d.]+ s$")
    one(r"^kto-plugin: loaded kto-org/pairs \(Hub dataset\): train 12 rows in [\d.]+ s$")
    one(r"^kto_plugin: prepared train \(paired, trl order\): 24 rows from 12 input rows; .*prepared in [\d.]+ s$")


def test_a_save_to_disk_folder_with_a_test_split(tmp_path, model_dir):
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS[:8]),
                          "test": datasets.Dataset.from_list(PAIRS[8:])}).save_to_disk(str(saved))
    out = tmp_path / "run"
    assert main(["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(saved),
                 "--dataset_test_split", "test", "--output_dir", str(out), *FAST]) == 0
    history = _history(out)
    assert [h["step"] for h in history if "loss" in h] == [1, 2]
    # evaluated once, after the last step, inside train() (so a tracker records it in the training's run)
    assert [h["step"] for h in history if "eval_rewards/margins" in h] == [2]


def test_an_adapter_folder_trains_that_adapter_against_its_frozen_copy(tmp_path, base_model, tokenizer):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "run"
    base_model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    torch.manual_seed(3)
    peft_model = get_peft_model(type(base_model).from_pretrained(base_dir),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():  # a trained adapter: B is no longer zero, so the adapter changes the outputs
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(adapter_dir)  # the adapter alone, no tokenizer: both come from the base folder
    data = tmp_path / "pairs.jsonl"
    datasets.Dataset.from_list(PAIRS).to_json(str(data))
    assert main(["train", "--model_name_or_path", str(adapter_dir), "--dataset_name", str(data), "--use_peft",
                 "--learning_rate", "1e-2", "--output_dir", str(out), *FAST]) == 0
    first = next(h for h in _history(out) if "loss" in h)
    # step 1: policy == reference (the adapter as loaded), so every reward is 0; the base model as reference
    # (the adapter switched off) would give rewards far from 0 with this adapter. Up to float rounding: the
    # reference scores completions against its prompts' cache, the Trainer's forward runs full rows
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-5) and first["rewards/rejected"] == pytest.approx(
        0, abs=1e-5) and first["loss"] == pytest.approx(0.5)
    assert "a frozen copy of adapter 'default'" in (out / "README.md").read_text()
    before, after = load_file(adapter_dir / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert before.keys() == after.keys() and not (out / "model.safetensors").exists()
    for key in before:  # the same adapter, trained further (not a fresh one: a fresh B starts at zero)
        assert not torch.equal(before[key], after[key])
        assert torch.allclose(before[key], after[key], atol=0.05), key


def test_help_lists_the_flags_in_sections(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    titles = ["model:", "LoRA:", "data:", "KTO (KTOConfig):", "Trainer (TrainingArguments):"]
    starts = [text.index("\n" + title + "\n") for title in titles]
    assert starts == sorted(starts)
    bounds = zip(starts, starts[1:] + [len(text)], strict=True)
    sections = dict(zip(titles, (text[a:b] for a, b in bounds), strict=True))
    expected = {"model:": ["--model_name_or_path", "--ref_model_name_or_path", "--dtype"],
                "LoRA:": ["--use_peft", "--lora_r", "--lora_target_modules", "--use_rslora"],
                "data:": ["--dataset_name", "--dataset_test_split"],
                "KTO (KTOConfig):": ["--beta", "--loss_type", "--max_length", "--generate_during_eval"],
                "Trainer (TrainingArguments):": ["--learning_rate", "--report_to", "--output_dir"]}
    for title, flags in expected.items():
        for flag in flags:
            owners = [t for t, body in sections.items() if re.search(rf"\n  {flag}\b", body)]
            assert owners == [title], (flag, owners)


def test_several_trackers_on_the_command_line(tmp_path):
    *_, training_args, _ = parse_train_args(["--report_to", "tensorboard", "mlflow", "--output_dir", str(tmp_path)])
    assert training_args.report_to == ["tensorboard", "mlflow"]
    *_, training_args, _ = parse_train_args(["--report_to", "none", "--output_dir", str(tmp_path)])
    assert training_args.report_to == []


def test_the_demo_draws_its_reward_plot_titled_by_the_run(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the plot extra is in the dev extra")
    from kto_plugin.cli._plot import run_title

    out = tmp_path / "my-run"
    assert main(["train", "--demo_pairs", "12", "--eval_strategy", "no", "--output_dir", str(out), *FAST]) == 0
    png = out / "kto_metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Reward curves: {png} (redraw: kto-plugin plot {out})" in capsys.readouterr().out
    # the title names the run, not where it happened to be written
    assert run_title(str(out)) == "KTO run 'my-run': embedded tiny Llama on shipped HH-RLHF sample"


def test_without_matplotlib_the_demo_says_how_to_get_its_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    out = tmp_path / "run"
    assert main(["train", "--demo_pairs", "12", "--eval_strategy", "no", "--output_dir", str(out), *FAST]) == 0
    assert not (out / "kto_metrics.png").exists()
    printed = capsys.readouterr().out
    assert f"Plot the run: pip install 'kto_plugin[plot]' (matplotlib), then kto-plugin plot {out}" in printed
