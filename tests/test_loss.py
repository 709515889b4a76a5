"""kto_plugin.loss: hand-worked cases, the paper's invariants, and parity with the slow reference."""

from __future__ import annotations

import math

import pytest
import torch

from kto_plugin.loss import (
    apo_zero_unpaired_loss,
    bco_loss,
    humanline_log_ratios,
    kl_reference_point,
    kto_loss,
    length_normalized,
    reference_point_sums,
    sft_term,
    weighted_mean,
)
from kto_plugin.step._metrics import auroc, reward_accuracy
from reference_impl import (
    naive_apo_zero_unpaired_losses,
    naive_auroc,
    naive_bco_losses,
    naive_kto_losses,
    naive_log_ratio,
    naive_positive_mean,
    naive_reward_accuracy,
    naive_sft_term,
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


# --- the KTO family: hand-worked cases (the arithmetic is in each function's docstring) ---


def test_bco_hand_worked():
    # beta=1, r=2, delta=1: desirable -log sigmoid(1) = log(1 + e^-1), undesirable -log sigmoid(-1) = log(1 + e)
    out = bco_loss(torch.tensor([2.0, 2.0]), torch.zeros(2), torch.tensor([True, False]), 1.0, beta=1.0)
    assert out.losses.tolist() == pytest.approx([math.log(1 + math.exp(-1)), math.log(1 + math.e)])
    assert out.kl.item() == pytest.approx(1.0)  # delta / beta, the reference point in log-ratio units
    # at initialisation (r = 0, delta = 0) every row's loss is log 2
    assert bco_loss(torch.zeros(3), torch.zeros(3), torch.tensor([True, False, True]), 0.0, 0.1).losses.tolist() == (
        pytest.approx([math.log(2)] * 3)
    )


def test_humanline_hand_worked():
    policy = torch.tensor([[0.5, 2.0, -3.0], [0.2, 0.0, 0.0]], requires_grad=True)
    r = humanline_log_ratios(policy, torch.zeros(2, 3))
    assert r.tolist() == pytest.approx([1.0, 0.2])
    r.sum().backward()
    assert policy.grad.tolist() == [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]  # a clamped token carries no gradient


def test_length_normalized_and_sums_hand_worked():
    assert length_normalized(torch.tensor([6.0, -3.0]), torch.tensor([3.0, 0.0])).tolist() == [2.0, -3.0]
    ratios = torch.tensor([-1.0, 2.0, 4.0, 0.0])
    assert [t.item() for t in reference_point_sums(ratios)] == [5.0, 4.0]
    assert [t.item() for t in reference_point_sums(ratios, positive_only=True)] == [6.0, 2.0]
    assert [t.item() for t in reference_point_sums(torch.tensor([-1.0, 0.0]), positive_only=True)] == [0.0, 0.0]


def test_sft_term_hand_worked():
    term = sft_term(torch.tensor([-6.0, -10.0, -3.0]), torch.tensor([3.0, 5.0, 2.0]),
                    torch.tensor([True, False, True]), 0.5)
    assert term.item() == pytest.approx(0.875)
    policy = torch.tensor([-6.0, -10.0], requires_grad=True)
    none = sft_term(policy, torch.tensor([3.0, 5.0]), torch.tensor([False, False]), 0.5)
    none.backward()
    assert none.item() == 0.0 and policy.grad.tolist() == [0.0, 0.0]


def test_reward_accuracy_and_auroc_hand_worked():
    labels = torch.tensor([True, False, True, False])
    assert reward_accuracy(torch.tensor([2.0, -1.0, 0.5, 3.0]), labels, torch.tensor(1.0)).item() == 0.5
    assert reward_accuracy(torch.zeros(4), labels, torch.tensor(0.0)).item() == 0.0  # a tie is wrong
    assert auroc(torch.tensor([0.9, 0.1, 0.4, 0.4]), labels) == pytest.approx(0.875)
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([True, True])) is None


# --- the KTO family against the slow references (values and gradients) ---


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("delta", [0.0, -0.4])
def test_bco_matches_reference_values_and_grads(case, delta):
    labels = torch.tensor(CASES[case])
    policy = (torch.randn(len(labels)) * 20).requires_grad_()
    reference = policy.detach() + torch.randn(len(labels)) * 3
    ours = weighted_mean(bco_loss(policy, reference, labels, delta, 0.3).losses, labels, 1.3, 0.8)
    (g_ours,) = torch.autograd.grad(ours, [policy])
    policy2 = policy.detach().clone().requires_grad_()
    naive = naive_weighted_mean(naive_bco_losses(policy2 - reference, labels, delta, 0.3), labels, 1.3, 0.8)
    (g_naive,) = torch.autograd.grad(naive, [policy2])
    assert ours.item() == pytest.approx(naive.item(), rel=1e-5)
    assert torch.allclose(g_ours, g_naive, atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_humanline_and_length_normalized_match_reference_values_and_grads(normalize):
    torch.manual_seed(4)
    lengths = [3, 5, 1, 4]
    policy = torch.zeros(4, 6)
    reference = torch.zeros(4, 6)
    for i, n in enumerate(lengths):  # token ratios spread across [-2, 2]: some clamped, some not
        reference[i, 1 : 1 + n] = torch.randn(n) * 3 - 20
        policy[i, 1 : 1 + n] = reference[i, 1 : 1 + n] + torch.linspace(-2, 2, n) + torch.randn(n) * 0.1
    policy.requires_grad_()
    ours = humanline_log_ratios(policy, reference)
    if normalize:
        ours = length_normalized(ours, torch.tensor(lengths, dtype=torch.float32))
    (g_ours,) = torch.autograd.grad(ours.sum(), [policy])
    policy2 = policy.detach().clone().requires_grad_()
    naive = torch.stack([
        naive_log_ratio(policy2[i, 1 : 1 + n], reference[i, 1 : 1 + n], clamp=(-1.0, 1.5), normalize=normalize)
        for i, n in enumerate(lengths)
    ])
    (g_naive,) = torch.autograd.grad(naive.sum(), [policy2])
    completion = torch.zeros(4, 6, dtype=torch.bool)
    for i, n in enumerate(lengths):
        completion[i, 1 : 1 + n] = True
    assert torch.allclose(ours, naive, atol=1e-5)
    # off the completion the inputs are 0 (built by index_put, which passes no gradient there): compare the rest
    assert torch.equal(g_ours[completion], g_naive[completion])
    assert 0 < (g_ours[completion] != 0).sum() < sum(lengths)  # both clamped and unclamped tokens in the case


def test_reference_points_accuracy_and_auroc_match_references():
    torch.manual_seed(5)
    ratios = torch.randn(50) * 2
    total, count = reference_point_sums(ratios, positive_only=True)
    assert (total / count).item() == pytest.approx(naive_positive_mean(ratios), rel=1e-6)
    labels = torch.rand(50) > 0.4
    assert reward_accuracy(ratios, labels, torch.tensor(0.3)).item() == pytest.approx(
        naive_reward_accuracy(ratios, labels, 0.3)
    )
    scores = torch.randint(0, 6, (50,)).float()  # many ties
    assert auroc(scores, labels) == pytest.approx(naive_auroc(scores, labels))


@pytest.mark.parametrize("case", list(CASES))
def test_sft_term_matches_reference_values_and_grads(case):
    labels = torch.tensor(CASES[case])
    policy = (torch.randn(len(labels)) * 20 - 40).requires_grad_()
    num_tokens = torch.randint(1, 30, (len(labels),)).float()
    ours = sft_term(policy, num_tokens, labels, 0.7)
    (g_ours,) = torch.autograd.grad(ours, [policy])
    policy2 = policy.detach().clone().requires_grad_()
    naive = naive_sft_term(policy2, num_tokens, labels, 0.7)
    (g_naive,) = torch.autograd.grad(naive, [policy2])
    assert ours.item() == pytest.approx(naive.item(), rel=1e-6, abs=1e-7)
    assert torch.allclose(g_ours, g_naive, atol=1e-7)
