"""kto_plugin.loss: hand-worked cases, the paper's invariants, and parity with the slow reference."""

from __future__ import annotations

import math

import pytest
import torch

from kto_plugin.loss import apo_zero_unpaired_loss, kl_reference_point, kto_loss, weighted_mean
from reference_impl import (
    naive_apo_zero_unpaired_losses,
    naive_kto_losses,
    naive_weighted_mean,
    naive_z0,
)

SIG1 = 1 / (1 + math.exp(-1))  # sigmoid(1) = 0.7310585786...


def test_kto_hand_worked():
    # beta=1, r = 2 - 0 = 2 for both, z0 = 1: desirable 1 - sigmoid(2 - 1), undesirable 1 - sigmoid(1 - 2)
    out = kto_loss(torch.tensor([2.0, 2.0]), torch.zeros(2), torch.tensor([True, False]), torch.tensor(1.0), beta=1.0)
    assert out.losses.tolist() == pytest.approx([1 - SIG1, SIG1])
    assert out.chosen_rewards.tolist() == pytest.approx([2.0])
    assert out.rejected_rewards.tolist() == pytest.approx([2.0])


def test_apo_zero_hand_worked():
    # beta=0.5, r=2: desirable 1 - sigmoid(1), undesirable sigmoid(1)
    out = apo_zero_unpaired_loss(torch.tensor([2.0, 2.0]), torch.zeros(2), torch.tensor([True, False]), beta=0.5)
    assert out.losses.tolist() == pytest.approx([1 - SIG1, SIG1])
    assert out.kl.item() == 0.0


@pytest.mark.parametrize("fn", ["kto", "apo"])
def test_loss_is_half_at_initialisation(fn):
    # policy == reference: r = 0, z0 = 0, so every loss is 1 - sigmoid(0) = 0.5 (paper, section 4)
    logps = torch.randn(6) * 50
    labels = torch.tensor([True, False, True, True, False, False])
    if fn == "kto":
        out = kto_loss(logps, logps.clone(), labels, torch.tensor(0.0), beta=0.1)
    else:
        out = apo_zero_unpaired_loss(logps, logps.clone(), labels, beta=0.1)
    assert torch.allclose(out.losses, torch.full((6,), 0.5))
    assert weighted_mean(out.losses, labels, 2.0, 0.5).item() == pytest.approx((3 * 2.0 + 3 * 0.5) * 0.5 / 6)


def test_contradicting_pair_is_stationary():
    # Theorem 4.3: the same (x, y) labelled desirable and undesirable gives total loss 1/2 and no gradient
    # both examples are the same log pi(y|x), so the policy is one scalar used twice
    logp = torch.tensor(3.7, requires_grad=True)
    reference = torch.tensor([1.2, 1.2])
    labels = torch.tensor([True, False])
    out = kto_loss(logp.expand(2), reference, labels, torch.tensor(0.4), beta=0.3)
    loss = weighted_mean(out.losses, labels, 1.0, 1.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.5)
    assert abs(logp.grad.item()) < 1e-7


CASES = {
    "mixed": [True, False, True, False, False, True, True],
    "all_desirable": [True] * 5,
    "all_undesirable": [False] * 5,
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_kto_matches_reference_values_and_grads(case, beta):
    labels = torch.tensor(CASES[case])
    policy = (torch.randn(len(labels)) * 20).requires_grad_()
    reference = (policy.detach() + torch.randn(len(labels)) * 3).requires_grad_()
    kl = torch.tensor(0.7, requires_grad=True)
    ours = weighted_mean(kto_loss(policy, reference, labels, kl, beta).losses, labels, 1.3, 0.8)
    g_ours = torch.autograd.grad(ours, [policy, reference])

    policy2, reference2 = policy.detach().clone().requires_grad_(), reference.detach().clone().requires_grad_()
    naive = naive_weighted_mean(naive_kto_losses(policy2, reference2, labels, kl.detach(), beta), labels, 1.3, 0.8)
    g_naive = torch.autograd.grad(naive, [policy2, reference2])
    assert ours.item() == pytest.approx(naive.item(), rel=1e-6)
    for a, b in zip(g_ours, g_naive):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)
    # z0 carries no gradient (paper: "we do not back-propagate through the KL term")
    assert torch.autograd.grad(ours, kl, allow_unused=True)[0] is None


@pytest.mark.parametrize("case", list(CASES))
def test_apo_zero_matches_reference(case):
    labels = torch.tensor(CASES[case])
    policy = (torch.randn(len(labels)) * 20).requires_grad_()
    reference = policy.detach() + torch.randn(len(labels)) * 3
    ours = weighted_mean(apo_zero_unpaired_loss(policy, reference, labels, 0.5).losses, labels, 1.0, 1.0)
    (g_ours,) = torch.autograd.grad(ours, [policy])
    policy2 = policy.detach().clone().requires_grad_()
    naive = naive_weighted_mean(naive_apo_zero_unpaired_losses(policy2, reference, labels, 0.5), labels, 1.0, 1.0)
    (g_naive,) = torch.autograd.grad(naive, [policy2])
    assert ours.item() == pytest.approx(naive.item(), rel=1e-6)
    assert torch.allclose(g_ours, g_naive, rtol=1e-5, atol=1e-8)


def test_kto_gradient_weight_formula():
    # eq. 9: d loss / d r = -lambda_D * beta * sigmoid(z) sigmoid(-z), z = beta (r - z0), for a desirable example
    beta, z0 = 0.5, 0.3
    policy = torch.tensor([1.7], requires_grad=True)
    loss = kto_loss(policy, torch.zeros(1), torch.tensor([True]), torch.tensor(z0), beta).losses.sum()
    loss.backward()
    z = beta * (1.7 - z0)
    s = 1 / (1 + math.exp(-z))
    assert policy.grad.item() == pytest.approx(-beta * s * (1 - s), rel=1e-6)


def test_weighted_mean_skips_nan_and_weights():
    losses = torch.tensor([0.2, float("nan"), 0.6])
    labels = torch.tensor([True, True, False])
    # nanmean over the two finite weighted losses: (2 * 0.2 + 0.5 * 0.6) / 2
    assert weighted_mean(losses, labels, 2.0, 0.5).item() == pytest.approx((0.4 + 0.3) / 2)


def test_reference_point_sum_and_count():
    p = torch.tensor([-10.0, -12.0, -9.0])
    r = torch.tensor([-11.0, -11.5, -9.5])
    total, count = kl_reference_point(p, r)
    assert count.item() == 3
    assert max(0.0, total.item() / count.item()) == pytest.approx(naive_z0(p, r))
