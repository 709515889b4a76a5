"""The `kto-plugin` command line, run in-process with short settings (offline: local model and data)."""

from __future__ import annotations

import json
import math
import os
import re
import sys

import pytest

from kto_plugin import __version__
from kto_plugin.cli import main

FAST = ["--max_steps", "3", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--report_to", "none",
        "--use_cpu", "true", "--max_length", "128"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_help_is_readable(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model_name_or_path", "--dataset_name", "--beta", "--loss_type", "--use_peft", "--lora_r",
                 "--learning_rate", "--max_length"):
        assert flag in text
    assert main([]) == 2  # no command: the top-level help


def test_train_embedded_default(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--demo_pairs", "24", "--eval_strategy", "no", "--output_dir", str(out), *FAST])
    assert code == 0
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed and "kto-plugin plot" in printed
    history = json.loads((out / "log_history.json").read_text())
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 3 and "rewards/margins" in steps[0]
    assert json.loads((out / "kto_config.json").read_text())["max_length"] == 128
    assert json.loads((out / "training_args.json").read_text())["max_steps"] == 3
    for name in ("model.safetensors", "tokenizer.json", "trainer_state.json"):
        assert os.path.exists(out / name), name
    card = (out / "README.md").read_text()
    assert "| rewards/margins |" in card and "ethayarajh2024kto" in card and "| beta | 0.1 |" in card


def test_train_config_file_and_override(tmp_path):
    config = tmp_path / "kto.yaml"
    config.write_text("beta: 0.25\nloss_type: apo_zero_unpaired\nmax_steps: 1\nper_device_train_batch_size: 4\n"
                      "demo_pairs: 12\nmax_length: 96\nreport_to: none\nuse_cpu: true\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--beta", "0.5", "--output_dir", str(out)]) == 0
    saved = json.loads((out / "kto_config.json").read_text())
    assert saved["beta"] == 0.5 and saved["loss_type"] == "apo_zero_unpaired"


def test_unknown_config_key_is_refused(tmp_path):
    config = tmp_path / "kto.yaml"
    config.write_text("betta: 0.2\n")
    with pytest.raises(SystemExit, match=r"unknown keys.*'betta'"):
        main(["train", "--config", str(config)])


def test_named_local_model_and_jsonl_data_with_lora(tmp_path, base_model, tokenizer, rows):
    model_dir = tmp_path / "model"
    base_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows[:24]))
    out = tmp_path / "run"
    code = main(["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--use_peft",
                 "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", "--output_dir", str(out), *FAST])
    assert code == 0
    assert os.path.exists(out / "adapter_config.json") and not os.path.exists(out / "model.safetensors")
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    card = (out / "README.md").read_text()
    assert "the base model, adapters off" in card  # the null reference


def test_model_without_data_is_refused():
    with pytest.raises(SystemExit, match="name both"):
        main(["train", "--model_name_or_path", "x", "--output_dir", "unused"])


def test_plot_writes_a_png(tmp_path):
    import matplotlib  # noqa: F401  (the `plot` extra; part of `dev`, so CI runs this)
    out = tmp_path / "run"
    main(["train", "--demo_pairs", "24", "--output_dir", str(out), *FAST, "--eval_strategy", "steps",
          "--eval_steps", "2"])
    assert main(["plot", str(out)]) == 0
    png = out / "kto_metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "log_history.json").write_text(json.dumps([{"step": 1, "loss": 0.5}]))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    with pytest.raises(SystemExit, match=r"pip install 'kto_plugin\[plot\]'"):
        main(["plot", str(tmp_path)])


def test_plot_of_a_directory_without_logs(tmp_path):
    with pytest.raises(SystemExit, match="No log history"):
        main(["plot", str(tmp_path)])

def test_config_flag_is_in_help_and_accepts_the_equals_form(tmp_path, capsys):
    from kto_plugin.cli import parse_train_args

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--config FILE.yaml" in capsys.readouterr().out
    config = tmp_path / "kto.yaml"
    config.write_text("beta: 0.25\nlora_target_modules: [q_proj, v_proj]\n")
    model_args, _, kto_config, _, given = parse_train_args([f"--config={config}", "--output_dir", str(tmp_path)])
    assert kto_config.beta == 0.25 and model_args.lora_target_modules == ["q_proj", "v_proj"]
    assert {"beta", "lora_target_modules"} <= given


def test_test_split_of_a_directory_is_evaluated_and_a_missing_one_refused(tmp_path, model_dir, rows):
    import datasets

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    datasets.Dataset.from_list(rows[:24]).to_json(str(data_dir / "train.jsonl"))
    datasets.Dataset.from_list(rows[24:32]).to_json(str(data_dir / "test.jsonl"))
    out = tmp_path / "run"
    assert main(["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir),
                 "--dataset_test_split", "test", "--output_dir", str(out), *FAST, "--max_steps", "1"]) == 0
    assert any("eval_rewards/margins" in h for h in json.loads((out / "log_history.json").read_text()))
    eval_row = [line for line in (out / "README.md").read_text().splitlines() if line.startswith("| loss |")]
    assert eval_row and not eval_row[0].rstrip().endswith("| - |")  # the card's eval column is filled
    with pytest.raises(SystemExit, match=r"no split 'test' in .*data/train.jsonl \(it has \['train'\]\)"):
        main(["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir / "train.jsonl"),
              "--dataset_test_split", "test", "--output_dir", str(out), *FAST])

def _short_pairs(n=12):
    return [{"prompt": f"What is {i} + 1?", "chosen": f" {i + 1}.", "rejected": f" {i + 2}."} for i in range(n)]


@pytest.mark.parametrize("kind, ext", [("unpaired", "parquet"), ("paired", "csv"), ("implicit_prompt", "parquet"),
                                        ("conversational", "jsonl")])
def test_local_file_of_each_format(tmp_path, model_dir, kind, ext, caplog):
    import datasets

    pairs = _short_pairs()
    if kind == "unpaired":
        data = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
                for p in pairs for side in ("chosen", "rejected")]
    elif kind == "paired":
        data = pairs
    elif kind == "implicit_prompt":
        data = [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]} for p in pairs]
    else:
        data = [{"prompt": [{"role": "user", "content": p["prompt"]}],
                 "completion": [{"role": "assistant", "content": p[side].strip()}], "label": side == "chosen"}
                for p in pairs for side in ("chosen", "rejected")]
    path = tmp_path / f"data.{ext}"
    ds = datasets.Dataset.from_list(data)
    {"parquet": ds.to_parquet, "csv": lambda p: ds.to_csv(p, index=False), "jsonl": ds.to_json}[ext](str(path))
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="kto_plugin"):
        assert main(["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(path), "--output_dir",
                     str(out), *FAST, "--max_steps", "1"]) == 0
    fmt = "conversational unpaired" if kind == "conversational" else kind
    assert f"prepared train ({fmt}" in caplog.text
    assert f": 24 rows from {len(data)} input rows; 12 desirable / 12 undesirable" in caplog.text
    assert json.loads((out / "log_history.json").read_text())[0]["loss"] > 0



def test_torchrun_on_cpu_trains_one_distributed_run(tmp_path):
    """Two processes under torchrun on a CPU-only machine, no --use_cpu: one DDP run (gloo), not two copies."""
    import subprocess

    import torch

    if torch.accelerator.is_available():
        pytest.skip("the CPU-only case: this machine has an accelerator")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                          os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kto_plugin.cli",
         "train", "--demo_pairs", "24", "--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length",
         "128", "--logging_steps", "1", "--eval_strategy", "no", "--output_dir", str(out)],
        env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("kto-plugin: done.") == 1  # only the main process writes the outputs
    history = json.loads((out / "log_history.json").read_text())
    rows = int(re.search(r"prepared train \(unpaired\): (\d+) rows", result.stdout + result.stderr).group(1))
    # each step takes 4 rows on each of the 2 processes: epoch = steps / ceil(rows / 8), not ceil(rows / 4)
    assert history[-1]["epoch"] == pytest.approx(2 / math.ceil(rows / 8))


def test_plot_out_into_a_new_directory(tmp_path):
    import matplotlib  # noqa: F401  (the `plot` extra; part of `dev`)
    history = [{"step": s, "loss": 0.5 - 0.01 * s, "rewards/chosen": 0.01 * s, "rewards/rejected": -0.01 * s,
                "rewards/margins": 0.02 * s, "kl": 0.0} for s in (1, 2, 3)]
    (tmp_path / "log_history.json").write_text(json.dumps(history))
    png = tmp_path / "figures" / "run.png"
    assert main(["plot", str(tmp_path), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



def test_same_flags_give_the_same_lora_run(tmp_path, model_dir):
    import datasets

    data = tmp_path / "data.jsonl"
    datasets.Dataset.from_list(_short_pairs()).to_json(str(data))
    losses = []
    for run in ("first", "second"):  # the second starts from whatever global RNG state the first left
        assert main(["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--use_peft",
                     "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", "--learning_rate", "1e-3",
                     "--output_dir", str(tmp_path / run), *FAST]) == 0
        losses.append([h["loss"] for h in json.loads((tmp_path / run / "log_history.json").read_text())
                       if "loss" in h])
    assert len(losses[0]) == 3 and losses[0] == losses[1]

def test_run_yaml_reruns_the_same_run(tmp_path, model_dir):
    import datasets

    data = tmp_path / "data.jsonl"
    datasets.Dataset.from_list(_short_pairs()).to_json(str(data))
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--use_peft",
                 "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj", "--beta", "0.3",
                 "--learning_rate", "1e-3", "--output_dir", str(first), *FAST]) == 0
    run_yaml = first / "kto_run.yaml"
    assert main(["train", "--config", str(run_yaml), "--output_dir", str(second)]) == 0
    for name in ("kto_config.json", "adapter_config.json"):
        assert json.loads((first / name).read_text()) == json.loads((second / name).read_text()), name
    args_first, args_second = (json.loads((d / "training_args.json").read_text()) for d in (first, second))
    assert {k: v for k, v in args_first.items() if k not in ("output_dir", "logging_dir", "run_name")} == {
        k: v for k, v in args_second.items() if k not in ("output_dir", "logging_dir", "run_name")}
    losses = [[h["loss"] for h in json.loads((d / "log_history.json").read_text()) if "loss" in h]
              for d in (first, second)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]


def test_run_yaml_of_the_embedded_default_keeps_the_demo_settings(tmp_path):
    from kto_plugin.cli import parse_train_args

    out = tmp_path / "run"
    assert main(["train", "--demo_pairs", "12", "--max_steps", "1", "--max_length", "96", "--use_cpu", "true",
                 "--output_dir", str(out)]) == 0
    _, data_args, kto_config, training_args, _ = parse_train_args(["--config", str(out / "kto_run.yaml")])
    saved = json.loads((out / "training_args.json").read_text())
    assert data_args.demo_pairs == 12 and kto_config.max_length == 96
    assert training_args.learning_rate == saved["learning_rate"] == 2e-4  # the demo's rate, not the flag default
    assert training_args.eval_strategy == saved["eval_strategy"] == "steps"


FAMILY_RUNS = {
    "bco_length_normalized": (["--loss_type", "bco", "--length_normalize", "true"], "bco/delta"),
    "humanline": (["--loss_type", "humanline", "--humanline_max_log_ratio", "2.0"], "kl"),
    "sft_ema": (["--sft_weight", "0.1", "--reference_point", "ema", "--reference_point_ema_decay", "0.5"], "sft_loss"),
    "positive_mean": (["--reference_point", "positive_mean"], "kl"),
}


@pytest.mark.parametrize("run", list(FAMILY_RUNS))
def test_train_accepts_each_family_variant_by_name(run, tmp_path):
    flags, metric = FAMILY_RUNS[run]
    out = tmp_path / "run"
    code = main(["train", "--demo_pairs", "12", "--eval_strategy", "no", "--output_dir", str(out), *FAST[:1], "2",
                 *FAST[2:], *flags])
    assert code == 0
    saved = json.loads((out / "kto_config.json").read_text())
    for name, value in zip(flags[::2], flags[1::2]):
        assert str(saved[name.removeprefix("--")]).lower() == value.lower()
    steps = [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    assert len(steps) == 2 and all(math.isfinite(h[metric]) and "rewards/accuracy" in h for h in steps)


def test_family_flags_are_in_help_and_checked(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--length_normalize", "--reference_point", "--reference_point_ema_decay", "--sft_weight",
                 "--humanline_min_log_ratio", "bco", "humanline"):
        assert flag in text
    assert main(["train", "--reference_point", "median"]) == 2  # a usage error: one line, exit status 2
    assert "invalid choice: 'median'" in capsys.readouterr().err
