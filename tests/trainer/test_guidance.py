"""kto_plugin.trainer._guidance: the paper's advice, given once, silenced by warn_guidance=False; the attach summary."""

from __future__ import annotations

import logging


from helpers import kto_trainer
from kto_plugin.trainer._guidance import balance_advice, settings_advice


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
