"""Long runs: what a non-finite loss or reference point z0 does (`KTOConfig.on_nonfinite`).

The loss hook finds, per micro-batch, the rows whose loss or log-probs are not finite and whether z0 is; the
count is all-reduced with the metrics (so every rank decides alike) and, when it is not zero, the offending
rows' indices are gathered from every rank. Rows are named by the ``row_index`` column that
`KTOPlugin.prepare_dataset` adds (the row's position in the dataset passed to it), else by their position in
the micro-batch. Policies:

* ``"warn"`` (default): a `KTOPluginWarning` with the step and the rows; training goes on (the Trainer's
  ``logging_nan_inf_filter`` keeps the logged loss finite, NaN losses are left out of the batch mean).
* ``"raise"``: `NonFiniteLossError` on every rank, before the backward pass of that micro-batch.
* ``"skip"``: the update of that optimizer step is dropped: `NonFiniteSkipCallback` (`kto_plugin.trainer`) sets
  every gradient to None in ``on_pre_optimizer_step``, so the optimizer leaves the weights and its state as they were (the
  learning-rate schedule still advances). Refused under DeepSpeed, whose engine steps inside ``backward``.
"""

from __future__ import annotations

import warnings
from typing import Any

from ..errors import KTOPluginWarning, NonFiniteLossError


class NonFiniteGuard:
    """Applies `KTOConfig.on_nonfinite`; `skip_pending` tells the callback to drop the current step's update."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.skip_pending = False
        self.skipped_steps: list[int] = []

    def gather_and_report(self, trainer: Any, mode: str, rows: list[int], kl_rows: list[int], kl: float) -> None:
        """Every rank calls this together (the non-finite count was all-reduced): gathers the rows of every rank,
        then `report`."""
        if trainer.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            gathered = gather_object([(rows, kl_rows)])
            rows = [r for part in gathered for r in part[0]]
            kl_rows = [r for part in gathered for r in part[1]]
        self.report(trainer, mode, rows, kl_rows, kl)

    def report(self, trainer: Any, mode: str, rows: list[int], kl_rows: list[int], kl: float) -> None:
        """Called on every rank with the rows of all ranks (`rows`: non-finite loss or log-probs; `kl_rows`:
        non-finite mismatched pairs, by the prompt's row)."""
        step = trainer.state.global_step
        where = f"training step {step + 1}" if mode == "train" else f"evaluation at step {step}"
        parts = []
        if rows:
            parts.append(f"loss or log-probs of rows {sorted(set(rows))}")
        if kl != kl or kl in (float("inf"), float("-inf")):
            pairs = f" (from the KL pairs of rows {sorted(set(kl_rows))})" if kl_rows else ""
            parts.append(f"the reference point z0 = {kl}{pairs}")
        message = (
            f"kto_plugin: non-finite {' and '.join(parts)} at {where}. Rows are indices into the dataset given to "
            "prepare_dataset (its 'row_index' column). Check those rows, lower the learning rate, or use "
            "KTOConfig(on_nonfinite='skip') to drop such steps' updates or 'raise' to stop."
        )
        if self.policy == "raise":
            raise NonFiniteLossError(message)
        if self.policy == "skip" and mode == "train":
            self.skip_pending = True
            message += " This step's update is skipped (on_nonfinite='skip')."
        warnings.warn(message, KTOPluginWarning, stacklevel=3)
