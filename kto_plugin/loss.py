"""KTO losses as pure functions of tensors: no model, no Trainer, no config.

Notation (KTO paper, Ethayarajh et al. 2024, eq. 7): for an example (x, y) with desirability label d,
``r = log pi(y|x) - log pi_ref(y|x)`` (summed over completion tokens) and ``z0`` the detached,
non-negative KL reference point estimated from mismatched pairs. Then

* desirable (d = True):    ``1 - sigmoid(beta * (r - z0))``
* undesirable (d = False): ``1 - sigmoid(beta * (z0 - r))``

Every function takes `(B,)` tensors and returns a `KTOLossOutput` whose `losses` keep batch order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class KTOLossOutput(NamedTuple):
    """Per-example losses and the detached rewards ``beta * r``."""

    losses: torch.Tensor  # (B,) unweighted, batch order
    chosen_rewards: torch.Tensor  # (n_desirable,) beta * r of desirable examples, detached
    rejected_rewards: torch.Tensor  # (n_undesirable,) beta * r of undesirable examples, detached
    kl: torch.Tensor  # () the reference point used (detached)


def implied_rewards(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """The implied reward ``beta * (log pi(y|x) - log pi_ref(y|x))`` of each example, detached: what is logged as
    ``rewards/*`` and what every loss's `KTOLossOutput` reports."""
    return beta * (policy_logps.detach() - reference_logps.detach())


def _rewards(policy_logps: torch.Tensor, reference_logps: torch.Tensor, labels: torch.Tensor, beta: float):
    rewards = implied_rewards(policy_logps, reference_logps, beta)
    return rewards[labels], rewards[~labels]


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
) -> KTOLossOutput:
    """KTO loss, paper eq. 7.

    Args:
        policy_logps: `(B,)` summed completion log-probs under the policy.
        reference_logps: `(B,)` the same under the reference.
        labels: `(B,)` bool, True for desirable.
        kl: `()` reference point z0 (detached here, whatever the caller passes).
        beta: reward scale.

    Worked case: beta = 1, r = [2, 2], labels = [True, False], z0 = 1 gives
    desirable ``1 - sigmoid(1) = 0.268941`` and undesirable ``1 - sigmoid(-1) = 0.731059``.
    """
    kl = kl.detach()
    logratios = policy_logps - reference_logps
    desirable = 1 - torch.sigmoid(beta * (logratios - kl))
    undesirable = 1 - torch.sigmoid(beta * (kl - logratios))
    losses = torch.where(labels, desirable, undesirable)
    return KTOLossOutput(losses, *_rewards(policy_logps, reference_logps, labels, beta), kl)


def apo_zero_unpaired_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
) -> KTOLossOutput:
    """Unpaired APO-zero (D'Oosterlinck et al. 2024, eq. 7 made unpaired): no reference point.

    desirable ``1 - sigmoid(beta * r)``, undesirable ``sigmoid(beta * r)``.
    Worked case: beta = 0.5, r = [2, 2], labels = [True, False] gives
    ``1 - sigmoid(1) = 0.268941`` and ``sigmoid(1) = 0.731059``.
    """
    logratios = policy_logps - reference_logps
    desirable = 1 - torch.sigmoid(beta * logratios)
    undesirable = torch.sigmoid(beta * logratios)
    losses = torch.where(labels, desirable, undesirable)
    return KTOLossOutput(losses, *_rewards(policy_logps, reference_logps, labels, beta), policy_logps.new_zeros(()))


def weighted_mean(
    losses: torch.Tensor, labels: torch.Tensor, desirable_weight: float, undesirable_weight: float
) -> torch.Tensor:
    """Mean over the batch of ``lambda_D * loss`` (desirable) and ``lambda_U * loss`` (undesirable).

    NaN losses are left out of the mean (as TRL's `nanmean`), so one bad example does not poison the step;
    the non-finite guard in the loss hook reports them.
    """
    weights = torch.where(
        labels,
        losses.new_tensor(desirable_weight),
        losses.new_tensor(undesirable_weight),
    )
    return (weights * losses).nanmean()


def kl_reference_point(
    policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local sum and count of the mismatched-pair log-ratios, for a weighted mean across processes.

    z0 = clamp(sum / count, min=0) once sums and counts are all-reduced (paper section 4.1: no gradient).
    """
    logratios = (policy_kl_logps - reference_kl_logps).detach().float()
    return logratios.sum(), logratios.new_tensor(float(logratios.numel()))
