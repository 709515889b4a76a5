"""Exact resume: 4 steps straight == 2 steps, checkpoint, a fresh trainer resumed for steps 3-4.

The reference for every comparison is the uninterrupted run of the same stock Trainer (same seed, same data,
same checkpointing): the resumed run must end with bit-identical weights and log bit-identical KTO metrics for
steps 3-4, also when a logging interval spans the checkpoint (`logging_steps=4`, save at 2).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import kto_trainer
from reference_cases import lora_config
from peft import get_peft_model

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


def _train(model, tokenizer, rows, out, resume=None, kto_kwargs=None, **overrides):
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, logging_steps=1,
              train_sampling_strategy="random", save_only_model=False)
    kw.update(overrides)
    kto, trainer = kto_trainer(model, tokenizer, rows, out, kto_kwargs=kto_kwargs, **kw)
    kto.attach(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return kto, trainer


def _logs(trainer, steps, keys):
    out = {}
    for entry in trainer.state.log_history:
        if entry.get("step") in steps and "kl" in entry:
            out[entry["step"]] = {k: entry[k] for k in keys if k in entry}
    return out


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"weights differ after resume: {different[:5]}"


def _resume_case(make_model, tokenizer, rows, tmp_path, kto_kwargs=None, **overrides):
    """(uninterrupted trainer, resumed trainer, resumed plugin)."""
    _, straight = _train(make_model(), tokenizer, rows, tmp_path / "straight", kto_kwargs=kto_kwargs, **overrides)
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert checkpoint.is_dir()
    kto, resumed = _train(make_model(), tokenizer, rows, tmp_path / "resumed", resume=str(checkpoint),
                          kto_kwargs=kto_kwargs, **overrides)
    return straight, resumed, kto


@pytest.mark.slow
def test_resume_full_finetune_is_exact(base_model, tokenizer, rows, tmp_path):
    straight, resumed, kto = _resume_case(lambda: copy.deepcopy(base_model), tokenizer, rows[:16], tmp_path)
    _assert_same_weights(straight.model, resumed.model)
    want = _logs(straight, {3, 4}, KTO_KEYS + ("loss", "grad_norm", "learning_rate"))
    assert set(want) == {3, 4} and all(set(KTO_KEYS) <= set(v) for v in want.values())
    assert _logs(resumed, {3, 4}, KTO_KEYS + ("loss", "grad_norm", "learning_rate")) == want


@pytest.mark.slow
def test_resume_mid_logging_interval_logs_the_same_averages(base_model, tokenizer, rows, tmp_path):
    """logging_steps=4 with the checkpoint at 2: the step-4 KTO metrics average steps 1-4 in both runs."""
    straight, resumed, _ = _resume_case(lambda: copy.deepcopy(base_model), tokenizer, rows[:16], tmp_path,
                                        logging_steps=4)
    _assert_same_weights(straight.model, resumed.model)
    want = _logs(straight, {4}, KTO_KEYS)
    assert set(want[4]) == set(KTO_KEYS)
    assert _logs(resumed, {4}, KTO_KEYS) == want
    # the checkpoint carries the two steps' sums: the averages are not those of steps 3-4 alone
    _, steps_1_to_4 = _train(copy.deepcopy(base_model), tokenizer, rows[:16], tmp_path / "every", save_strategy="no")
    per_step = _logs(steps_1_to_4, {1, 2, 3, 4}, KTO_KEYS)
    for key in ("kl", "rewards/chosen", "logps/rejected"):
        assert want[4][key] == pytest.approx(sum(per_step[s][key] for s in (1, 2, 3, 4)) / 4, rel=1e-12)
        assert want[4][key] != pytest.approx(sum(per_step[s][key] for s in (3, 4)) / 2, rel=1e-6)
