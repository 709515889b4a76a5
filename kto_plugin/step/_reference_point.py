"""z0, the KTO reference point (paper section 4.1): every way it is estimated, in one place.

* default: ``clamp(sum(policy_kl - reference_kl) / count, min=0)`` over the mismatched pairs of the micro-batch,
  the sum and count all-reduced across processes before the division (a rank with fewer pairs weighs less);
* a plugin's `kto_reference_point` estimate (detached, averaged across processes, not clamped);
* ``kl_estimate="window"``: the same estimate over every micro-batch of the gradient-accumulation window, computed
  once before the window's first micro-batch (`start_window`, called from the wrapped `get_batch_samples`);
* loss types that declared ``needs_kl=False``: 0.

z0 is detached: it carries no gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..config import KTOConfig
from ..hooks import KTOPluginManager
from ..loss import kl_reference_point


def rows_of(labels: Mapping[str, Any], mask: torch.Tensor) -> list[int]:
    """Row indices (the ``row_index`` column, else positions in the micro-batch) where `mask` is True."""
    positions = mask.nonzero().flatten()
    if "row_index" in labels:
        return labels["row_index"].to(positions.device)[positions].tolist()
    return positions.tolist()


class ReferencePoint:
    """Estimates z0 for each micro-batch; holds the window's value and the rows of non-finite KL pairs."""

    def __init__(self, config: KTOConfig, plugins: KTOPluginManager, needs_kl: bool) -> None:
        self.config = config
        self.plugins = plugins
        self.needs_kl = needs_kl
        self.window: torch.Tensor | None = None  # z0 of the current accumulation window (kl_estimate="window")
        self.nonfinite_rows: list[int] = []  # rows whose KL pair was not finite, in the last estimate

    def uses_window(self, mode: str) -> bool:
        """Whether this micro-batch takes the window's z0 (so it runs no KL pass of its own)."""
        return self.needs_kl and mode == "train" and self.window is not None

    def for_micro_batch(
        self,
        accelerator: Any,
        mode: str,
        policy_kl: torch.Tensor | None,
        reference_kl: torch.Tensor | None,
        labels: Mapping[str, Any],
        like: torch.Tensor,
    ) -> torch.Tensor:
        """z0 for this micro-batch: the window's, 0 without a KL term, else estimated from its KL pairs.
        `like`: a tensor on the device z0 should be on."""
        if self.uses_window(mode):
            return self.window.to(like.device)
        if not self.needs_kl:
            return like.new_zeros(())
        return self.estimate(accelerator, policy_kl, reference_kl, labels)

    def estimate(
        self, accelerator: Any, policy_kl: torch.Tensor, reference_kl: torch.Tensor, labels: Mapping[str, Any]
    ) -> torch.Tensor:
        """z0 from the mismatched pairs' log-probs (B,) of this process and every other (one collective)."""
        self.nonfinite_rows = rows_of(labels, ~torch.isfinite(policy_kl - reference_kl))
        custom = self.plugins.reference_point(
            policy_kl_logps=policy_kl, reference_kl_logps=reference_kl, config=self.config
        )
        if custom is not None:
            value = custom.detach().float().reshape(1)
            if accelerator.num_processes > 1:
                value = accelerator.reduce(value, "mean")
            return value.reshape(())
        stats = torch.stack(kl_reference_point(policy_kl, reference_kl))
        if accelerator.num_processes > 1:
            stats = accelerator.reduce(stats, "sum")
        return (stats[0] / stats[1].clamp(min=1)).clamp(min=0)

    def start_window(
        self,
        accelerator: Any,
        batches: list[Mapping[str, Any]],
        kl_logps: Callable[[Mapping[str, Any]], tuple[torch.Tensor, torch.Tensor]],
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
            pairs = [kl_logps(labels) for labels in batches]
            policy_kl = torch.cat([p.float() for p, _ in pairs])
            reference_kl = torch.cat([r.float() for _, r in pairs])
            merged = {}
            if all("row_index" in labels for labels in batches):
                merged["row_index"] = torch.cat([labels["row_index"] for labels in batches])
            self.window = self.estimate(accelerator, policy_kl, reference_kl, merged)


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
