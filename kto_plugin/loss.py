"""KTO losses as pure functions of tensors: no model, no Trainer, no config.

Notation (KTO paper, Ethayarajh et al. 2024, eq. 7): for an example (x, y) with desirability label d,
``r = log pi(y|x) - log pi_ref(y|x)`` (summed over completion tokens) and ``z0`` the detached,
non-negative KL reference point estimated from mismatched pairs. Then

* desirable (d = True):    ``1 - sigmoid(beta * (r - z0))``
* undesirable (d = False): ``1 - sigmoid(beta * (z0 - r))``

Every loss takes `(B,)` tensors and returns a `KTOLossOutput` whose `losses` keep batch order. The family's other
pieces are here too, as pure functions: BCO's loss, humanline's clamped log-ratios, length normalisation, the
reference points (mean and mean over positive log-ratios) and the SFT term. `docs/losses.md` has the table.
A loss of a log-ratio ``r`` computed elsewhere (humanline, length-normalised) is the same function called with
``policy_logps=r`` and ``reference_logps=0``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class KTOLossOutput(NamedTuple):
    """Per-example losses and the detached rewards ``beta * r``."""

    losses: torch.Tensor  # (B,) unweighted, batch order
    chosen_rewards: torch.Tensor  # (n_desirable,) beta * r of desirable examples, detached
    rejected_rewards: torch.Tensor  # (n_undesirable,) beta * r of undesirable examples, detached
    kl: torch.Tensor  # () the reference point used, in log-ratio units (z0; BCO's delta / beta; 0), detached


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


def bco_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    labels: torch.Tensor,
    delta: torch.Tensor | float,
    beta: float,
) -> KTOLossOutput:
    """Binary classifier optimisation (Jung et al. 2024, arXiv 2404.04656, eq. 6 and section 4.1), without the
    density-ratio reweighting: the implied reward ``beta * r`` is the logit of a classifier of desirability,
    shifted by ``delta``, the running mean of ``beta * r`` over training (the caller keeps it).

    desirable ``-log sigmoid(beta * r - delta)``, undesirable ``-log sigmoid(-(beta * r - delta))``.
    Its `kl` is the reference point in log-ratio units, ``delta / beta``.

    Worked case: beta = 1, r = [2, 2], labels = [True, False], delta = 1 gives
    desirable ``-log sigmoid(1) = log(1 + e^-1) = 0.313262`` and undesirable ``-log sigmoid(-1) = 1.313262``.
    """
    delta = torch.as_tensor(delta, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    logits = beta * (policy_logps - reference_logps) - delta
    losses = -torch.nn.functional.logsigmoid(torch.where(labels, logits, -logits))
    return KTOLossOutput(losses, *_rewards(policy_logps, reference_logps, labels, beta), delta / beta)


def humanline_log_ratios(
    policy_token_logps: torch.Tensor, reference_token_logps: torch.Tensor, low: float = -1.0, high: float = 1.5
) -> torch.Tensor:
    """Humanline log-ratios (Liu et al. 2025, "Humanline", arXiv 2509.24207; HALOs ``humanline``,
    ``log_epsilon_P=-1.0``, ``log_epsilon_R=1.5``): each token's log-ratio clamped to ``[low, high]``, then summed.

    ``r = sum_t clamp(log pi(y_t|x, y_<t) - log pi_ref(y_t|x, y_<t), low, high)``; a clamped token carries no
    gradient. Inputs (B, T), 0 off the completion (so those tokens add 0); output (B,).

    Worked case: token log-ratios [[0.5, 2.0, -3.0], [0.2, 0.0, 0.0]] clamp to [[0.5, 1.5, -1.0], [0.2, 0, 0]]
    and sum to [1.0, 0.2].
    """
    return (policy_token_logps - reference_token_logps).clamp(low, high).sum(-1)


def length_normalized(log_ratios: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """Average rather than summed log-ratio: ``r / |y|`` (an empty completion divides by 1).

    Worked case: r = [6, -3], |y| = [3, 0] gives [2, -3].
    """
    return log_ratios / num_tokens.to(log_ratios.dtype).clamp(min=1)


def reference_point_sums(log_ratios: torch.Tensor, positive_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Local sum and count of the mismatched pairs' log-ratios (all, or only the positive ones), detached, for a
    weighted mean across processes: z0 = sum / count once sums and counts are all-reduced.

    Worked case: log-ratios [-1, 2, 4, 0] give (5, 4) (the KTO paper's mean, 1.25, then clamped at 0) and with
    `positive_only` (6, 2) (mean 3).
    """
    logratios = log_ratios.detach().float()
    if positive_only:
        logratios = logratios[logratios > 0]
    return logratios.sum(), logratios.new_tensor(float(logratios.numel()))


def kl_reference_point(
    policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local sum and count of the mismatched-pair log-ratios, for a weighted mean across processes.

    z0 = clamp(sum / count, min=0) once sums and counts are all-reduced (paper section 4.1: no gradient).
    """
    return reference_point_sums(policy_kl_logps - reference_kl_logps)


def sft_term(
    policy_logps: torch.Tensor, num_tokens: torch.Tensor, labels: torch.Tensor, weight: float
) -> torch.Tensor:
    """An SFT term on the desirable rows (LLaMA-Factory ``pref_ftx``): ``weight * mean over desirable rows of
    -log pi(y|x) / |y|``, the per-token negative log-likelihood; 0 (with a gradient of 0) without desirable rows.

    Worked case: log pi = [-6, -10, -3], |y| = [3, 5, 2], labels = [True, False, True], weight 0.5:
    the desirable rows' NLL per token is [2, 1.5], their mean 1.75, the term 0.875.
    """
    nll = -policy_logps / num_tokens.to(policy_logps.dtype).clamp(min=1)
    desirable = labels.to(policy_logps.dtype)
    return weight * (nll * desirable).sum() / desirable.sum().clamp(min=1)
