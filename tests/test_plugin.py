"""KTOPlugin.attach / detach on stock and subclassed Trainers; metrics plumbing; gradient accumulation."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Trainer, TrainerCallback

from helpers import args, kto_trainer
from kto_plugin.reference import ReferenceSyncCallback
from kto_plugin import KTOConfig, KTOPlugin
from kto_plugin.step._compute_loss import KTOComputeLoss
from kto_plugin.trainer._callbacks import KTOMetricsCallback

KTO_KEYS = {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
            "logits/chosen", "logits/rejected"}


def _snapshot(trainer):
    return (
        {k: v for k, v in vars(trainer).items()},
        trainer.args.to_dict(),
        list(trainer.callback_handler.callbacks),
        [(n, p.requires_grad) for n, p in trainer.model.named_parameters()],
        [m.p for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)],
    )


def test_attach_sets_what_the_trainer_needs(model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path)
    assert trainer.args.remove_unused_columns is True
    kto.attach(trainer)
    assert isinstance(trainer.compute_loss_func, KTOComputeLoss)
    assert trainer.loss_is_scaled_for_ga is False
    assert trainer.args.remove_unused_columns is False
    assert isinstance(trainer.callback_handler.callbacks[0], KTOMetricsCallback)


def test_detach_restores_the_trainer_exactly(model, tokenizer, rows, tmp_path):
    model.config.attention_dropout = 0.3  # so disable_dropout has something to undo
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.3
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path)
    before = _snapshot(trainer)
    kto.attach(trainer)
    kto.detach()
    after = _snapshot(trainer)
    assert before[0].keys() == after[0].keys()
    for key in before[0]:
        assert after[0][key] is before[0][key] or after[0][key] == before[0][key], key
    assert before[1:] == after[1:]
    assert "loss_is_scaled_for_ga" not in vars(trainer)


def test_attach_is_idempotent_and_exclusive(model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path)
    kto.attach(trainer)
    kto.attach(trainer)
    assert sum(isinstance(c, KTOMetricsCallback) for c in trainer.callback_handler.callbacks) == 1
    other = Trainer(model=copy.deepcopy(model), args=args(tmp_path), train_dataset=trainer.train_dataset)
    with pytest.raises(RuntimeError, match="detach"):
        kto.attach(other)


class CustomTrainer(Trainer):
    """A user's own subclass with its own override."""

    seen_steps = 0

    def training_step(self, *a, **kw):
        type(self).seen_steps += 1
        return super().training_step(*a, **kw)


def test_works_on_a_trainer_subclass_and_trains(model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, trainer_cls=CustomTrainer, max_steps=3)
    kto.attach(trainer)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert CustomTrainer.seen_steps == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and KTO_KEYS <= set(logs[0])
    assert logs[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # policy == reference at step 1
    assert logs[0]["kl"] == 0.0


def test_attach_sets_the_collator_when_the_user_forgot(model, tokenizer, rows, tmp_path):
    kto = KTOPlugin(KTOConfig(max_length=96), tokenizer=tokenizer)
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=kto.prepare_dataset(rows))
    original = trainer.data_collator
    kto.attach(trainer)
    assert trainer.data_collator is kto.collator
    trainer.train()
    kto.detach()
    assert trainer.data_collator is original


def test_per_device_batch_of_one_is_refused(model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, per_device_train_batch_size=1)
    with pytest.raises(ValueError, match="per_device_train_batch_size=1"):
        kto.attach(trainer)
    kto_apo, trainer = kto_trainer(
        copy.deepcopy(model), tokenizer, rows, tmp_path, kto_kwargs={"loss_type": "apo_zero_unpaired"},
        per_device_train_batch_size=1, max_steps=1,
    )
    kto_apo.attach(trainer)  # no KL pass, so one row per batch is fine
    trainer.train()


def test_a_last_batch_of_one_is_refused_before_training(model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path)
    n = len(trainer.train_dataset)
    trainer.train_dataset = trainer.train_dataset.select(range(n - (n % 4) - 3))  # 4k + 1 rows
    with pytest.raises(ValueError, match="last batch holds 1 row"):
        kto.attach(trainer)


def test_unknown_loss_type_names_the_available_ones(tokenizer):
    with pytest.raises(ValueError, match=r"Unknown KTOConfig.loss_type 'sigmoid'.*apo_zero_unpaired.*kto"):
        KTOPlugin(KTOConfig(loss_type="sigmoid"), tokenizer=tokenizer)


class Recorder(TrainerCallback):
    """Stands in for a report_to integration (W&B, TensorBoard): records what on_log receives."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_metrics_reach_integrations_and_eval_is_prefixed(model, tokenizer, rows, tmp_path):
    kto = KTOPlugin(KTOConfig(max_length=96), tokenizer=tokenizer)
    recorder = Recorder()
    trainer = Trainer(
        model=model, args=args(tmp_path), train_dataset=kto.prepare_dataset(rows),
        eval_dataset=kto.prepare_dataset(rows[-8:], name="eval"), data_collator=kto.collator, callbacks=[recorder],
    )
    kto.attach(trainer)
    trainer.train()
    metrics = trainer.evaluate()
    test_metrics = trainer.evaluate(metric_key_prefix="test")
    assert KTO_KEYS <= set(recorder.logs[0])
    assert {"eval_" + k for k in KTO_KEYS} <= set(metrics)
    assert {"eval_" + k for k in KTO_KEYS} <= set(recorder.logs[-2])
    assert {"test_" + k for k in KTO_KEYS} <= set(test_metrics)
    assert metrics["eval_loss"] == pytest.approx(test_metrics["test_loss"])
    assert metrics["eval_rewards/chosen"] == pytest.approx(test_metrics["test_rewards/chosen"])
    assert not any(k.startswith("eval_") for k in trainer.state.log_history[0])


def test_metrics_are_averaged_over_the_logging_interval(base_model, tokenizer, rows, tmp_path):
    plugin_every, trainer_every = kto_trainer(copy.deepcopy(base_model), tokenizer, rows, tmp_path, max_steps=4)
    plugin_pairs, trainer_pairs = kto_trainer(copy.deepcopy(base_model), tokenizer, rows, tmp_path, max_steps=4,
                                              logging_steps=2)
    plugin_every.attach(trainer_every)
    plugin_pairs.attach(trainer_pairs)
    trainer_every.train()
    trainer_pairs.train()
    single = [h for h in trainer_every.state.log_history if "loss" in h]
    paired = [h for h in trainer_pairs.state.log_history if "loss" in h]
    assert len(single) == 4 and len(paired) == 2
    for key in ("kl", "rewards/chosen", "logps/rejected", "entropy"):
        assert paired[1][key] == pytest.approx((single[2][key] + single[3][key]) / 2, rel=1e-5)
    assert paired[1]["num_tokens"] == single[3]["num_tokens"]  # a running count, not averaged


def _final_weights(trainer):
    """All parameters of the trained model, flattened."""
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


@pytest.mark.parametrize("loss_type,steps", [("apo_zero_unpaired", 3), ("kto", 1)])
def test_gradient_accumulation_equals_a_doubled_batch(loss_type, steps, base_model, tokenizer, rows, tmp_path):
    # kto: one step, where policy == reference makes z0 = 0 in both runs; apo_zero_unpaired has no z0
    common = dict(kto_kwargs={"loss_type": loss_type}, max_steps=steps, optim="sgd", learning_rate=0.5)
    plugin_ga, ga = kto_trainer(copy.deepcopy(base_model), tokenizer, rows, tmp_path, gradient_accumulation_steps=2,
                                per_device_train_batch_size=4, **common)
    plugin_big, big = kto_trainer(copy.deepcopy(base_model), tokenizer, rows, tmp_path, per_device_train_batch_size=8,
                                  **common)
    plugin_ga.attach(ga)
    plugin_big.attach(big)
    ga.train()
    big.train()
    start = torch.cat([p.detach().flatten() for p in base_model.parameters()])
    moved = (_final_weights(big) - start).abs().max().item()
    assert moved > 1e-3  # the step did something
    assert torch.allclose(_final_weights(ga), _final_weights(big), atol=1e-6, rtol=1e-5)
    ga_loss = [h["loss"] for h in ga.state.log_history if "loss" in h]
    big_loss = [h["loss"] for h in big.state.log_history if "loss" in h]
    assert ga_loss == pytest.approx(big_loss, rel=1e-5)


# --- everything attach() can install at once (review of the merged features) ---

ALL_ON = dict(kl_estimate="window", on_nonfinite="skip", sync_ref_model=True, ref_model_sync_steps=1,
              activation_offloading=True, generate_during_eval=True, generate_num_prompts=1,
              generate_max_new_tokens=2)


def _assert_restored(before, after):
    assert before[0].keys() == after[0].keys(), set(before[0]) ^ set(after[0])
    for key in before[0]:
        assert after[0][key] is before[0][key] or after[0][key] == before[0][key], key
    assert before[1:] == after[1:]


def _short(rows, tokenizer, n):
    pairs = [rows[i: i + 2] for i in range(0, len(rows), 2)]
    return [r for p in pairs if len(tokenizer(p[0]["prompt"])["input_ids"]) < 60 for r in p][:n]


def _all_on_trainer(model, tokenizer, rows, tmp_path, **kto_kwargs):
    short = _short(rows, tokenizer, 12)
    return kto_trainer(model, tokenizer, short[:8], tmp_path, kto_kwargs={**ALL_ON, **kto_kwargs},
                       eval_rows=short[8:12], gradient_accumulation_steps=2, max_steps=1)


def test_detach_restores_the_trainer_exactly_with_every_feature_on(model, tokenizer, rows, tmp_path):
    kto, trainer = _all_on_trainer(model, tokenizer, rows, tmp_path)
    before = _snapshot(trainer)
    kto.attach(trainer)
    kto.attach(trainer)  # idempotent
    assert sum(isinstance(c, ReferenceSyncCallback) for c in trainer.callback_handler.callbacks) == 1
    assert type(vars(trainer)["get_batch_samples"]).__name__ == "WindowBatchSamples"
    assert {"training_step", "train"} <= set(vars(trainer))
    kto.detach()
    _assert_restored(before, _snapshot(trainer))
    # attach again after detach: it trains (window z0, offloading, sync) and detaches exactly again
    kto.attach(trainer)
    trainer.train()
    assert _sync_callback(trainer).updates == 1
    kto.detach()
    after = _snapshot(trainer)
    assert [c for c in after[2]] == before[2]
    # the frozen-copy reference was taken out of accelerate's list; the policy train() prepared stays
    assert all(m is trainer.model for m in trainer.accelerator._models)
    assert {"get_batch_samples", "training_step", "train", "loss_is_scaled_for_ga"}.isdisjoint(vars(trainer))


def test_a_late_failure_in_attach_leaves_the_trainer_unchanged(model, tokenizer, rows, tmp_path, monkeypatch):
    """A refusal raised after attach() installed its wrappers (here: the last step before the summary) must
    undo them all, so that a fixed retry starts from the user's trainer."""
    import kto_plugin.trainer._attach as attach_module

    model.config.attention_dropout = 0.3
    kto, trainer = _all_on_trainer(model, tokenizer, rows, tmp_path)
    before = _snapshot(trainer)

    def refuse(*a, **kw):
        raise ValueError("late refusal")

    monkeypatch.setattr(attach_module, "install_model_init", refuse)
    with pytest.raises(ValueError, match="late refusal"):
        kto.attach(trainer)
    _assert_restored(before, _snapshot(trainer))
    assert kto.trainer is None and kto.reference.mode == "unset"
    monkeypatch.undo()
    kto.attach(trainer)  # the retry works
    assert trainer.compute_loss_func is kto.loss_hook
    kto.detach()
    _assert_restored(before, _snapshot(trainer))


def test_a_refused_attach_does_not_leave_the_peft_adapter_it_added(model, tokenizer, rows, tmp_path):
    """peft_config wraps the Trainer's model at attach(); a refusal after that (sync_ref_model with the null
    reference of a fresh adapter) must unwrap it, or a corrected plugin finds a model that 'already has
    adapters'."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    kto, trainer = kto_trainer(model, tokenizer, _short(rows, tokenizer, 8), tmp_path,
                               kto_kwargs={"sync_ref_model": True},
                               plugin_kwargs={"peft_config": lora})
    before = _snapshot(trainer)
    with pytest.raises(ValueError, match="base model with the adapter off"):
        kto.attach(trainer)
    assert trainer.model is model and trainer.model_wrapped is model
    assert not any("lora" in name for name, _ in model.named_parameters())
    _assert_restored(before, _snapshot(trainer))
    fixed = KTOPlugin(KTOConfig(max_length=96), tokenizer=tokenizer, peft_config=lora)
    fixed.attach(trainer)
    assert any("lora" in name for name, _ in trainer.model.named_parameters())


def test_another_plugins_collator_on_the_trainer_is_replaced(model, tokenizer, rows, tmp_path):
    """The Trainer was built with the collator of an earlier KTOPlugin (here without the KL batch); the plugin
    attached now must train with its own collator (KL batch, its model kwargs), restored by detach()."""
    first, trainer = kto_trainer(model, tokenizer, _short(rows, tokenizer, 8), tmp_path,
                                 kto_kwargs={"loss_type": "apo_zero_unpaired"}, max_steps=1)
    kto = KTOPlugin(KTOConfig(max_length=96), tokenizer=tokenizer)
    kto.attach(trainer)
    trainer.train()  # before the fix: KeyError 'kl_input_ids' (the earlier collator builds no KL batch)
    assert trainer.data_collator is kto.collator
    assert any("kl" in entry for entry in trainer.state.log_history)
    kto.detach()
    assert trainer.data_collator is first.collator


def test_a_second_plugin_on_an_attached_trainer_is_refused(model, tokenizer, rows, tmp_path):
    """Two plugins on one trainer would stack their wrappers and callbacks (two window KL passes, two resume
    states under one key); the second attach is refused and changes nothing."""
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, kto_kwargs={"kl_estimate": "window"})
    kto.attach(trainer)
    attached = _snapshot(trainer)
    other = KTOPlugin(KTOConfig(max_length=96), tokenizer=tokenizer)
    with pytest.raises(RuntimeError, match="another KTOPlugin.*detach"):
        other.attach(trainer)
    _assert_restored(attached, _snapshot(trainer))
    assert other.trainer is None
    kto.detach()
    other.attach(trainer)  # once detached, the other plugin may attach
    assert trainer.compute_loss_func is other.loss_hook


def _sync_callback(trainer):
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, ReferenceSyncCallback))


def test_an_attached_trainer_pickles_and_the_copy_trains_and_detaches(model, tokenizer, rows, tmp_path):
    """Ray Tune pickles the Trainer (with the plugin attached) to ship it to its workers: the copy must be a
    working attached trainer of its own, with every feature's wrapper and callback."""
    import pickle

    from accelerate.state import GradientState

    # accelerate's GradientState is one shared object per process that keeps weak references to the dataloaders
    # of every earlier train() (earlier tests): no Trainer, with or without the plugin, pickles while it holds them
    GradientState._reset_state()
    kto, trainer = _all_on_trainer(model, tokenizer, rows, tmp_path)
    before = pickle.loads(pickle.dumps(trainer))  # the user's trainer, unattached, as a pickled copy
    kto.attach(trainer)
    copy_ = pickle.loads(pickle.dumps(trainer))
    hook = copy_.compute_loss_func
    assert isinstance(hook, KTOComputeLoss) and hook is not kto.loss_hook and hook.trainer is copy_
    assert type(vars(copy_)["get_batch_samples"]).__name__ == "WindowBatchSamples"
    assert vars(copy_)["get_batch_samples"].trainer is copy_
    assert _sync_callback(copy_).trainer is copy_
    copy_.train()
    trainer.train()
    assert copy_.state.log_history[0]["loss"] == trainer.state.log_history[0]["loss"]
    assert {k: copy_.state.log_history[0][k] for k in KTO_KEYS} == {
        k: trainer.state.log_history[0][k] for k in KTO_KEYS}
    # the copy's plugin detaches its own trainer exactly
    plugin = next(c for c in copy_.callback_handler.callbacks if type(c).__name__ == "ResumeCallback").plugin
    plugin.detach()
    assert {"get_batch_samples", "training_step", "train", "loss_is_scaled_for_ga"}.isdisjoint(vars(copy_))
    assert [type(c) for c in copy_.callback_handler.callbacks] == [type(c) for c in before.callback_handler.callbacks]
    assert copy_.compute_loss_func is None


def test_by_default_only_train_is_wrapped(model, tokenizer, rows, tmp_path):
    """`train` always (it resumes from the last complete checkpoint, `kto_plugin.trainer`); the other methods
    only when a setting needs them. `detach` removes the instance attribute again."""
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path)
    kto.attach(trainer)
    assert "train" in vars(trainer)
    assert "get_batch_samples" not in vars(trainer) and "training_step" not in vars(trainer)
    kto.detach()
    assert "train" not in vars(trainer)


def test_a_wrapped_method_with_another_signature_is_refused_at_attach(model, tokenizer, rows, tmp_path):
    """A transformers release (or a user's subclass) whose get_batch_samples takes other parameters than the
    wrapper was written for: refused at attach, naming the version, before anything is changed."""
    import transformers

    from kto_plugin.trainer import SignatureMismatch

    class Renamed(Trainer):
        def get_batch_samples(self, iterator, num_batches, device):
            return super().get_batch_samples(iterator, num_batches, device)

    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, trainer_cls=Renamed,
                               kto_kwargs={"kl_estimate": "window"})
    before = _snapshot(trainer)
    with pytest.raises(SignatureMismatch, match=rf"transformers {transformers.__version__}.*get_batch_samples"):
        kto.attach(trainer)
    _assert_restored(before, _snapshot(trainer))
    assert kto.trainer is None


@pytest.mark.parametrize("remove_unused_columns", [True, False])
def test_forgotten_attach_says_to_call_attach(model, tokenizer, rows, tmp_path, remove_unused_columns):
    """The README's four lines without line 4: the default Trainer strips the KTO columns (the collator
    says so); with remove_unused_columns=False the model computes its own loss from the KTO labels."""
    kto, trainer = kto_trainer(model, tokenizer, rows[:8], tmp_path, kto_kwargs={"max_length": 1024},
                               remove_unused_columns=remove_unused_columns)
    error = KeyError if remove_unused_columns else TypeError
    with pytest.raises(error, match=r"call kto\.attach\(trainer\) before trainer\.train\(\)"):
        trainer.train()
    with pytest.raises(error, match=r"call kto\.attach\(trainer\) before trainer\.train\(\)"):
        trainer.evaluate(eval_dataset=trainer.train_dataset)


def test_loss_hook_set_by_hand_says_to_call_attach(model, tokenizer, rows, tmp_path):
    kto = KTOPlugin(KTOConfig(max_length=1024), tokenizer=tokenizer)
    trainer = Trainer(model=model, args=args(tmp_path, remove_unused_columns=False),
                      train_dataset=kto.prepare_dataset(rows[:8]), data_collator=kto.collator,
                      compute_loss_func=kto.loss_hook)
    with pytest.raises(RuntimeError, match=r"call kto\.attach\(trainer\) before trainer\.train\(\)"):
        trainer.train()
