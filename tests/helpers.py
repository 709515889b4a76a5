"""Small builders shared by the Trainer-level tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def torchrun_two(script, *script_args: str, timeout: int = 600):
    """Run `script` on two CPU processes (torchrun, gloo) from the repository root; fails the test with the output's
    tail unless it exits 0. Returns the finished process (its ``stdout``)."""
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "KTO_PLUGIN_DISABLE_AUTOLOAD": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           *script_args]
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
