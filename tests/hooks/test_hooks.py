"""The hooks (hookspecs.py) in real training runs: custom losses, reference points and metrics, the KL pass
skipped for KL-free losses, built-in losses untouched by other plugins, checks and logging at attach."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from helpers import kto_trainer
from kto_plugin import PluginError, PluginValidationError, hookimpl
from kto_plugin import loss as kto_loss_fns
from kto_plugin.step._metrics import RESERVED_METRIC_NAMES

BETA = 0.1


# --- plugins used below ---


class LogSigmoid:
    """-log sigmoid(beta * (r - z0)) / -log sigmoid(beta * (z0 - r)), under the loss type `logsig`."""

    @hookimpl
    def kto_loss_types(self):
        return {"logsig": True}

    @hookimpl
    def kto_loss(self, loss_type, policy_logps, reference_logps, kl, labels, config):
        if loss_type != "logsig":
            return None
        r = policy_logps - reference_logps
        return -F.logsigmoid(config.beta * torch.where(labels, r - kl, kl - r))


class Unrelated:
    """A plugin for another loss type, with a reference point and a metric that must not touch `kto`."""

    @hookimpl
    def kto_loss_types(self):
        return {"unrelated": True}

    @hookimpl
    def kto_loss(self, loss_type, policy_logps):
        return policy_logps * 0 + 123.0 if loss_type == "unrelated" else None

    @hookimpl
    def kto_reference_point(self, config):
        return torch.tensor(9.0) if config.loss_type == "unrelated" else None

    @hookimpl
    def kto_metrics(self, labels):
        return {"unrelated/n": float(labels.numel())}


class Recorder:
    """Records what kto_metrics receives, and returns a call counter as a metric."""

    def __init__(self):
        self.seen = []

    @hookimpl
    def kto_metrics(self, policy_logps, reference_logps, kl, labels, losses, config):
        self.seen.append(
            dict(
                policy=policy_logps.clone(),
                reference=reference_logps.clone(),
                kl=kl.clone(),
                labels=labels.clone(),
                losses=losses.clone(),
            )
        )
        return {"test/calls": len(self.seen)}


class Misspelled:
    @hookimpl
    def kto_los(self, policy_logps):
        return policy_logps


class Raiser:
    @hookimpl
    def kto_loss(self, loss_type):
        raise RuntimeError("boom")


# --- checks at attach ---


def test_check_pending_runs_on_attach(model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path)
    kto.plugins.pm.register(Misspelled())  # behind the manager's back: only attach() can catch it
    with pytest.raises(PluginValidationError, match="kto_los"):
        kto.attach(trainer)
    assert trainer.compute_loss_func is None


def test_a_plugin_registered_after_construction_counts_at_attach(model, tokenizer, rows, tmp_path):
    class KLFreeKTO:
        @hookimpl
        def kto_loss_types(self):
            return {"kto": False}

    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path)
    assert kto.collator.build_kl
    kto.plugins.register(KLFreeKTO())
    kto.attach(trainer)
    assert not kto.collator.build_kl and not kto.loss_hook.needs_kl


def test_an_error_in_training_names_the_plugin(model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, plugin_kwargs={"plugins": [Raiser()]})
    kto.attach(trainer)
    with pytest.raises(
        PluginError, match="Plugin 'test_hooks.Raiser' raised in kto_loss: RuntimeError: boom"
    ):
        trainer.train()


# --- in training ---


def _train_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


def test_custom_loss_is_what_the_trainer_optimises(model, tokenizer, rows, tmp_path):
    recorder = Recorder()
    kto, trainer = kto_trainer(
        model,
        tokenizer,
        rows,
        tmp_path,
        max_steps=3,
        kto_kwargs={"loss_type": "logsig", "beta": BETA, "desirable_weight": 1.5},
        plugin_kwargs={"plugins": [LogSigmoid(), recorder]},
    )
    kto.attach(trainer)
    trainer.train()
    logs = _train_logs(trainer)
    # step 1: policy == reference, so r = 0 and z0 = 0: every loss is -log sigmoid(0) = log 2
    assert recorder.seen[0]["losses"].tolist() == pytest.approx([math.log(2)] * 4, abs=1e-6)
    assert recorder.seen[0]["kl"].item() == 0.0
    n_desirable = int(recorder.seen[0]["labels"].sum())
    assert 0 < n_desirable < 4
    assert logs[0]["loss"] == pytest.approx(math.log(2) * (1.5 * n_desirable + 4 - n_desirable) / 4, rel=1e-6)
    # later steps: the logged loss is the weighted mean of the formula applied to what the hooks received
    for step, seen in enumerate(recorder.seen):
        r = seen["policy"] - seen["reference"]
        z0, labels = seen["kl"].item(), seen["labels"]
        by_hand = [
            math.log1p(math.exp(-BETA * ((ri - z0) if d else (z0 - ri))))
            for ri, d in zip(r.tolist(), labels, strict=True)
        ]
        weights = [1.5 if d else 1.0 for d in labels]
        assert seen["losses"].tolist() == pytest.approx(by_hand, rel=1e-5)
        assert logs[step]["loss"] == pytest.approx(
            sum(w * v for w, v in zip(weights, by_hand, strict=True)) / 4, rel=1e-5
        )
    assert logs[2]["kl"] == pytest.approx(recorder.seen[2]["kl"].item())


class KLFree:
    """A loss that declares needs_kl=False (the unpaired APO-zero form under another name)."""

    @hookimpl
    def kto_loss_types(self):
        return {"kl_free": False}

    @hookimpl
    def kto_loss(self, loss_type, policy_logps, reference_logps, labels, config):
        if loss_type == "kl_free":
            return kto_loss_fns.apo_zero_unpaired_loss(
                policy_logps, reference_logps, labels, config.beta
            ).losses

    @hookimpl
    def kto_reference_point(self, config):
        if config.loss_type == "kl_free":
            raise AssertionError("kto_reference_point must not be called for a loss that needs no KL")


def _count_forwards(kto, trainer):
    counts = {"policy": 0, "reference": 0}
    trainer.model.register_forward_pre_hook(lambda *a: counts.__setitem__("policy", counts["policy"] + 1))
    kto.reference.ref_model.register_forward_pre_hook(
        lambda *a: counts.__setitem__("reference", counts["reference"] + 1)
    )
    return counts


# forwards per step (rows not split by length): the policy's target batch, then its KL completions against the
# target forward's prompt cache; the reference's prompts, then its target and KL completions in one pass
@pytest.mark.parametrize("loss_type,policy,reference", [("kl_free", 1, 1), ("kto", 2, 2)])
def test_a_loss_without_kl_skips_the_kl_forward(loss_type, policy, reference, model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(
        model,
        tokenizer,
        rows,
        tmp_path,
        kto_kwargs={"loss_type": loss_type, "length_buckets": "off"},
        plugin_kwargs={"plugins": [KLFree()]},
        max_steps=2,
    )
    kto.attach(trainer)
    counts = _count_forwards(kto, trainer)
    batch = kto.collator([trainer.train_dataset[i] for i in range(4)])
    assert ("kl_input_ids" in batch["labels"]) == (loss_type == "kto")
    trainer.train()
    assert counts == {"policy": 2 * policy, "reference": 2 * reference}
    if loss_type == "kl_free":
        assert all(h["kl"] == 0.0 for h in _train_logs(trainer))


def test_a_custom_reference_point_is_used(model, tokenizer, rows, tmp_path):
    class FixedZ0:
        seen = []

        @hookimpl
        def kto_reference_point(self, policy_kl_logps, reference_kl_logps):
            self.seen.append((policy_kl_logps.shape, reference_kl_logps.shape))
            return torch.tensor(7.0)

    recorder = Recorder()
    kto, trainer = kto_trainer(
        model,
        tokenizer,
        rows,
        tmp_path,
        max_steps=1,
        kto_kwargs={"beta": BETA, "desirable_weight": 2.0},
        plugin_kwargs={"plugins": [FixedZ0(), recorder]},
    )
    kto.attach(trainer)
    trainer.train()
    log = _train_logs(trainer)[0]
    assert FixedZ0.seen == [(torch.Size([4]), torch.Size([4]))]
    assert log["kl"] == 7.0 and recorder.seen[0]["kl"].item() == 7.0
    # step 1, r = 0: desirable 1 - sigmoid(beta * (0 - 7)), undesirable 1 - sigmoid(beta * (7 - 0))
    labels = recorder.seen[0]["labels"].tolist()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = sum(2.0 * (1 - sig(-BETA * 7.0)) if d else 1 - sig(BETA * 7.0) for d in labels) / 4
    assert expected != pytest.approx(
        0.5 * (2.0 * labels.count(True) + labels.count(False)) / 4
    )  # z0 = 0 differs
    assert log["loss"] == pytest.approx(expected, rel=1e-6)


class Integrations(TrainerCallback):
    """Stands in for a report_to integration: records what on_log receives."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_custom_metric_is_logged_averaged_and_prefixed_in_eval(model, tokenizer, rows, tmp_path):
    recorder, integration = Recorder(), Integrations()
    kto, trainer = kto_trainer(
        model, tokenizer, rows, tmp_path, max_steps=4, logging_steps=2, plugin_kwargs={"plugins": [recorder]}
    )
    trainer.eval_dataset = trainer.train_dataset.select(range(8))
    trainer.add_callback(integration)
    kto.attach(trainer)
    trainer.train()
    # calls 1..4 in training, logged every 2 steps: the interval means
    assert [h["test/calls"] for h in _train_logs(trainer)] == [1.5, 3.5]
    metrics = trainer.evaluate()  # two eval batches: calls 5 and 6
    assert metrics["eval_test/calls"] == 5.5
    assert trainer.state.log_history[-1]["eval_test/calls"] == 5.5
    assert [h.get("test/calls") for h in integration.logs if "loss" in h] == [1.5, 3.5]
    assert integration.logs[-1]["eval_test/calls"] == 5.5
    assert "test/calls" not in metrics


def test_reserved_metric_names_cover_every_built_in_log_key(model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, max_steps=1)
    trainer.eval_dataset = trainer.train_dataset.select(range(4))
    kto.attach(trainer)
    trainer.train()
    step, summary = trainer.state.log_history[0], trainer.state.log_history[-1]
    assert "kl" in step and "train_runtime" in summary
    eval_keys = {k.removeprefix("eval_") for k in trainer.evaluate()}
    assert "rewards/chosen" in eval_keys
    assert set(step) | set(summary) | eval_keys <= RESERVED_METRIC_NAMES


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_builtin_losses_are_unaffected_by_other_plugins(loss_type, base_model, tokenizer, rows, tmp_path):
    runs = []
    for plugins in ([], [Unrelated()]):
        kto, trainer = kto_trainer(
            copy.deepcopy(base_model),
            tokenizer,
            rows,
            tmp_path,
            max_steps=3,
            kto_kwargs={"loss_type": loss_type},
            plugin_kwargs={"plugins": plugins},
        )
        kto.attach(trainer)
        trainer.train()
        weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        logs = [{k: v for k, v in h.items() if k != "unrelated/n"} for h in _train_logs(trainer)]
        runs.append((weights, logs, [h.get("unrelated/n") for h in _train_logs(trainer)]))
    (w_plain, logs_plain, _), (w_plugged, logs_plugged, unrelated) = runs
    assert unrelated == [4.0, 4.0, 4.0]  # the other plugin did run
    assert logs_plain == logs_plugged  # exactly: same numbers, same keys
    assert torch.equal(w_plain, w_plugged)


def test_plugins_are_logged_with_their_source_at_attach(model, tokenizer, rows, tmp_path, caplog):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, plugin_kwargs={"plugins": [LogSigmoid()]})
    with caplog.at_level(logging.INFO, logger="kto_plugin"):
        kto.attach(trainer)
        kto.attach(trainer)  # idempotent: logged once
    lines = [r.getMessage() for r in caplog.records if "test_hooks.LogSigmoid" in r.getMessage()]
    assert len(lines) == 1 and "kto_plugin: attached" in lines[0]
    assert "test_hooks.LogSigmoid [KTOPlugin(plugins=...)]" in lines[0]
