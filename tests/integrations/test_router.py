"""Mixture-of-Experts router auxiliary loss (`router_aux_loss_coef`), on a tiny Mixtral built from config.

The plain reference is the model itself: `model(..., output_router_logits=True).aux_loss` on the same batch.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import kto_trainer
from reference_cases import parity_problems, train_and_evaluate
from trl_oracle import run_ours, run_trl, training_args


def tiny_mixtral(vocab_size: int, seed: int = 1, **config_kwargs):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=4096, tie_word_embeddings=False, **config_kwargs)
    torch.manual_seed(seed)
    return MixtralForCausalLM(config)


@pytest.fixture(scope="module")
def moe(tokenizer):
    return tiny_mixtral(len(tokenizer))


def _first_step(model, tokenizer, rows, tmp_path, **kto_kwargs):
    """Loss and logs of one step at lr 0, and the step's batch."""
    kto, trainer = kto_trainer(copy.deepcopy(model), tokenizer, rows, tmp_path, kto_kwargs=kto_kwargs, max_steps=1,
                               optim="sgd", learning_rate=0.0)
    kto.attach(trainer)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    return trainer.state.log_history[0], batch


def _model_aux_loss(model, batch) -> float:
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    return out.aux_loss.item()


@pytest.mark.parametrize("coef,config_coef", [(0.5, 0.001), (None, 0.25)])
def test_aux_loss_is_added_as_the_model_computes_it(coef, config_coef, tokenizer, rows, tmp_path):
    model = tiny_mixtral(len(tokenizer), router_aux_loss_coef=config_coef)
    plain, batch = _first_step(model, tokenizer, rows, tmp_path, router_aux_loss_coef=0.0)
    with_aux, _ = _first_step(model, tokenizer, rows, tmp_path, router_aux_loss_coef=coef)
    aux = _model_aux_loss(model, batch)
    assert aux > 1.0  # the load-balancing loss is >= 1 (top-k * experts * sum f_i P_i); far from 0
    assert "aux_loss" not in plain  # coefficient 0: no auxiliary loss
    assert with_aux["aux_loss"] == pytest.approx(aux, rel=1e-5)
    weight = coef if coef is not None else config_coef  # None: the model config's coefficient
    assert with_aux["loss"] == pytest.approx(plain["loss"] + weight * aux, rel=1e-4)


def test_only_the_policy_training_forward_asks_for_router_logits(moe, tokenizer, rows, tmp_path):
    # rows not split by length, so each pass is one forward (a Mixtral computes each prompt per pass: not verified
    # for reusing the prompt's cache)
    kto, trainer = kto_trainer(copy.deepcopy(moe), tokenizer, rows, tmp_path, max_steps=1,
                               kto_kwargs={"length_buckets": "off"})
    kto.attach(trainer)
    calls = {"policy": [], "reference": []}
    for name, module in (("policy", trainer.model), ("reference", kto.reference.ref_model)):
        module.register_forward_pre_hook(
            lambda m, a, kw, name=name: calls[name].append(bool(kw.get("output_router_logits"))), with_kwargs=True)
    trainer.train()
    assert calls["policy"] == [True, False]  # the target batch with grad, then the no-grad KL batch
    assert calls["reference"] == [False, False]


def test_gradient_reaches_the_router_through_the_aux_loss(moe, tokenizer, rows, tmp_path):
    grads = {}
    for coef in (0.0, 1.0):
        kto, trainer = kto_trainer(copy.deepcopy(moe), tokenizer, rows, tmp_path, max_steps=1, optim="sgd",
                                   learning_rate=1.0, kto_kwargs={"router_aux_loss_coef": coef})
        kto.attach(trainer)
        before = trainer.model.model.layers[0].mlp.gate.weight.detach().clone()
        trainer.train()
        grads[coef] = before - trainer.model.model.layers[0].mlp.gate.weight.detach()  # = lr * gradient
    assert (grads[1.0] - grads[0.0]).abs().max() > 1e-4


def test_coefficient_on_a_dense_model_is_refused(model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, kto_kwargs={"router_aux_loss_coef": 0.1})
    with pytest.raises(ValueError, match="router_aux_loss_coef=0.1.*not a Mixture-of-Experts"):
        kto.attach(trainer)
    assert trainer.compute_loss_func is None and kto.trainer is None


def test_dense_model_without_coefficient_is_unchanged(model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, kto_kwargs={"router_aux_loss_coef": 0.0})
    kto.attach(trainer)
    assert "output_router_logits" not in kto.collator.model_kwargs
    assert kto.loss_hook.router_aux_loss_coef is None


@pytest.mark.slow
def test_aux_loss_matches_trl(tokenizer, rows, tmp_path):
    # router_aux_loss_coef=None: both take the model config's coefficient (0.05 here, so the term is ~0.1)
    model = tiny_mixtral(len(tokenizer), router_aux_loss_coef=0.05)
    kto_kwargs = dict(beta=0.1, max_length=128, router_aux_loss_coef=None)
    args = training_args(str(tmp_path), max_steps=3)
    eval_rows = rows[-8:]
    trl = run_trl(model, rows, tokenizer, kto_kwargs, args, eval_rows=eval_rows)
    ours, _ = run_ours(model, rows, tokenizer, kto_kwargs, args, eval_rows=eval_rows)
    train_and_evaluate(trl, ours)
    expected, actual = trl.state.log_history, ours.state.log_history
    assert any("aux_loss" in e for e in actual) and any("eval_aux_loss" in e for e in actual)
    assert parity_problems(expected, actual) == []


def test_window_estimate_with_router_aux_loss(moe, tokenizer, rows, tmp_path):
    """kl_estimate="window": the window's KL pass (one no-grad forward per micro-batch, when the Trainer fetches
    the window) asks for no router logits; each micro-batch's training forward does, and its aux_loss is
    added to that micro-batch's loss as without the window."""
    runs = {}
    for estimate in ("batch", "window"):
        kto, trainer = kto_trainer(copy.deepcopy(moe), tokenizer, rows, tmp_path, max_steps=1, optim="sgd",
                                   learning_rate=0.0, gradient_accumulation_steps=2,
                                   kto_kwargs={"kl_estimate": estimate, "router_aux_loss_coef": 0.5,
                                               "length_buckets": "off"})
        kto.attach(trainer)
        calls = []
        trainer.model.register_forward_pre_hook(
            lambda m, a, kw: calls.append(bool(kw.get("output_router_logits"))), with_kwargs=True)
        trainer.train()
        runs[estimate] = (calls, trainer.state.log_history[0])
    assert runs["window"][0] == [False, False, True, True]
    assert runs["batch"][0] == [True, False, True, False]
    assert runs["window"][1]["aux_loss"] == pytest.approx(runs["batch"][1]["aux_loss"], rel=1e-6)
