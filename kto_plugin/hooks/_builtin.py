"""The built-in KTO family, each an ordinary plugin registered `trylast` so a third-party plugin wins.

* losses, selected by ``KTOConfig.loss_type`` (one small base, `FamilyLoss`): `kto`, `apo_zero_unpaired`, `bco`
  (a running mean it keeps, saved in checkpoints), `humanline` (`kto` on per-token clamped log-ratios);
* `SFTTerm`, the SFT term of ``KTOConfig.sft_weight``, added to any loss through `kto_loss_terms`;
* `RewardMetrics`, every run's reward accuracy and, at evaluation, the AUROC of the rewards.

The reference points (``KTOConfig.reference_point``) live with every other z0 estimator, in
`kto_plugin.step._reference_point`. The formulas and sources are in `kto_plugin.loss` and docs/losses.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import loss
from ..config import KTOConfig
from ..hookspecs import hookimpl
from ..step._metrics import auroc, reward_accuracy
from ..step._reference_point import EMAReferencePoint, PositiveMeanReferencePoint


class FamilyLoss:
    """A built-in loss: declares `name` (with `needs_kl`) and computes `losses` of the rows' log-ratios.

    Every built-in loss reads `log_ratios`, so `kto_log_ratios` and ``length_normalize`` apply to all of them, and
    returns a `KTOLossOutput` (its `kl`: the reference point it compared log-ratios with).
    """

    name = ""
    needs_kl = True

    @hookimpl(trylast=True)
    def kto_loss_types(self) -> dict[str, bool]:
        return {self.name: self.needs_kl}

    @hookimpl(trylast=True)
    def kto_loss(
        self,
        loss_type: str,
        log_ratios: torch.Tensor,
        kl: torch.Tensor,
        labels: torch.Tensor,
        config: KTOConfig,
        training: bool,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor],
    ) -> loss.KTOLossOutput | None:
        if loss_type != self.name:
            return None
        return self.losses(log_ratios, kl, labels, config, training, reduce_sum)

    def losses(self, log_ratios, kl, labels, config, training, reduce_sum) -> loss.KTOLossOutput:
        raise NotImplementedError


class KTOLoss(FamilyLoss):
    """`kto`: KTO paper eq. 7, with the KL reference point."""

    name = "kto"

    def losses(self, log_ratios, kl, labels, config, training, reduce_sum):
        return loss.kto_loss(log_ratios, torch.zeros_like(log_ratios), labels, kl, config.beta)


class APOZeroUnpairedLoss(FamilyLoss):
    """`apo_zero_unpaired`: the unpaired APO-zero loss; needs no KL pass."""

    name = "apo_zero_unpaired"
    needs_kl = False

    def losses(self, log_ratios, kl, labels, config, training, reduce_sum):
        return loss.apo_zero_unpaired_loss(log_ratios, torch.zeros_like(log_ratios), labels, config.beta)


class BCOLoss(FamilyLoss):
    """`bco`: `kto_plugin.loss.bco_loss` with ``delta`` the running mean of ``beta * r`` over training.

    The running mean is the sum and count of the rewards of every training row so far, over every process
    (`reduce_sum`), so every rank holds the same value. It is updated once per training micro-batch, before that
    micro-batch's loss (as the BCO paper's algorithm and TRL's former `BCOTrainer`): under gradient accumulation the
    k-th micro-batch of a window sees the rows of micro-batches 1..k. Evaluation reads it and never updates it;
    before any training step it is 0. Rows with a non-finite reward are left out. Saved in checkpoints
    (`kto_state_dict`), restored on resume; logged as ``bco/delta``.
    """

    name = "bco"
    needs_kl = False

    def __init__(self) -> None:
        self.reward_sum = 0.0  # sum of beta * r of every training row so far (float64, equal on every process)
        self.count = 0.0

    @property
    def delta(self) -> float:
        return self.reward_sum / self.count if self.count else 0.0

    def losses(self, log_ratios, kl, labels, config, training, reduce_sum):
        if training:
            rewards = config.beta * log_ratios.detach().float()
            finite = torch.isfinite(rewards)
            total = reduce_sum(torch.stack([rewards[finite].sum(), finite.sum().float()]))
            reward_sum, count = total.tolist()
            self.reward_sum += reward_sum
            self.count += count
        return loss.bco_loss(log_ratios, torch.zeros_like(log_ratios), labels, self.delta, config.beta)

    @hookimpl(trylast=True)
    def kto_metrics(self, config: KTOConfig) -> dict[str, float] | None:
        return {"bco/delta": self.delta} if config.loss_type == self.name else None

    @hookimpl(trylast=True)
    def kto_state_dict(self) -> dict[str, float] | None:
        return {"reward_sum": self.reward_sum, "count": self.count} if self.count else None

    @hookimpl(trylast=True)
    def kto_load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.reward_sum, self.count = float(state.get("reward_sum", 0.0)), float(state.get("count", 0.0))


class HumanlineLoss(KTOLoss):
    """`humanline`: KTO on humanline log-ratios (`kto_plugin.loss.humanline_log_ratios`), for the target rows and
    the KL pairs alike (as HALOs' ``humanline=true``), so z0 is estimated from clamped log-ratios too. Asks for
    per-token log-probs (`kto_inputs`) only when it is the configured loss."""

    name = "humanline"

    @hookimpl(trylast=True)
    def kto_inputs(self, config: KTOConfig) -> set[str] | None:
        return {"token_logps"} if config.loss_type == self.name else None

    @hookimpl(trylast=True)
    def kto_log_ratios(
        self, policy_token_logps: torch.Tensor | None, reference_token_logps: torch.Tensor | None, config: KTOConfig
    ) -> torch.Tensor | None:
        if config.loss_type != self.name:
            return None
        return loss.humanline_log_ratios(
            policy_token_logps, reference_token_logps, config.humanline_min_log_ratio, config.humanline_max_log_ratio
        )


class SFTTerm:
    """``sft_loss``: `kto_plugin.loss.sft_term` with ``KTOConfig.sft_weight``, added to any loss (0: off)."""

    name = "sft_term"

    @hookimpl(trylast=True)
    def kto_loss_terms(
        self, policy_logps: torch.Tensor, num_tokens: torch.Tensor, labels: torch.Tensor, config: KTOConfig
    ) -> dict[str, torch.Tensor] | None:
        if not config.sft_weight:
            return None
        return {"sft_loss": loss.sft_term(policy_logps, num_tokens, labels, config.sft_weight)}


class RewardMetrics:
    """``rewards/accuracy`` (every micro-batch: the share of rows on the right side of the reference point the loss
    used) and ``rewards/auroc`` (once per evaluation, over every process's rows: how well the implied reward
    ``beta * r`` ranks desirable above undesirable rows; not logged when the evaluation saw one label only)."""

    name = "reward_metrics"

    def __init__(self) -> None:
        self._evaluation: list[tuple[torch.Tensor, torch.Tensor]] = []  # (log-ratios, labels) of this evaluation

    @hookimpl(trylast=True)
    def kto_metrics(
        self, log_ratios: torch.Tensor, reference_point: torch.Tensor, labels: torch.Tensor, training: bool
    ) -> dict[str, torch.Tensor]:
        if not training:
            self._evaluation.append((log_ratios.float().cpu(), labels.cpu()))
        return {"rewards/accuracy": reward_accuracy(log_ratios, labels, reference_point)}

    @hookimpl(trylast=True)
    def kto_evaluation_metrics(self, gather: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        seen, self._evaluation = self._evaluation, []
        scores = torch.cat([s for s, _ in seen]) if seen else torch.zeros(0)
        labels = torch.cat([lab for _, lab in seen]) if seen else torch.zeros(0, dtype=torch.bool)
        value = auroc(gather(scores), gather(labels))  # AUROC is the same for r and beta * r (beta > 0)
        return {} if value is None else {"rewards/auroc": value}


BUILTIN_PLUGINS = (
    KTOLoss, APOZeroUnpairedLoss, BCOLoss, HumanlineLoss, PositiveMeanReferencePoint, EMAReferencePoint, SFTTerm,
    RewardMetrics,
)
