"""Training options that KTOTrainer users set: gradient checkpointing, pad_to_multiple_of, disable_dropout.

* `gradient_checkpointing=True` checkpoints the policy's forward with gradient only; the reference and the KL
  passes run under no-grad, un-checkpointed, and build no autograd graph (TRL 1.16 disables checkpointing
  around them explicitly; transformers >= 5.24 only checkpoints under grad, older 5.x calls the checkpoint
  function without grad, i.e. plainly).
* `pad_to_multiple_of` changes the batch width, never the numbers.
* `disable_dropout` sets every `nn.Dropout` of the policy and reference to p = 0 while attached (as TRL's
  `disable_dropout_in_model`); dropout written as a function of a config value (Llama's `attention_dropout`)
  is not a module and is left as is, by TRL too.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers.modeling_utils
from helpers import kto_trainer
from packaging.version import Version
from transformers import GPT2Config, GPT2LMHeadModel


def _weights(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def test_checkpointing_covers_the_policy_forward_with_grad_only(base_model, tokenizer, rows, tmp_path, monkeypatch):
    checkpointed = []  # (layer, grad enabled) for every checkpointed layer call
    original = transformers.modeling_utils.checkpoint

    def counting(function, *args, **kwargs):
        # the layer: partial(forward, layer, ...) in recent transformers, partial(layer.__call__, ...) in 5.19
        layer = function.args[0] if function.args else function.func.__self__
        checkpointed.append((layer, torch.is_grad_enabled()))
        return original(function, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting)  # the Trainer enables it in train()
    policy = copy.deepcopy(base_model)
    # before attach: the frozen-copy reference inherits the flag; transformers 5.19 only has the old name
    enable = getattr(policy, "activation_checkpointing_enable", None) or policy.gradient_checkpointing_enable
    enable()
    kto, trainer = kto_trainer(policy, tokenizer, rows, tmp_path, max_steps=1, optim="sgd", learning_rate=1.0,
                               gradient_checkpointing=True, kto_kwargs={"length_buckets": "off"})
    kto.attach(trainer)
    graphs = {"policy": [], "reference": []}  # does each forward's output carry an autograd graph?
    for role, module in (("policy", trainer.model), ("reference", kto.reference.ref_model)):
        module.register_forward_hook(lambda m, a, out, role=role: graphs[role].append(
            out.hidden_states[-1].grad_fn is not None))
    trainer.train()

    policy_layers = set(map(id, trainer.model.model.layers))
    with_grad = [id(layer) for layer, grad in checkpointed if grad]
    assert len(with_grad) == len(policy_layers) == 2 and set(with_grad) == policy_layers  # the target forward
    # transformers < 5.24 also sends the policy's no-grad KL forward through the checkpoint function (which
    # torch runs as a plain call without grad); from 5.24 it runs un-checkpointed. The reference never is.
    without_grad = [id(layer) for layer, grad in checkpointed if not grad]
    assert set(without_grad) <= policy_layers
    if Version(transformers.__version__) >= Version("5.24"):
        assert without_grad == []
    # the policy: target, KL (full rows: a checkpointed forward keeps no cache); the reference: its prompts, then
    # the target and the KL completions together against them
    assert graphs == {"policy": [True, False], "reference": [False, False]}

    # and checkpointing does not change the step
    kto_plain, plain = kto_trainer(copy.deepcopy(base_model), tokenizer, rows, tmp_path, max_steps=1, optim="sgd",
                                   learning_rate=1.0)
    kto_plain.attach(plain)
    plain.train()
    assert (_weights(plain) - torch.cat([p.flatten() for p in base_model.parameters()])).abs().max() > 1e-3
    torch.testing.assert_close(_weights(trainer), _weights(plain), rtol=1e-5, atol=1e-6)


def test_pad_to_multiple_of_changes_widths_not_numbers(base_model, tokenizer, rows, tmp_path):
    logs = {}
    for multiple in (None, 64):
        kto, trainer = kto_trainer(copy.deepcopy(base_model), tokenizer, rows, tmp_path, max_steps=2,
                                   kto_kwargs={"pad_to_multiple_of": multiple})
        kto.attach(trainer)
        batch = next(iter(trainer.get_train_dataloader()))
        if multiple:
            assert batch["input_ids"].shape[1] % multiple == 0 and batch["labels"]["kl_input_ids"].shape[1] % 64 == 0
        trainer.train()
        logs[multiple] = [h for h in trainer.state.log_history if "loss" in h]
    for a, b in zip(logs[None], logs[64], strict=True):
        for key in ("loss", "kl", "rewards/chosen", "logps/rejected", "logits/chosen", "entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    # num_tokens counts attention-mask ones, so padding does not inflate it
    assert logs[64][-1]["num_tokens"] == logs[None][-1]["num_tokens"]


def _gpt2(vocab_size):
    torch.manual_seed(2)
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                        resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize("disable", [True, False])
def test_disable_dropout(disable, tokenizer, rows, tmp_path):
    model = _gpt2(len(tokenizer))
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.5 for m in dropouts)
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, max_steps=1, learning_rate=0.0,
                               kto_kwargs={"disable_dropout": disable, "max_length": 128})
    kto.attach(trainer)
    reference_dropouts = [m for m in kto.reference.ref_model.modules() if isinstance(m, torch.nn.Dropout)]
    expected_p = 0.0 if disable else 0.5
    assert all(m.p == expected_p for m in dropouts + reference_dropouts)
    trainer.train()
    first = trainer.state.log_history[0]
    if disable:
        # no dropout: at step 0 the policy (train mode) equals the reference, so every loss is 0.5 and rewards 0
        assert first["loss"] == pytest.approx(0.5, abs=1e-6) and first["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    else:
        assert abs(first["rewards/chosen"]) > 1e-2  # the train-mode policy is noisy
    kto.detach()
    assert all(m.p == 0.5 for m in dropouts)
