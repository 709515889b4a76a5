"""kto_plugin.cli._errors: a mistake on the command line is one line on stderr and a non-zero exit; the fix it
names works when followed (a data file edited as it says, a flag spelled as it suggests)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kto_plugin.cli import main, parse_train_args
from kto_plugin.cli._errors import TRACEBACK_ENV, one_line, run
from kto_plugin.cli._train import check_sources

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--max_steps", "1", "--per_device_train_batch_size", "4", "--report_to", "none", "--use_cpu", "true",
        "--max_length", "128", "--save_strategy", "no"]


def _unpaired(labels) -> list[dict]:
    return [{"prompt": f"What is {i} + 1?", "completion": f" {i + 1 + (i % 2)}.", "label": label}
            for i, label in enumerate(labels)]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("kto-plugin")]  # progress bars aside
    assert len(lines) == 1, err  # one line
    return lines[0]


def test_bad_label_in_a_jsonl_file_is_one_line_and_its_fix_trains(tmp_path, model_dir, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _unpaired(["yes", "no"] * 4)))
    argv = ["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir",
            str(tmp_path / "run"), *FAST]
    assert main(argv) == 1
    line = _error_line(capsys)
    assert line.startswith(f"kto-plugin train: error: {data} (rows count from 0): train dataset, row 0: 'label' is "
                           "'yes' (str)")
    assert "dataset.map" not in line  # the fix is for the file, not Python
    mapping = dict(re.findall(r"'(\w+)' -> (true|false)", line.split(f"In {data} write", 1)[1]))
    assert mapping == {"yes": "true", "no": "false"}
    # the user edits the file as told: "label": true, without quotes
    data.write_text("\n".join(json.dumps({**r, "label": mapping[r["label"]] == "true"})
                              for r in _unpaired(["yes", "no"] * 4)))
    assert main(argv) == 0


def test_integer_labels_in_a_csv_file_get_a_fix_that_trains(tmp_path, model_dir, capsys):
    import csv

    data = tmp_path / "data.csv"

    def write(labels):
        with open(data, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["prompt", "completion", "label"])
            writer.writeheader()
            writer.writerows(_unpaired(labels))

    write([1, 0] * 4)
    argv = ["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir",
            str(tmp_path / "run"), *FAST]
    assert main(argv) == 1
    line = _error_line(capsys)
    assert "'label' is 1 (int)" in line and "1 -> true" in line and "0 -> false" in line
    assert "CSV: True or False" in line
    write(["True", "False"] * 4)  # as the line says for a CSV file
    assert main(argv) == 0


def test_unknown_loss_type_is_one_line_naming_the_flag(tmp_path, capsys):
    assert main(["train", "--demo_pairs", "8", "--loss_type", "kto2", "--output_dir", str(tmp_path), *FAST]) == 1
    from kto_plugin import KTOConfig, KTOPluginManager

    available = sorted(KTOPluginManager(autoload=False).loss_types(KTOConfig()))
    assert "bco" in available and "kto" in available
    assert _error_line(capsys).startswith(f"kto-plugin train: error: Unknown --loss_type 'kto2'. Available: {available}.")


def test_config_field_errors_name_the_flag(tmp_path, capsys):
    assert main(["train", "--beta", "-1", "--output_dir", str(tmp_path)]) == 1
    assert _error_line(capsys) == "kto-plugin train: error: --beta must be > 0, got -1.0. The paper uses beta=0.1."
    assert main(["train", "--beta", "abc", "--output_dir", str(tmp_path)]) == 2  # argparse's own, as one line
    assert _error_line(capsys) == "kto-plugin train: error: argument --beta: invalid float value: 'abc'"


def test_mistyped_flag_suggests_the_flag(tmp_path, capsys):
    assert main(["train", "--betta", "0.2", "--output_dir", str(tmp_path)]) == 2
    assert _error_line(capsys) == ("kto-plugin train: error: unknown flag --betta. Did you mean --beta? "
                                   "'kto-plugin train --help' lists every flag.")
    assert main(["train", "--learnig_rate=1e-5", "--output_dir", str(tmp_path)]) == 2
    assert "unknown flag --learnig_rate. Did you mean --learning_rate?" in _error_line(capsys)
    config = tmp_path / "run.yaml"
    config.write_text("betta: 0.2\n")
    with pytest.raises(SystemExit, match=r"unknown keys in .*\['betta'\]\. Did you mean 'beta'\?"):
        main(["train", "--config", str(config)])


def test_mistyped_command_suggests_the_command(capsys):
    assert main(["trian"]) == 2
    assert _error_line(capsys) == "kto-plugin: error: unknown command 'trian'. Did you mean 'train'? Commands: plot, train."


def test_local_looking_paths_that_do_not_exist_say_no_such_file(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "good.jsonl").write_text("\n".join(json.dumps(r) for r in _unpaired([True, False] * 4)))
    assert main(["train", "--model_name_or_path", "model", "--dataset_name", "god.jsonl", *FAST]) == 1
    assert _error_line(capsys) == (f"kto-plugin train: error: --dataset_name 'god.jsonl': no such file or directory "
                                   f"({tmp_path / 'god.jsonl'}). Did you mean 'good.jsonl'?")
    assert main(["train", "--model_name_or_path", "./modle", "--dataset_name", "good.jsonl", *FAST]) == 1
    assert _error_line(capsys).endswith("no such file or directory (" + str(tmp_path / "modle") + "). Did you mean "
                                        "'./model'?")


def test_a_bare_name_neither_here_nor_on_the_hub_says_both(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # offline, as a machine without network: the Hub cannot have it (and no connection is waited for)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    (tmp_path / "good.jsonl").write_text("\n".join(json.dumps(r) for r in _unpaired([True, False] * 4)))
    assert main(["train", "--model_name_or_path", "modle", "--dataset_name", "good.jsonl", *FAST]) == 1
    line = _error_line(capsys)
    assert line.startswith(f"kto-plugin train: error: --model_name_or_path 'modle' is neither a file or folder here "
                           f"({tmp_path / 'modle'}) nor loadable from the Hub (")
    assert line.endswith("Did you mean 'model'?")


def test_model_folder_without_tokenizer_asks_for_the_flag_which_then_trains(tmp_path, base_model, tokenizer, capsys):
    weights, tokenizer_dir = tmp_path / "weights", tmp_path / "tok"
    base_model.save_pretrained(weights)
    tokenizer.save_pretrained(tokenizer_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _unpaired([True, False] * 4)))
    argv = ["train", "--model_name_or_path", str(weights), "--dataset_name", str(data), "--output_dir",
            str(tmp_path / "run"), *FAST]
    assert main(argv) == 1
    assert _error_line(capsys).startswith(f"kto-plugin train: error: the model folder '{weights}' holds no tokenizer "
                                          "(none of tokenizer.json, tokenizer_config.json, ...). Pass "
                                          "--tokenizer_name_or_path")
    assert main([*argv, "--tokenizer_name_or_path", str(tokenizer_dir)]) == 0
    assert (tmp_path / "run" / "tokenizer.json").exists()


def test_run_yaml_stores_absolute_paths_and_reruns_from_elsewhere(tmp_path, model_dir, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.jsonl").write_text("\n".join(json.dumps(r) for r in _unpaired([True, False] * 4)))
    monkeypatch.chdir(work)
    assert main(["train", "--model_name_or_path", os.path.relpath(model_dir), "--dataset_name", "data.jsonl",
                 "--output_dir", "run", *FAST]) == 0
    saved = yaml.safe_load((work / "run" / "kto_run.yaml").read_text())
    assert saved["model_name_or_path"] == str(model_dir)
    assert saved["dataset_name"] == str(work / "data.jsonl") and saved["output_dir"] == str(work / "run")
    monkeypatch.chdir(tmp_path)  # elsewhere: every path of the file still names the same file or folder
    model_args, data_args, _, training_args, _ = parse_train_args(["--config", str(work / "run" / "kto_run.yaml")])
    check_sources(model_args, data_args)
    assert training_args.output_dir == str(work / "run")


def test_plot_of_a_missing_directory_says_no_such_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"kto-plugin plot: 'missing_dir': no such directory \(" +
                       re.escape(str(tmp_path / "missing_dir")) + r"\)"):
        main(["plot", "missing_dir"])


def test_an_error_raised_elsewhere_names_its_origin_and_the_traceback_switch(monkeypatch, capsys):
    from transformers import AutoConfig

    def command(argv):
        AutoConfig.for_model("no_such_model_type")
        return 0

    assert run(command, [], "kto-plugin train") == 1
    line = _error_line(capsys)
    assert line.startswith("kto-plugin train: error: ValueError (from transformers): Unrecognized model identifier")
    assert line.endswith(f"({TRACEBACK_ENV}=1 shows the traceback)")
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(ValueError, match="Unrecognized model identifier"):
        run(command, [], "kto-plugin train")


def test_one_line_reads_a_key_error_without_its_quotes():
    from kto_plugin import KTOCollator

    with pytest.raises(KeyError) as err:
        KTOCollator(pad_token_id=0)([{"label": True}])
    assert one_line(err.value).startswith("KTOCollator: row 0 has no 'prompt_ids' column (it has ['label']).")


def test_the_command_exits_non_zero_with_one_line(tmp_path):
    """The installed entry point, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(TRACEBACK_ENV, None)
    done = subprocess.run([sys.executable, "-m", "kto_plugin.cli", "train", "--betta", "0.2"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["kto-plugin train: error: unknown flag --betta. Did you mean --beta? "
                                                "'kto-plugin train --help' lists every flag."]
