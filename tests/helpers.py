"""Small builders shared by the Trainer-level tests."""

from __future__ import annotations

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
