"""kto_plugin.trainer._guidance: the paper's advice, given once, silenced by warn_guidance=False; the attach summary."""

from __future__ import annotations

import logging

import pytest
from transformers import Trainer

from helpers import args, kto_trainer
from kto_plugin import KTOConfig, KTOPlugin, KTOPluginWarning
from kto_plugin.trainer._guidance import balance_advice, label_counts, settings_advice


def test_balance_inside_the_band_is_silent():
    assert balance_advice(100, 100, 1.0, 1.0) is None  # ratio 1
    assert balance_advice(130, 100, 1.0, 1.0) is None  # 1.3 <= 4/3


def test_balance_outside_suggests_desirable_weights():
    # 1:10 data (the paper's imbalance experiment): the band for lambda_D is [10, 13.33] with lambda_U = 1
    advice = balance_advice(10, 100, 1.0, 1.0)
    assert advice is not None and "0.10" in advice.message
    assert "[10.00, 13.33]" in advice.message
    assert "[0.50, 0.67]" in balance_advice(200, 100, 1.0, 1.0).message  # ratio 2: lambda_D in [1/2, 2/3]
    assert balance_advice(0, 10, 1.0, 1.0) is None  # one class only: data preparation says so, not this


def test_settings_advice_each_rule():
    ok = dict(beta=0.1, learning_rate=1e-6, per_device_batch=8, effective_batch=32, needs_kl=True, is_peft=False)
    assert settings_advice(**ok) == []
    keys = lambda **kw: [a.key for a in settings_advice(**{**ok, **kw})]  # noqa: E731
    assert keys(beta=5.0) == ["beta"]
    assert keys(learning_rate=1e-4) == ["learning_rate"]
    assert keys(learning_rate=1e-4, is_peft=True) == []  # adapters take higher rates
    assert keys(per_device_batch=2, effective_batch=16) == ["per_device_batch"]
    assert keys(per_device_batch=2, effective_batch=16, needs_kl=False) == []
    assert keys(effective_batch=8) == ["effective_batch"]
    assert keys(effective_batch=256) == ["effective_batch"]


def test_attach_logs_summary_and_advice_once(model, tokenizer, rows, tmp_path, caplog):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path)  # lr 1e-3, effective batch 4
    with caplog.at_level(logging.INFO, logger="kto_plugin"):
        kto.attach(trainer)
        kto.detach()
        kto.attach(trainer)
    summary = [r.message for r in caplog.records if "attached:" in r.message]
    assert len(summary) == 2
    report = kto.data_reports["train"]
    assert f"{report.n_desirable} desirable (weight 1.0) / {report.n_undesirable} undesirable" in summary[0]
    assert "loss=kto" in summary[0] and "KL pass: on" in summary[0] and "0 third-party" in summary[0]
    advice = [r.message for r in caplog.records if "guidance" in r.message]
    assert sum("learning_rate=0.001" in m for m in advice) == 1  # once, although attached twice
    assert sum("effective batch" in m for m in advice) == 1


def test_warn_guidance_false_silences(model, tokenizer, rows, tmp_path, caplog):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, kto_kwargs={"warn_guidance": False})
    with caplog.at_level(logging.INFO, logger="kto_plugin"):
        kto.attach(trainer)
    assert not [r for r in caplog.records if "guidance" in r.message]
    assert [r for r in caplog.records if "attached:" in r.message]


def _sums(n_desirable: int, n_undesirable: int) -> list[dict]:
    rows = [{"prompt": f"{i} + {i} =", "completion": f" {2 * i}", "label": True} for i in range(n_desirable)]
    return rows + [{"prompt": f"{i} + {i} =", "completion": f" {i}", "label": False} for i in range(n_undesirable)]


def test_eval_set_prepared_without_a_name_neither_hides_the_train_counts_nor_passes_silently(model, tokenizer,
                                                                                           tmp_path, caplog):
    """A new user's script: a 2/14 train set, then the eval set prepared with the default name."""
    kto = KTOPlugin(KTOConfig(max_length=64), tokenizer=tokenizer)
    train_ds = kto.prepare_dataset(_sums(2, 14))
    with pytest.warns(KTOPluginWarning, match=r"prepare_dataset\(name='train'\) was called before with other data "
                      r"\(16 input rows, 2 desirable / 14 undesirable; now 6 input rows\).*name='eval'"):
        eval_ds = kto.prepare_dataset(_sums(3, 3))
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=kto.collator)
    with caplog.at_level(logging.INFO, logger="kto_plugin"):
        kto.attach(trainer)
    summary = next(r.message for r in caplog.records if "attached:" in r.message)
    assert "2 desirable (weight 1.0) / 14 undesirable (weight 1.0)" in summary  # the Trainer's own train set
    advice = [r.message for r in caplog.records if "guidance" in r.message]
    assert any("1.0 * 2 / (1.0 * 14) = 0.14" in m for m in advice)  # the balance warning it owed


def test_preparing_the_same_data_again_replaces_its_report_quietly(tokenizer):
    kto = KTOPlugin(KTOConfig(max_length=64), tokenizer=tokenizer)
    kto.prepare_dataset(_sums(4, 4))
    kto.prepare_dataset(_sums(4, 4))  # a notebook cell run twice: no KTOPluginWarning (pytest turns it into an error)
    kto.prepare_dataset(_sums(3, 3), name="eval")
    assert (kto.data_reports["train"].n_desirable, kto.data_reports["eval"].n_desirable) == (4, 3)


def test_label_counts_read_the_trainers_dataset_after_selection(model, tokenizer, tmp_path):
    kto = KTOPlugin(KTOConfig(max_length=64), tokenizer=tokenizer)
    prepared = kto.prepare_dataset(_sums(4, 4)).select([0, 1, 4])  # 2 desirable, 1 undesirable left
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=prepared, data_collator=kto.collator)
    assert label_counts(trainer) == (2, 1)
    trainer.train_dataset = prepared.to_iterable_dataset()
    assert label_counts(trainer) is None  # a stream is counted only as it is read
