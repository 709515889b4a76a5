"""`sync_ref_model` (TR-DPO): ref <- alpha * policy + (1 - alpha) * ref every tau optimizer steps.

Checked against a slow reference (the recurrence applied to the policy's weights recorded after every step) for
each reference that can follow the policy, against TRL 1.16 where TRL supports it (a separate reference model),
and refused where it cannot (the base model with the adapter off).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import kto_trainer
from peft import LoraConfig
from reference_cases import parity_problems, peft_policy, train_and_evaluate
from transformers import TrainerCallback
from trl_oracle import run_ours, run_trl, training_args

from kto_plugin.demo import build_tiny_model
from kto_plugin.reference._sync import ReferenceSyncCallback

ALPHA, TAU, STEPS = 0.6, 2, 5


class PolicyRecorder(TrainerCallback):
    """The policy's parameters after every optimizer step, renamed to the reference's names by `rename`."""

    def __init__(self, select):
        self.select = select  # model -> {reference name: policy tensor}
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.states[state.global_step] = {k: v.detach().clone() for k, v in self.select(model).items()}


def slow_reference(initial: dict[str, torch.Tensor], states: dict[int, dict[str, torch.Tensor]]) -> dict:
    """The TR-DPO recurrence, step by step, in float64."""
    ref = {k: v.double() for k, v in initial.items()}
    for step in range(1, STEPS + 1):
        if step % TAU == 0:
            ref = {k: ALPHA * states[step][k].double() + (1 - ALPHA) * ref[k] for k in ref}
    return ref


def whole_model(model):
    return dict(model.named_parameters())


def adapter(name, rename_to=None):
    def select(model):
        token = f".{name}."
        out = {n: p for n, p in model.named_parameters() if token in f".{n}."}
        if rename_to is None:
            return out
        return {f".{n}.".replace(token, f".{rename_to}.")[1:-1]: p for n, p in out.items()}

    return select


def _train(model, tokenizer, rows, tmp_path, select_policy, lr, **plugin_kwargs):
    kto_kwargs = dict(sync_ref_model=True, ref_model_mixup_alpha=ALPHA, ref_model_sync_steps=TAU,
                      **plugin_kwargs.pop("kto_kwargs", {}))
    recorder = PolicyRecorder(select_policy)
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, kto_kwargs=kto_kwargs, plugin_kwargs=plugin_kwargs,
                               max_steps=STEPS, optim="sgd", learning_rate=lr)
    trainer.add_callback(recorder)
    kto.attach(trainer)
    return kto, trainer, recorder


def _check(initial, final, recorder):
    expected = slow_reference(initial, recorder.states)
    assert set(final) == set(expected) and final
    moved = max((final[k].double() - initial[k].double()).abs().max().item() for k in final)
    assert moved > 1e-3  # the reference did move
    off_policy = max((final[k].double() - recorder.states[STEPS][k].double()).abs().max().item() for k in final)
    assert off_policy > 1e-3  # and is not simply the policy
    for k in final:
        torch.testing.assert_close(final[k].double(), expected[k], rtol=1e-5, atol=1e-6, msg=k)


def test_frozen_copy_follows_the_policy(model, tokenizer, rows, tmp_path):
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    kto, trainer, recorder = _train(model, tokenizer, rows, tmp_path, whole_model, lr=0.5)
    trainer.train()
    _check(initial, whole_model(kto.reference.ref_model), recorder)


def test_separate_ref_model_follows_the_policy_in_place(model, tokenizer, rows, tmp_path):
    ref_model = build_tiny_model(len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, seed=7)
    initial = {k: v.detach().clone() for k, v in ref_model.named_parameters()}
    kto, trainer, recorder = _train(model, tokenizer, rows, tmp_path, whole_model, lr=0.5, ref_model=ref_model)
    trainer.train()
    _check(initial, whole_model(ref_model), recorder)  # the given model itself was updated


def test_ref_adapter_follows_the_trained_adapter(base_model, tokenizer, rows, tmp_path):
    policy = peft_policy(base_model, trained=False)
    torch.manual_seed(3)
    policy.add_adapter("ref", LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights=False, inference_mode=True))
    initial = {k: v.detach().clone() for k, v in adapter("ref")(policy).items()}
    kto, trainer, recorder = _train(policy, tokenizer, rows, tmp_path, adapter("default", "ref"), lr=64.0)
    assert kto.reference.mode == "named_adapter" and kto.reference.ref_adapter_name == "ref"
    trainer.train()
    _check(initial, adapter("ref")(policy), recorder)


def test_frozen_adapter_copy_follows_the_trained_adapter(base_model, tokenizer, rows, tmp_path):
    policy = peft_policy(base_model, trained=True)
    initial = {f".{k}.".replace(".default.", ".ref.")[1:-1]: v.detach().clone()
               for k, v in adapter("default")(policy).items()}
    kto, trainer, recorder = _train(policy, tokenizer, rows, tmp_path, adapter("default", "ref"), lr=64.0,
                                    kto_kwargs={"peft_reference": "initial_adapter"})
    trainer.train()
    _check(initial, adapter("ref")(policy), recorder)


def test_callback_installed_by_attach_removed_by_detach_counts_optimizer_steps(model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, max_steps=3, gradient_accumulation_steps=2,
                               kto_kwargs=dict(sync_ref_model=True, ref_model_sync_steps=1))
    kto.attach(trainer)
    kto.attach(trainer)
    syncs = [c for c in trainer.callback_handler.callbacks if isinstance(c, ReferenceSyncCallback)]
    assert len(syncs) == 1
    trainer.train()
    assert syncs[0].updates == 3  # once per optimizer step, not per micro-batch
    kto.detach()
    assert not any(isinstance(c, ReferenceSyncCallback) for c in trainer.callback_handler.callbacks)


def test_null_reference_is_refused_before_training(base_model, tokenizer, rows, tmp_path):
    policy = peft_policy(base_model, trained=False)  # a fresh LoRA: the reference is the base model
    kto, trainer = kto_trainer(policy, tokenizer, rows, tmp_path, kto_kwargs=dict(sync_ref_model=True))
    callbacks = list(trainer.callback_handler.callbacks)
    with pytest.raises(ValueError, match=r"adapter off.*peft_reference='initial_adapter'"):
        kto.attach(trainer)
    assert trainer.compute_loss_func is None and trainer.callback_handler.callbacks == callbacks
    assert kto.trainer is None and list(policy.peft_config) == ["default"]


def test_peft_policy_with_separate_ref_model_is_refused(base_model, tokenizer, rows, tmp_path):
    policy = peft_policy(base_model, trained=False)
    kto, trainer = kto_trainer(policy, tokenizer, rows, tmp_path, kto_kwargs=dict(sync_ref_model=True),
                               plugin_kwargs=dict(ref_model=copy.deepcopy(base_model)))
    with pytest.raises(ValueError, match="PEFT policy and a separate ref_model"):
        kto.attach(trainer)


def test_ref_model_of_another_architecture_is_refused(model, tokenizer, rows, tmp_path):
    other = build_tiny_model(len(tokenizer), hidden_size=32, num_layers=1, num_heads=4, seed=7)
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, kto_kwargs=dict(sync_ref_model=True),
                               plugin_kwargs=dict(ref_model=other))
    with pytest.raises(ValueError, match="parameters differ"):
        kto.attach(trainer)


@pytest.mark.slow
def test_sync_matches_trl(base_model, tokenizer, rows, tmp_path):
    kto_kwargs = dict(beta=0.1, max_length=128, sync_ref_model=True, ref_model_mixup_alpha=ALPHA,
                      ref_model_sync_steps=TAU)
    args = training_args(str(tmp_path))
    eval_rows = rows[-8:]
    trl = run_trl(base_model, rows, tokenizer, kto_kwargs, args, eval_rows=eval_rows)
    ours, _ = run_ours(base_model, rows, tokenizer, kto_kwargs, args, eval_rows=eval_rows)
    train_and_evaluate(trl, ours)
    expected, actual = trl.state.log_history, ours.state.log_history
    assert parity_problems(expected, actual) == []
    # and the sync changed the run: without it the rewards after the first sync differ
    plain, _ = run_ours(base_model, rows, tokenizer, dict(kto_kwargs, sync_ref_model=False),
                        dict(args, max_steps=TAU + 2))
    plain.train()
    steps = {e["step"]: e["rewards/chosen"] for e in actual if "loss" in e}
    unsynced = {e["step"]: e["rewards/chosen"] for e in plain.state.log_history if "loss" in e}
    assert len(unsynced) == TAU + 2
    assert all(abs(steps[s] - unsynced[s]) > 1e-3 for s in (TAU + 1, TAU + 2))
    assert all(steps[s] == unsynced[s] for s in range(1, TAU + 1))  # identical until the first sync
