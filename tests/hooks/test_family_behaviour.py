"""A behavioural check per variant of the KTO family, on the two-style task of tests/family_task.py: a tiny model
taught both styles equally is trained with labels that prefer one style depending on the prompt; every variant
must raise the held-out preference for the desirable style, and lower it when the labels are swapped.

Settings (measured on 3 pre-teaching seeds, every variant in the right direction on each): full-batch steps (all
72 training rows in one micro-batch: minibatches of 16 moved the preference either way, as a batch rarely holds
both kinds of a topic), AdamW at 5e-3, 10 steps. The whole check takes about 25 s on one CPU thread.
"""

from __future__ import annotations

import copy

import pytest
from transformers import Trainer, TrainingArguments

from family_task import TRAIN, build_task_tokenizer, kto_rows, pre_taught_model, preference
from family_task import VARIANTS as FAMILY_VARIANTS
from kto_plugin import KTOConfig, KTOPlugin

pytestmark = pytest.mark.slow

VARIANTS = {"kto": {}, **FAMILY_VARIANTS}
MARGIN = 0.1  # nats of held-out preference; the smallest move measured was 0.2


@pytest.fixture(scope="module")
def task():
    tokenizer = build_task_tokenizer()
    model = pre_taught_model(tokenizer, seed=1)
    return tokenizer, model, preference(model, tokenizer)


def _train(task, config, swap, tmp_path) -> float:
    tokenizer, taught, _ = task
    model = copy.deepcopy(taught)
    kto = KTOPlugin(KTOConfig(max_length=64, warn_guidance=False, **config), tokenizer=tokenizer)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=len(TRAIN) * 4, max_steps=10, learning_rate=5e-3,
        lr_scheduler_type="constant", logging_steps=10, report_to="none", use_cpu=True, save_strategy="no", seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=kto.prepare_dataset(kto_rows(swap=swap)),
                      data_collator=kto.collator)
    kto.attach(trainer)
    trainer.train()
    return preference(model, tokenizer)


def test_the_taught_model_prefers_neither_style(task):
    assert abs(task[2]) < 0.01


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_moves_the_held_out_preference_with_the_labels(variant, task, tmp_path):
    before = task[2]
    raised = _train(task, VARIANTS[variant], swap=False, tmp_path=tmp_path)
    lowered = _train(task, VARIANTS[variant], swap=True, tmp_path=tmp_path)
    print(f"{variant}: held-out preference {before:+.3f} -> {raised:+.3f} (labels), {lowered:+.3f} (swapped)")
    assert raised > before + MARGIN
    assert lowered < before - MARGIN
