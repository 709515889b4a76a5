"""Run TRL 1.16's KTOTrainer (the numerical oracle) and kto_plugin side by side on the same data and weights."""

from __future__ import annotations

import copy
import math
from typing import Any

from datasets import Dataset
from transformers import Trainer, TrainingArguments

from kto_plugin import KTOConfig, KTOPlugin

# Keys whose values are timings or bookkeeping, not numerics
_SKIP = ("runtime", "per_second", "total_flos")
FAMILY_NAMES = ("rewards/accuracy", "rewards/auroc", "bco/delta", "sft_loss")  # kto_plugin.step._metrics


def training_args(output_dir: str, **overrides: Any) -> dict[str, Any]:
    """TrainingArguments fields shared by both sides: CPU, fp32, sequential batches (TRL's pairing), no saving."""
    args = dict(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=6,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
        bf16=False,
        train_sampling_strategy="sequential",
        # SGD keeps the comparison about the loss and its gradients: Adam's first step is lr * sign(g) per
        # entry, so float-noise-level gradient entries (summation order) flip sign and dominate the diff.
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
    )
    args.update(overrides)
    return args


def run_trl(model, rows, tokenizer, kto_kwargs, args, eval_rows=None, ref_model=None):
    from trl import KTOConfig as TRLKTOConfig
    from trl import KTOTrainer

    config = TRLKTOConfig(**args, **kto_kwargs, gradient_checkpointing=False)
    trainer = KTOTrainer(
        model=copy.deepcopy(model),
        ref_model=copy.deepcopy(ref_model if ref_model is not None else model),
        args=config,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
    )
    return trainer


def run_ours(model, rows, tokenizer, kto_kwargs, args, eval_rows=None, ref_model=None, plugins=()):
    kto = KTOPlugin(KTOConfig(**kto_kwargs), tokenizer=tokenizer, ref_model=ref_model, plugins=plugins)
    trainer = Trainer(
        model=copy.deepcopy(model),
        args=TrainingArguments(**args),
        train_dataset=kto.prepare_dataset(rows),
        eval_dataset=kto.prepare_dataset(eval_rows, name="eval") if eval_rows else None,
        data_collator=kto.collator,
    )
    kto.attach(trainer)
    return trainer, kto


def beyond_trl(key: str, trl_entry: dict) -> bool:
    """A key only we log: the KTO family's metrics (reward accuracy, AUROC, ...), which TRL has no equivalent of."""
    return key not in trl_entry and key.removeprefix("eval_") in FAMILY_NAMES


def compare_logs(expected: list[dict], actual: list[dict], rel: float, atol: float = 1e-6) -> list[str]:
    """Every numeric key of every log entry, both ways; returns the mismatches (empty when equal)."""
    problems = []
    if len(expected) != len(actual):
        problems.append(f"{len(expected)} log entries vs {len(actual)}")
    for a, b in zip(expected, actual):
        keys = {k for k in set(a) | set(b) if not any(s in k for s in _SKIP)}
        for key in sorted(keys):
            if beyond_trl(key, a):
                continue
            if key not in a or key not in b:
                problems.append(f"step {a.get('step')}: {key!r} only in {'TRL' if key in a else 'ours'}")
                continue
            x, y = float(a[key]), float(b[key])
            if not math.isclose(x, y, rel_tol=rel, abs_tol=atol):
                problems.append(f"step {a.get('step')}: {key} TRL={x!r} ours={y!r} rel={abs(x - y) / max(abs(x), 1e-12):.2e}")
    return problems
