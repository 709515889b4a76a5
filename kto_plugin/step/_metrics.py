"""Metrics: accumulated per micro-batch inside the loss call, averaged over the logging interval, logged by a callback.

Names and meaning follow TRL 1.16's `KTOTrainer`, so dashboards carry over. Each value is a mean over the
micro-batches of the logging interval of a per-micro-batch value that was already reduced across processes.
Memory is one running sum and count per name, however long the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

# Every metric the step logs, as a mean of per-micro-batch values: name -> (sum, count) over the micro-batch,
# both all-reduced across processes before the division. TRL 1.16's names, so dashboards carry over.
RATIOS: dict[str, tuple[str, str]] = {
    "rewards/chosen": ("reward_chosen", "n_chosen"),
    "rewards/rejected": ("reward_rejected", "n_rejected"),
    "logps/chosen": ("logps_chosen", "n_chosen"),
    "logps/rejected": ("logps_rejected", "n_rejected"),
    "logits/chosen": ("logit_chosen", "tokens_chosen"),
    "logits/rejected": ("logit_rejected", "tokens_rejected"),
    "entropy": ("entropy", "tokens"),
}
# logged otherwise: z0 as used, the reward margin, the running count of input tokens, the MoE router's aux loss
OTHER_NAMES = ("kl", "rewards/margins", "num_tokens", "aux_loss")
# logged by the built-in plugins of the KTO family (`kto_plugin.hooks`, `kto_plugin.step._reference_point`):
# every run's reward accuracy and, at evaluation, AUROC; BCO's delta; the SFT term (`sft_weight`)
FAMILY_NAMES = ("rewards/accuracy", "rewards/auroc", "bco/delta", "sft_loss")
KTO_METRIC_NAMES = (*RATIOS, *OTHER_NAMES, *FAMILY_NAMES)
# what the stock Trainer logs itself
TRAINER_METRIC_NAMES = (
    "loss", "grad_norm", "learning_rate", "epoch", "step", "runtime", "samples_per_second", "steps_per_second",
    "total_flos", "train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second",
)
# a plugin metric of one of these names would be averaged with, or overwrite, the built-in value
RESERVED_METRIC_NAMES = frozenset(KTO_METRIC_NAMES + TRAINER_METRIC_NAMES)
# the per-micro-batch sums, all-reduced in one call (plus "input_tokens" and the non-finite count)
SUM_KEYS = tuple(dict.fromkeys(key for pair in RATIOS.values() for key in pair)) + ("input_tokens", "nonfinite")


def micro_batch_sums(
    logps: torch.Tensor,
    rewards: torch.Tensor,
    label: torch.Tensor,
    num_tokens: torch.Tensor,
    entropy_sum: torch.Tensor,
    mean_logit_sum: torch.Tensor,
    input_tokens: torch.Tensor,
    nonfinite: torch.Tensor,
) -> torch.Tensor:
    """The `SUM_KEYS` of one micro-batch as one float tensor (NaN rewards/log-probs left out of their sums)."""
    chosen, rejected = label, ~label
    values = {
        "reward_chosen": rewards[chosen].nansum(),
        "n_chosen": chosen.sum(),
        "reward_rejected": rewards[rejected].nansum(),
        "n_rejected": rejected.sum(),
        "logps_chosen": logps[chosen].nansum(),
        "logps_rejected": logps[rejected].nansum(),
        "logit_chosen": mean_logit_sum[chosen].sum(),
        "tokens_chosen": num_tokens[chosen].sum(),
        "logit_rejected": mean_logit_sum[rejected].sum(),
        "tokens_rejected": num_tokens[rejected].sum(),
        "entropy": entropy_sum.sum(),
        "tokens": num_tokens.sum(),
        "input_tokens": input_tokens.sum(),
        "nonfinite": nonfinite,
    }
    return torch.stack([values[k].float().to(logps.device) for k in SUM_KEYS])


def reward_accuracy(log_ratios: torch.Tensor, labels: torch.Tensor, reference_point: torch.Tensor) -> torch.Tensor:
    """() fraction of rows on the right side of the reference point: desirable rows with ``r > z0``, undesirable
    rows with ``r < z0`` (equivalently their reward ``beta * r`` above or below ``beta * z0``; a tie is wrong).

    Worked case: r = [2, -1, 0.5, 3], labels = [True, False, True, False], z0 = 1: rows 0 and 1 are right, 2 and 3
    wrong: 0.5.
    """
    reference_point = reference_point.to(log_ratios.device)
    right = torch.where(labels, log_ratios > reference_point, log_ratios < reference_point)
    return right.float().mean() if right.numel() else log_ratios.new_zeros(())


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Area under the ROC curve of `scores` (B,) against the bool `labels` (B,): the probability that a random
    desirable row scores above a random undesirable one, ties counting one half (Mann-Whitney U / (n+ n-)).
    None when either label is absent.

    Worked case: scores [0.9, 0.1, 0.4, 0.4], labels [True, False, True, False]: of the 4 (desirable,
    undesirable) pairs, 0.9 beats both, 0.4 beats 0.1 and ties 0.4: (3 + 0.5) / 4 = 0.875.
    """
    scores, labels = scores.detach().double().cpu(), labels.bool().cpu()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    # average ranks (1-based) of tied scores
    _, group, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = ((ends - counts + 1 + ends) / 2)[group]
    u = ranks[labels].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def record_micro_batch(
    accumulator: MetricsAccumulator, mode: str, sums: Mapping[str, float], kl: float, extra: Mapping[str, float]
) -> None:
    """Adds one micro-batch's metrics (from `sums` reduced over processes, and plugin metrics averaged over them)."""
    accumulator.add(mode, "kl", kl)
    for name, (total, count) in RATIOS.items():
        if sums[count] > 0:
            accumulator.add(mode, name, sums[total] / sums[count])
        elif name == "entropy":
            accumulator.add(mode, name, 0.0)  # TRL logs 0 for a batch without completion tokens
    if sums["n_chosen"] > 0 and sums["n_rejected"] > 0:
        accumulator.add(
            mode,
            "rewards/margins",
            sums["reward_chosen"] / sums["n_chosen"] - sums["reward_rejected"] / sums["n_rejected"],
        )
    for key, value in extra.items():
        accumulator.add(mode, key, value)


class MetricsAccumulator:
    """Running sums and counts of per-micro-batch values, per mode ("train" / "eval")."""

    def __init__(self) -> None:
        self._sums: dict[str, dict[str, float]] = {"train": {}, "eval": {}}
        self._counts: dict[str, dict[str, int]] = {"train": {}, "eval": {}}
        self._latest: dict[str, dict[str, float]] = {"train": {}, "eval": {}}
        self.total_train_tokens = 0.0  # input tokens of every training micro-batch so far (logged as num_tokens)

    def add(self, mode: str, name: str, value: float) -> None:
        self._sums[mode][name] = self._sums[mode].get(name, 0.0) + float(value)
        self._counts[mode][name] = self._counts[mode].get(name, 0) + 1

    def set_latest(self, mode: str, name: str, value: float) -> None:
        """A value logged as it is at log time, not averaged (e.g. a running token count)."""
        self._latest[mode][name] = float(value)

    def pop(self, mode: str) -> dict[str, float]:
        """The interval means since the last pop, then reset."""
        out = {name: total / self._counts[mode][name] for name, total in self._sums[mode].items()}
        out.update(self._latest[mode])
        self._sums[mode].clear()
        self._counts[mode].clear()
        self._latest[mode].clear()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self._sums, "counts": self._counts, "latest": self._latest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sums, self._counts, self._latest = state["sums"], state["counts"], state["latest"]
