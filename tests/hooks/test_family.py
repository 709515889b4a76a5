"""The KTO family (docs/losses.md) through the real step: each variant's loss, gradients, z0, state and metrics equal
a slow plain-PyTorch reference computed row by row from full-vocabulary logits (tests/reference_impl.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from family_task import build_task_tokenizer, kto_rows
from helpers import kto_trainer
from kto_plugin.demo import build_tiny_model
from reference_impl import (
    naive_bco_losses,
    naive_kto_losses,
    naive_log_ratio,
    naive_positive_mean,
    naive_reward_accuracy,
    naive_sft_term,
    naive_token_logps,
    naive_weighted_mean,
    naive_z0,
)

BETA = 0.5
WEIGHTS = {"desirable_weight": 1.3, "undesirable_weight": 0.8}
CLAMP = (-0.05, 0.08)  # tight enough that the two random models' token log-ratios fall on both sides
DECAY = 0.6

VARIANTS = {
    "kto": {},
    "bco": {"loss_type": "bco"},
    "humanline": {"loss_type": "humanline", "humanline_min_log_ratio": CLAMP[0],
                  "humanline_max_log_ratio": CLAMP[1]},
    "kto_length_normalized": {"length_normalize": True},
    "bco_length_normalized": {"loss_type": "bco", "length_normalize": True},
    "humanline_length_normalized": {"loss_type": "humanline", "length_normalize": True,
                                    "humanline_min_log_ratio": CLAMP[0], "humanline_max_log_ratio": CLAMP[1]},
    "sft_term": {"sft_weight": 0.3},
    "positive_mean": {"reference_point": "positive_mean"},
    "ema": {"reference_point": "ema", "reference_point_ema_decay": DECAY},
}
LABELS = {
    "mixed": [True, False, False, True],
    "all_desirable": [True] * 4,
    "all_undesirable": [False] * 4,
}


@pytest.fixture(scope="module")
def task_tokenizer():
    return build_task_tokenizer()


@pytest.fixture(scope="module")
def two_models(task_tokenizer):
    """(policy, reference): two different random tiny Llamas, so log-ratios are not 0."""
    return (build_tiny_model(len(task_tokenizer), hidden_size=32, seed=11),
            build_tiny_model(len(task_tokenizer), hidden_size=32, seed=12))


def _rows_with(dataset, labels, skip=0):
    """Rows of `dataset` whose labels are `labels` in order, after skipping the first `skip` matches of each."""
    pools = {True: [r for r in dataset if r["label"]], False: [r for r in dataset if not r["label"]]}
    taken = {True: skip, False: skip}
    out = []
    for label in labels:
        out.append(pools[label][taken[label]])
        taken[label] += 1
    return out


class Naive:
    """The slow reference of one micro-batch: every row's per-token log-probs, one unpadded row at a time."""

    def __init__(self, policy, reference, rows, config):
        self.labels = torch.tensor([r["label"] for r in rows])
        prompts = [r["prompt_ids"] for r in rows]
        completions = [r["completion_ids"] for r in rows]
        partners = completions[-1:] + completions[:-1]  # the collator's KL pairing: prompt i, completion i-1
        clamp = CLAMP if config.get("loss_type") == "humanline" else None
        normalize = config.get("length_normalize", False)
        self.policy_tokens = [naive_token_logps(policy, p, c) for p, c in zip(prompts, completions)]
        with torch.no_grad():
            self.reference_tokens = [naive_token_logps(reference, p, c) for p, c in zip(prompts, completions)]
            kl_ratios = [
                naive_log_ratio(naive_token_logps(policy, p, c), naive_token_logps(reference, p, c), clamp, normalize)
                for p, c in zip(prompts, partners)
            ]
        self.kl_ratios = torch.stack(kl_ratios)
        self.log_ratios = torch.stack([
            naive_log_ratio(p, q, clamp, normalize) for p, q in zip(self.policy_tokens, self.reference_tokens)
        ])
        self.clamped = sum(int(((p - q) < CLAMP[0]).sum() + ((p - q) > CLAMP[1]).sum())
                           for p, q in zip(self.policy_tokens, self.reference_tokens))
        self.num_tokens = torch.tensor([float(len(t)) for t in self.policy_tokens])
        self.policy_logps = torch.stack([t.sum() for t in self.policy_tokens])


def _naive_loss(config, batch: Naive, previous: Naive | None):
    """(loss, reference point in log-ratio units, logged extras) of the second micro-batch `batch`, `previous` the
    first one of the run (BCO's running mean and the EMA of z0 include it)."""
    labels, r = batch.labels, batch.log_ratios
    loss_type = config.get("loss_type", "kto")
    extras = {}
    if loss_type == "bco":
        seen = torch.cat([previous.log_ratios, r]).detach()
        delta = BETA * seen.double().mean().item()
        losses = naive_bco_losses(r, labels, delta, BETA)
        reference_point = delta / BETA
        extras["bco/delta"] = delta
    else:
        point = config.get("reference_point", "mean")
        if point == "positive_mean":
            z0 = naive_positive_mean(batch.kl_ratios)
        elif point == "ema":
            z0 = DECAY * naive_z0(previous.kl_ratios, torch.zeros(4)) + (1 - DECAY) * naive_z0(batch.kl_ratios,
                                                                                                 torch.zeros(4))
        else:
            z0 = naive_z0(batch.kl_ratios, torch.zeros(4))
        losses = naive_kto_losses(r, torch.zeros_like(r), labels, torch.tensor(z0), BETA)
        reference_point = z0
        extras["kl"] = z0
    loss = naive_weighted_mean(losses, labels, WEIGHTS["desirable_weight"], WEIGHTS["undesirable_weight"])
    if config.get("sft_weight"):
        term = naive_sft_term(batch.policy_logps, batch.num_tokens, labels, config["sft_weight"])
        extras["sft_loss"] = term.item()
        loss = loss + term
    extras["rewards/accuracy"] = naive_reward_accuracy(r.detach(), labels, reference_point)
    return loss, extras


@pytest.mark.parametrize("case", list(LABELS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_its_slow_reference_values_gradients_and_metrics(variant, case, task_tokenizer, two_models,
                                                                          tmp_path):
    config = VARIANTS[variant]
    policy, reference = copy.deepcopy(two_models[0]), two_models[1]
    naive_policy = copy.deepcopy(policy)
    kto, trainer = kto_trainer(policy, task_tokenizer, kto_rows(), tmp_path,
                               kto_kwargs={"beta": BETA, **WEIGHTS, **config}, plugin_kwargs={"ref_model": reference})
    kto.attach(trainer)
    first, second = (_rows_with(trainer.train_dataset, LABELS[case], skip) for skip in (0, 4))
    trainer.model.train()
    with torch.no_grad():  # the run's first micro-batch: updates BCO's running mean and the EMA of z0
        trainer.compute_loss(trainer.model, kto.collator(first))
    kto.metrics.pop("train")
    loss = trainer.compute_loss(trainer.model, kto.collator(second))
    loss.backward()
    logged = kto.metrics.pop("train")

    previous = Naive(naive_policy, reference, first, config)
    batch = Naive(naive_policy, reference, second, config)
    want, extras = _naive_loss(config, batch, previous)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    for (name, ours), theirs in zip(trainer.model.named_parameters(), naive_policy.parameters()):
        assert torch.allclose(ours.grad, theirs.grad, rtol=1e-4, atol=1e-7), name
    for name, value in extras.items():  # float32 noise of a difference of two summed log-probs: ~1e-5
        assert logged[name] == pytest.approx(value, rel=1e-5, abs=2e-5), name
    if config.get("loss_type") == "humanline":
        assert 0 < batch.clamped < batch.num_tokens.sum()  # the clamp is exercised both ways


def test_per_token_log_probs_are_computed_only_when_a_plugin_asks(task_tokenizer, two_models, tmp_path, monkeypatch):
    from kto_plugin.step import _logprobs

    calls = []
    original = _logprobs._per_token
    monkeypatch.setattr(_logprobs, "_per_token", lambda *a: calls.append(1) or original(*a))
    # humanline: the policy, its KL completions, the reference's target and KL completions (one pass: each prompt is
    # computed once, the rows not split by length)
    for loss_type, expected in (("kto", 0), ("bco", 0), ("humanline", 3)):
        kto, trainer = kto_trainer(copy.deepcopy(two_models[0]), task_tokenizer, kto_rows(), tmp_path,
                                   kto_kwargs={"loss_type": loss_type, "length_buckets": "off"})
        kto.attach(trainer)
        calls.clear()
        trainer.model.train()
        trainer.compute_loss(trainer.model, kto.collator(list(trainer.train_dataset)[:4]))
        assert len(calls) == expected, loss_type
