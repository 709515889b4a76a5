"""The KTO family under the stock Trainer: every variant trains with and without PEFT; the plugins written for the
first hook specs (examples/custom_loss_plugin, the ten-line plugin of docs/plugins.md) still train, also next to the
new options; what cannot work is refused before any step; evaluation metrics and plugin state behave as documented."""

from __future__ import annotations

import copy
import importlib
import math
import pickle
import re
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from family_task import VARIANTS, build_task_tokenizer, kto_rows
from helpers import kto_trainer
from kto_plugin import KTOConfig, KTOPlugin, PluginError, hookimpl
from kto_plugin.demo import build_tiny_model
from reference_cases import lora_config
from reference_impl import naive_auroc

ROOT = Path(__file__).resolve().parents[2]
# what each variant logs or keeps beyond kto's: (a logged metric, a plugin with state)
OWN = {"bco": ("bco/delta", "builtin:bco"), "bco_length_normalized": ("bco/delta", "builtin:bco"),
       "sft_term": ("sft_loss", None), "ema": ("kl", "builtin:ema")}


@pytest.fixture(scope="module")
def task_tokenizer():
    return build_task_tokenizer()


@pytest.fixture(scope="module")
def small_model(task_tokenizer):
    return build_tiny_model(len(task_tokenizer), hidden_size=32, seed=11)


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_under_the_stock_trainer(variant, finetune, task_tokenizer, small_model, tmp_path):
    model = copy.deepcopy(small_model)
    if finetune == "lora":
        model = get_peft_model(model, lora_config())
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = _trainable(model)
    kto, trainer = kto_trainer(model, task_tokenizer, kto_rows(), tmp_path, kto_kwargs=VARIANTS[variant],
                               max_steps=3, learning_rate=1e-2 if finetune == "full" else 0.5,
                               eval_rows=kto_rows(swap=True)[:8], **({"optim": "sgd"} if finetune == "lora" else {}))
    kto.attach(trainer)
    trainer.train()
    metrics = trainer.evaluate()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) for h in logs)
    assert all(0.0 <= h["rewards/accuracy"] <= 1.0 for h in logs)
    assert 0.0 <= metrics["eval_rewards/auroc"] <= 1.0
    after = _trainable(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in base_before.items())
    metric, stateful = OWN.get(variant, (None, None))
    if metric is not None:
        assert all(math.isfinite(h[metric]) for h in logs) and f"eval_{metric}" in metrics
    if stateful is not None:
        assert stateful in kto.plugins.state_dict()


# --- the plugins written for the first hook specs ---


def _readme_plugin():
    """The ten-line plugin of docs/plugins.md ('Writing a plugin'), as the docs show it."""
    snippet = re.search(r"## Writing a plugin\n.*?```python\n(.*?)```", (ROOT / "docs" / "plugins.md").read_text(),
                        re.S).group(1)
    namespace = {}
    exec(compile(snippet.split("\nkto = ")[0], "docs/plugins.md", "exec"), namespace)
    return namespace["LogSigmoidKTO"]()


@pytest.fixture
def example_plugin(monkeypatch):
    """examples/custom_loss_plugin's module, imported from its folder, untouched."""
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "custom_loss_plugin"))
    sys.modules.pop("kto_logsigmoid", None)
    yield importlib.import_module("kto_logsigmoid")
    sys.modules.pop("kto_logsigmoid", None)


@pytest.mark.parametrize("order", ["example_first", "readme_first"])
@pytest.mark.parametrize("extras", [{}, {"sft_weight": 0.2, "reference_point": "ema"}], ids=["alone", "with_sft_ema"])
def test_first_release_plugins_train_untouched(order, extras, example_plugin, task_tokenizer, small_model, tmp_path):
    plugins = [example_plugin, _readme_plugin()]
    if order == "readme_first":
        plugins.reverse()
    kto, trainer = kto_trainer(copy.deepcopy(small_model), task_tokenizer, kto_rows(), tmp_path, max_steps=2,
                               kto_kwargs={"loss_type": "kto_logsigmoid", **extras}, plugin_kwargs={"plugins": plugins})
    kto.attach(trainer)
    trainer.train()
    first, second = [h for h in trainer.state.log_history if "loss" in h]
    # policy == reference at step 1: every -log sigmoid(0) is log 2; the example's metric sigmoid(0) = 0.5
    assert first["loss"] - first.get("sft_loss", 0.0) == pytest.approx(math.log(2), rel=1e-4)
    assert first["kto_logsigmoid/grad_weight"] == pytest.approx(0.5)
    assert second["loss"] != first["loss"] and math.isfinite(second["kto_logsigmoid/grad_weight"])
    assert ("sft_loss" in first) == bool(extras)


def test_length_normalize_refuses_a_loss_that_ignores_log_ratios(example_plugin, task_tokenizer):
    with pytest.raises(ValueError, match="kto_logsigmoid.*without taking log_ratios"):
        KTOPlugin(KTOConfig(loss_type="kto_logsigmoid", length_normalize=True), tokenizer=task_tokenizer,
                  plugins=[example_plugin])


def test_options_that_cannot_apply_are_refused_at_construction(task_tokenizer):
    with pytest.raises(ValueError, match="reference_point='ema'.*needs_kl=False"):
        KTOPlugin(KTOConfig(loss_type="bco", reference_point="ema"), tokenizer=task_tokenizer)
    with pytest.raises(ValueError, match="per-token log-probs.*precompute_ref_log_probs=False"):
        KTOPlugin(KTOConfig(loss_type="humanline", precompute_ref_log_probs=True), tokenizer=task_tokenizer)


# --- evaluation metrics and state ---


def test_auroc_is_over_the_whole_evaluation(task_tokenizer, small_model, tmp_path):
    eval_rows = kto_rows(swap=True)[:20]  # 5 micro-batches of 4
    kto, trainer = kto_trainer(copy.deepcopy(small_model), task_tokenizer, kto_rows(), tmp_path, max_steps=4,
                               learning_rate=2e-2, eval_rows=eval_rows)
    kto.attach(trainer)
    trainer.train()
    out = trainer.predict(trainer.eval_dataset)
    rewards, labels = out.predictions["rewards"], out.label_ids["label"]
    assert len(rewards) == 20
    assert out.metrics["test_rewards/auroc"] == pytest.approx(naive_auroc(rewards, labels), abs=1e-12)
    assert out.metrics["test_rewards/auroc"] not in (0.0, 1.0)  # a case where the rows' order matters


def test_bco_state_is_read_not_written_by_evaluation_and_reset_by_a_fresh_run(task_tokenizer, small_model, tmp_path):
    kto, trainer = kto_trainer(copy.deepcopy(small_model), task_tokenizer, kto_rows(), tmp_path, max_steps=3,
                               kto_kwargs={"loss_type": "bco"}, eval_rows=kto_rows(swap=True)[:8],
                               gradient_accumulation_steps=2)
    kto.attach(trainer)
    trainer.train()
    state = kto.plugins.state_dict()["builtin:bco"]
    assert state["count"] == 3 * 2 * 4  # once per micro-batch: 3 steps x 2 micro-batches x 4 rows
    metrics = trainer.evaluate()
    assert kto.plugins.state_dict()["builtin:bco"] == state
    assert metrics["eval_bco/delta"] == pytest.approx(state["reward_sum"] / state["count"])
    copied = pickle.loads(pickle.dumps(kto.plugins))  # as Ray Tune ships a Trainer: the built-ins keep their state
    assert copied.state_dict() == kto.plugins.state_dict()
    trainer.train()  # from the start again (no resume): the running mean starts afresh
    assert kto.plugins.state_dict()["builtin:bco"]["count"] == 3 * 2 * 4


class Counter:
    """A third-party plugin with state of the wrong kind."""

    @hookimpl
    def kto_state_dict(self):
        return {"seen": torch.tensor(1.0)}


def test_plugin_state_must_be_json(task_tokenizer):
    kto = KTOPlugin(tokenizer=task_tokenizer, plugins=[Counter()])
    with pytest.raises(PluginError, match="Counter.*JSON-serialisable"):
        kto.plugins.state_dict()


def test_docs_own_variant_snippet_trains_keeps_its_state_and_resumes(task_tokenizer, small_model, tmp_path):
    snippet = re.search(r"## Writing a variant of your own\n.*?```python\n(.*?)```",
                        (ROOT / "docs" / "losses.md").read_text(), re.S).group(1)
    namespace = {}
    exec(compile(snippet, "docs/losses.md", "exec"), namespace)
    runs = {}
    for name, resume in (("straight", None), ("resumed", tmp_path / "straight" / "checkpoint-2")):
        plugin = namespace["RunningMeanKTO"]()
        kto, trainer = kto_trainer(copy.deepcopy(small_model), task_tokenizer, kto_rows(), tmp_path / name,
                                   max_steps=4, save_strategy="steps", save_steps=2, save_only_model=False,
                                   kto_kwargs={"loss_type": "kto_running_mean"}, plugin_kwargs={"plugins": [plugin]})
        kto.attach(trainer)
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        runs[name] = (plugin, [h["loss"] for h in trainer.state.log_history if "loss" in h])
    (straight, losses), (resumed, resumed_losses) = runs["straight"], runs["resumed"]
    assert straight.count == 4 * 4 and straight.total != 0  # 4 steps of 4 rows
    assert (resumed.total, resumed.count) == (straight.total, straight.count)
    assert resumed_losses[-2:] == losses[-2:]  # steps 3-4, bit for bit
