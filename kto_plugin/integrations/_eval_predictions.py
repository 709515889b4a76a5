"""``compute_metrics`` / ``preprocess_logits_for_metrics`` with KTO.

The loss hook's model outputs carry hidden states and one position of logits (`logits_to_keep=1`), which are of no
use to a metric. The plugin installs its own `preprocess_logits_for_metrics` (`EvalPredictions`), so
`EvalPrediction.predictions` is a dict of per-example arrays ``policy_logps``, ``reference_logps``, ``rewards``
(beta * log-ratio, as logged), and ``label_ids`` is the batch's KTO labels dict (``label``, ``input_ids``,
``completion_labels``, ...). If you pass your own `preprocess_logits_for_metrics`, it receives the full
`[B, T, V]` logits (computed from the final hidden states, as the model would return them) and the labels dict,
and its result is ``predictions["logits"]``. Without it no full logits are ever built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback

from ..step._compute_loss import EvalBatch


class EvalPredictions:
    """The plugin's `preprocess_logits_for_metrics`: KTO per-example values, plus your own function's result.

    Called by `Trainer.evaluation_loop` right after each evaluation step with the raw model outputs (ignored)
    and the batch's labels (the KTO labels dict, padded across processes). Returns
    ``{"policy_logps": (B,), "reference_logps": (B,), "rewards": (B,)}``, plus
    ``"logits": user_fn(full_logits, labels)`` when you passed a function.
    """

    def __init__(self, plugin: Any, user_fn: Callable[[Any, Any], Any] | None) -> None:
        self.plugin = plugin
        self.user_fn = user_fn

    def __call__(self, logits: Any, labels: Any) -> dict[str, Any]:
        hook = self.plugin.loss_hook
        batch: EvalBatch | None = hook.eval_batch
        hook.eval_batch = None
        if batch is None:
            raise RuntimeError(
                "kto_plugin: no KTO values for this evaluation batch: the KTO loss hook did not run on it. "
                "Keep "
                "trainer.compute_loss_func as KTOPlugin.attach set it, and keep label_names=['labels']."
            )
        predictions = {
            "policy_logps": batch.policy_logps,
            "reference_logps": batch.reference_logps,
            "rewards": batch.rewards,
        }
        if self.user_fn is not None:
            full = batch.full_logits()
            # the Trainer pads what it hands to this function across processes, so that gathering works
            full = self.plugin.trainer.accelerator.pad_across_processes(full, dim=1, pad_index=-100)
            predictions["logits"] = self.user_fn(full, labels)
        return predictions


class DropEvalBatch(TrainerCallback):
    """Drops the evaluation batch the step kept, after each prediction step (it holds the batch's hidden states)."""

    def __init__(self, loss_hook: Any) -> None:
        self.loss_hook = loss_hook

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.loss_hook.eval_batch = None


def install_eval_predictions(plugin: Any, trainer: Any) -> None:
    ledger = plugin.ledger
    ledger.setattr(trainer, "preprocess_logits_for_metrics",
                   EvalPredictions(plugin, trainer.preprocess_logits_for_metrics))
    ledger.add_callback(trainer, DropEvalBatch(plugin.loss_hook), index=1)
