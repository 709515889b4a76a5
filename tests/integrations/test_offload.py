"""`activation_offloading`: saved activations go to CPU memory and come back; gradients are unchanged.

This machine has no accelerator, where offloading is a no-op (activations are already in CPU memory); the tests
set `offload_cpu_tensors` so that every eligible saved tensor makes the round trip through a copy anyway.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import kto_trainer
from torch import nn

from kto_plugin.integrations._offload import ActivationOffloader


def test_activations_are_copied_out_and_back_weights_are_not():
    torch.manual_seed(0)
    layer = nn.Linear(64, 64)
    x = torch.randn(32, 64, requires_grad=True)
    plain = torch.tanh(layer(x)).sum()
    expected = torch.autograd.grad(plain, [x, layer.weight, layer.bias])

    offloader = ActivationOffloader()
    offloader.offload_cpu_tensors = True
    with offloader(layer):
        out = torch.tanh(layer(x)).sum()
        small = (torch.ones(2, 2, requires_grad=True) * 3).exp().sum()  # 16 bytes: below the threshold
    # saved: the input x (for the weight gradient) and tanh's output, 8 KiB each; the weight is used in place
    assert offloader.offloaded == 2 and offloader.offloaded_bytes == 2 * 32 * 64 * 4
    got = torch.autograd.grad(out, [x, layer.weight, layer.bias])  # unpacked outside the context
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    small.backward()
    assert offloader.offloaded == 2


def test_cpu_tensors_stay_put_by_default():
    layer = nn.Linear(64, 64)
    offloader = ActivationOffloader()
    with offloader(layer):
        torch.tanh(layer(torch.randn(32, 64, requires_grad=True))).sum().backward()
    assert offloader.offloaded == 0


def _weights(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


@pytest.mark.parametrize("checkpointing,accumulation", [(False, 1), (True, 1), (False, 2)],
                         ids=["plain", "checkpointing", "accumulation-window"])
def test_training_is_unchanged_by_offloading(checkpointing, accumulation, base_model, tokenizer, rows, tmp_path):
    runs = {}
    # with accumulation: every micro-batch's training_step is wrapped; z0 over the window (kl_estimate="window")
    kl_estimate = "window" if accumulation > 1 else "batch"
    for offload in (False, True):
        kto, trainer = kto_trainer(copy.deepcopy(base_model), tokenizer, rows, tmp_path, max_steps=2, optim="sgd",
                                   learning_rate=1.0, gradient_checkpointing=checkpointing,
                                   gradient_accumulation_steps=accumulation,
                                   kto_kwargs={"activation_offloading": offload, "kl_estimate": kl_estimate})
        kto.attach(trainer)
        if offload:
            kto.activation_offloader.offload_cpu_tensors = True
        trainer.train()
        runs[offload] = (_weights(trainer), [h["loss"] for h in trainer.state.log_history if "loss" in h])
        if offload:
            assert kto.activation_offloader.offloaded > 10  # the policy forward's activations made the trip
    start = torch.cat([p.detach().flatten() for p in base_model.parameters()])
    assert (runs[False][0] - start).abs().max() > 1e-3  # the steps moved the weights
    assert torch.equal(runs[True][0], runs[False][0])  # bit-identical copies: bit-identical gradients
    assert runs[True][1] == runs[False][1]


def test_attach_wraps_training_step_and_detach_restores_it(model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, kto_kwargs={"activation_offloading": True})
    kto.attach(trainer)
    assert "training_step" in vars(trainer)
    kto.detach()
    assert "training_step" not in vars(trainer) and kto.activation_offloader is not None
