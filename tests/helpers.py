"""Small builders shared by the Trainer-level tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from kto_plugin import KTOConfig, KTOPlugin


def args(tmp_path, **overrides: Any) -> TrainingArguments:
    kw = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
        train_sampling_strategy="sequential",
        learning_rate=1e-3,
        disable_tqdm=True,
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


def kto_trainer(model, tokenizer, rows, tmp_path, kto_kwargs=None, trainer_cls=Trainer, plugin_kwargs=None,
                eval_rows=None, **arg_overrides):
    kto = KTOPlugin(KTOConfig(**{"max_length": 96, **(kto_kwargs or {})}), tokenizer=tokenizer, **(plugin_kwargs or {}))
    trainer = trainer_cls(
        model=model,
        args=args(tmp_path, **arg_overrides),
        train_dataset=kto.prepare_dataset(rows),
        eval_dataset=kto.prepare_dataset(eval_rows, name="eval") if eval_rows is not None else None,
        data_collator=kto.collator,
    )
    return kto, trainer


# --- runs compared step by step (exact resume, faults) ---

KTO_KEYS = (
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "num_tokens",
)


def train_run(model, tokenizer, rows, out, resume=None, kto_kwargs=None, **overrides):
    """Attach and train (4 steps, a checkpoint every 2, random sampler); returns (plugin, trainer)."""
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, logging_steps=1,
              train_sampling_strategy="random", save_only_model=False)
    kw.update(overrides)
    kto, trainer = kto_trainer(model, tokenizer, rows, out, kto_kwargs=kto_kwargs, **kw)
    kto.attach(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return kto, trainer


def logged(trainer, steps, keys):
    """{step: {key: value}} of the KTO training logs at `steps`."""
    out = {}
    for entry in trainer.state.log_history:
        if entry.get("step") in steps and "kl" in entry:
            out[entry["step"]] = {k: entry[k] for k in keys if k in entry}
    return out


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"weights differ after resume: {different[:5]}"
def torchrun_two(script, *script_args: str, timeout: int = 600):
    """Run `script` on two CPU processes (torchrun, gloo) from the repository root; fails the test with the output's
    tail unless it exits 0. Returns the finished process (its ``stdout``). The script runs through
    tests/scripts/exit_after.py, which skips the interpreter's teardown once the script has returned (see there)."""
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "KTO_PLUGIN_DISABLE_AUTOLOAD": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(root / "tests" / "scripts" / "exit_after.py"), str(script), *script_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def load_script(path):
    """A script (tests/scripts, examples) imported as a module, to call its functions in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
def cache_hub_dataset(cache_dir, repo_id, rows, tmp_path):
    """Leave in `cache_dir` what `datasets.load_dataset(repo_id)` leaves after an online load of a Hub repository
    holding `rows` as JSON lines: the JSON builder's Arrow files under ``<namespace>___<name>/default/0.0.0/<commit>``.
    Built by datasets' own JSON builder (no network); `repo_id` is set after construction because the builder
    refuses local data files for a repository it would otherwise read from the Hub."""
    import datasets
    from datasets.packaged_modules.json.json import Json

    source = tmp_path / "hub_source.jsonl"
    datasets.Dataset.from_list(rows).to_json(str(source))
    builder = Json(cache_dir=str(cache_dir), dataset_name=repo_id.split("/")[1], config_name="default",
                   config_id="default", data_files={"train": str(source)}, hash="0" * 40)
    builder.repo_id = repo_id
    builder._cache_dir = builder._build_cache_dir()
    builder.download_and_prepare()


def offline_datasets_cache(tmp_path, monkeypatch):
    """An empty datasets cache in `tmp_path`, and datasets in offline mode (nothing may reach the network)."""
    import datasets

    cache = tmp_path / "datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache
