"""z0, the KTO reference point (paper section 4.1): every way it is estimated, in one place.

* default (``reference_point="mean"``): ``clamp(sum(r_kl) / count, min=0)`` over the mismatched pairs' log-ratios
  ``r_kl`` (`kto_plugin.step._log_ratios`: ``policy_kl - reference_kl`` unless humanline or ``length_normalize``
  redefine them) of the micro-batch, the sum and count all-reduced across processes before the division (a rank
  with fewer pairs weighs less): `mean_reference_point`;
* ``reference_point="positive_mean"``: the same over the pairs with a positive log-ratio only
  (`PositiveMeanReferencePoint`, a built-in plugin);
* ``reference_point="ema"``: an exponential moving average of the default estimate across steps
  (`EMAReferencePoint`, a built-in plugin whose state is saved in checkpoints);
* a plugin's `kto_reference_point` estimate (detached, averaged across processes, not clamped);
* ``kl_estimate="window"``: any of these over every micro-batch of the gradient-accumulation window, computed
  once before the window's first micro-batch (`start_window`, called from the wrapped `get_batch_samples`);
* loss types that declared ``needs_kl=False``: 0.

z0 is detached: it carries no gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..config import KTOConfig
from ..hookspecs import hookimpl
from ..loss import reference_point_sums
from ._collectives import reduce_sum
from ._logprobs import completion_token_counts

if TYPE_CHECKING:
    from ..hooks import KTOPluginManager
    from ._log_ratios import LogRatios
    from ._logprobs import SequenceLogps
    from ._passes import ReferenceLogps


def rows_of(labels: Mapping[str, Any], mask: torch.Tensor) -> list[int]:
    """Row indices (the ``row_index`` column, else positions in the micro-batch) where `mask` is True."""
    positions = mask.nonzero().flatten()
    if "row_index" in labels:
        return labels["row_index"].to(positions.device)[positions].tolist()
    return positions.tolist()


def mean_reference_point(
    kl_log_ratios: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor], positive_only: bool = False
) -> torch.Tensor:
    """``clamp(sum / count, min=0)`` of the pairs' log-ratios (only the positive ones with `positive_only`), the sum
    and count summed over processes by `reduce` first; 0 without pairs."""
    stats = reduce(torch.stack(reference_point_sums(kl_log_ratios, positive_only)))
    return (stats[0] / stats[1].clamp(min=1)).clamp(min=0)


class PositiveMeanReferencePoint:
    """``reference_point="positive_mean"``: z0 is the mean over the mismatched pairs whose log-ratio is positive
    (sum and count over every process), 0 when none is. It ignores the pairs the policy finds less likely than
    the reference, which pull the plain mean towards (and, clamped, to) 0."""

    name = "positive_mean"

    @hookimpl(trylast=True)
    def kto_reference_point(
        self, kl_log_ratios: torch.Tensor, config: KTOConfig, reduce_sum: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor | None:
        if config.reference_point != self.name:
            return None
        return mean_reference_point(kl_log_ratios, reduce_sum, positive_only=True)


class EMAReferencePoint:
    """``reference_point="ema"``: ``z0_t = decay * z0_{t-1} + (1 - decay) * m_t``, ``m_t`` the default estimate
    (`mean_reference_point`), ``z0_1 = m_1``.

    Updated each time z0 is estimated in training: once per micro-batch, or once per optimizer step with
    ``kl_estimate="window"``. Evaluation reads it and never updates it (before any training step it uses the
    micro-batch's own estimate). `m_t` is reduced over processes first, so every rank holds the same value. A
    non-finite estimate is passed on (the non-finite guard reports it) without entering the average. Kept in
    float64, saved in checkpoints (`kto_state_dict`) and restored on resume.
    """

    name = "ema"

    def __init__(self) -> None:
        self.value: float | None = None

    @hookimpl(trylast=True)
    def kto_reference_point(
        self,
        kl_log_ratios: torch.Tensor,
        config: KTOConfig,
        training: bool,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor | None:
        if config.reference_point != self.name:
            return None
        estimate = mean_reference_point(kl_log_ratios, reduce_sum)
        if not torch.isfinite(estimate):
            return estimate  # reported by the non-finite guard; it does not enter the average
        if not training:
            return estimate if self.value is None else estimate.new_tensor(self.value)
        decay = config.reference_point_ema_decay
        m = estimate.item()
        self.value = m if self.value is None else decay * self.value + (1 - decay) * m
        return estimate.new_tensor(self.value)

    @hookimpl(trylast=True)
    def kto_state_dict(self) -> dict[str, float] | None:
        return None if self.value is None else {"value": self.value}

    @hookimpl(trylast=True)
    def kto_load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.value = None if not state else float(state["value"])


class ReferencePoint:
    """Estimates z0 for each micro-batch; holds the window's value and the rows of non-finite KL pairs."""

    def __init__(self, config: KTOConfig, plugins: KTOPluginManager, needs_kl: bool, log_ratios: LogRatios) -> None:
        self.config = config
        self.plugins = plugins
        self.needs_kl = needs_kl
        self.log_ratios = log_ratios
        self.window: torch.Tensor | None = None  # z0 of the current accumulation window (kl_estimate="window")
        self.nonfinite_rows: list[int] = []  # rows whose KL pair was not finite, in the last estimate

    def uses_window(self, mode: str) -> bool:
        """Whether this micro-batch takes the window's z0 (so it runs no KL pass of its own)."""
        return self.needs_kl and mode == "train" and self.window is not None

    def for_micro_batch(
        self,
        accelerator: Any,
        mode: str,
        policy_kl: SequenceLogps | None,
        reference: ReferenceLogps,
        labels: Mapping[str, Any],
        like: torch.Tensor,
    ) -> torch.Tensor:
        """z0 for this micro-batch: the window's, 0 without a KL term, else estimated from its KL pairs.
        `like`: a tensor on the device z0 should be on."""
        if self.uses_window(mode):
            return self.window.to(like.device)
        if not self.needs_kl:
            return like.new_zeros(())
        return self.estimate(accelerator, mode == "train", *self._pairs(policy_kl, reference, labels), labels)

    def _pairs(
        self, policy_kl: SequenceLogps, reference: ReferenceLogps, labels: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(policy log-probs, reference log-probs, log-ratios, token counts) of one micro-batch's KL pairs."""
        num_tokens = completion_token_counts(labels["kl_completion_labels"], self.config.label_pad_token_id)
        ratios = self.log_ratios(policy_kl.logps, reference.kl, num_tokens.to(reference.kl.device),
                                 policy_kl.token_logps, reference.kl_tokens)
        return policy_kl.logps.float(), reference.kl.float(), ratios.float(), num_tokens

    def estimate(
        self,
        accelerator: Any,
        training: bool,
        policy_kl: torch.Tensor,
        reference_kl: torch.Tensor,
        kl_log_ratios: torch.Tensor,
        kl_num_tokens: torch.Tensor,
        labels: Mapping[str, Any],
    ) -> torch.Tensor:
        """z0 from the mismatched pairs (B,) of this process and every other (one collective, or a plugin's)."""
        self.nonfinite_rows = rows_of(labels, ~torch.isfinite(kl_log_ratios))
        reduce = reduce_sum(accelerator)
        custom = self.plugins.reference_point(
            policy_kl_logps=policy_kl, reference_kl_logps=reference_kl, config=self.config,
            kl_log_ratios=kl_log_ratios, kl_num_tokens=kl_num_tokens, training=training, reduce_sum=reduce,
        )
        if custom is None:
            return mean_reference_point(kl_log_ratios, reduce)
        value = custom.detach().float().reshape(1).to(kl_log_ratios.device)
        if accelerator.num_processes > 1:
            value = accelerator.reduce(value, "mean")
        return value.reshape(())

    def start_window(
        self,
        accelerator: Any,
        batches: list[Mapping[str, Any]],
        kl_logps: Callable[[Mapping[str, Any]], tuple[SequenceLogps, ReferenceLogps]],
    ) -> None:
        """z0 over a whole gradient-accumulation window, before its first micro-batch (``kl_estimate="window"``).

        `batches`: the window's KTO labels (on the device); `kl_logps(labels)`: the policy's and the reference's
        KL log-probs of one micro-batch. The KL pass is no-grad and the weights do not change within a window,
        so these are the log-probs the per-micro-batch pass would compute.
        """
        self.window = None
        if not batches:
            return
        with torch.no_grad():
            parts = [self._pairs(*kl_logps(labels), labels) for labels in batches]
            policy_kl, reference_kl, ratios, num_tokens = (torch.cat(column) for column in zip(*parts))
            merged = {}
            if all("row_index" in labels for labels in batches):
                merged["row_index"] = torch.cat([labels["row_index"] for labels in batches])
            self.window = self.estimate(accelerator, True, policy_kl, reference_kl, ratios, num_tokens, merged)


class WindowBatchSamples:
    """Wraps a trainer's `get_batch_samples` (an instance attribute, undone by `detach`) for
    ``kl_estimate="window"``: after the Trainer fetches a gradient-accumulation window's micro-batches, z0 is
    estimated over all of them (and all processes) before the first one's loss."""

    PARAMETERS = ("epoch_iterator", "num_batches", "device")  # Trainer.get_batch_samples' (checked at attach)

    def __init__(self, original: Callable[..., Any], trainer: Any, loss_hook: Any) -> None:
        self.original = original
        self.trainer = trainer
        self.loss_hook = loss_hook

    def __call__(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
        batch_samples, num_items_in_batch = self.original(epoch_iterator, num_batches, device)
        self.loss_hook.window_reference_point(self.trainer, batch_samples)
        return batch_samples, num_items_in_batch
