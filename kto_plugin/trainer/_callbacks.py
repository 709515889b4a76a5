"""The Trainer callbacks the plugin installs for the step: logging the KTO metrics, dropping a skipped update."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback

from ..step._metrics import MetricsAccumulator
from ..step._nonfinite import NonFiniteGuard


def _eval_prefix(logs: dict[str, float]) -> str:
    # evaluate(metric_key_prefix=p) logs f"{p}_runtime"; the default prefix is "eval"
    for key in logs:
        if key.endswith("_runtime") and not key.startswith("train"):
            return key[: -len("runtime")]
    return "eval_"


class KTOMetricsCallback(TrainerCallback):
    """Adds the accumulated KTO metrics to every log.

    It must run before the reporting integrations, so `attach` inserts it at index 0 of the callback list;
    `Trainer.log` has already copied `logs` into `state.log_history`, so both are updated. Train or eval is read
    from the trainer's model mode, as TRL reads it.
    """

    def __init__(
        self, accumulator: MetricsAccumulator, trainer: Any,
        evaluation: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self.accumulator = accumulator
        self.trainer = trainer
        # the metrics over a whole evaluation (`kto_evaluation_metrics`), called on every process when it is logged
        self.evaluation = evaluation
        self.injected_keys: set[str] = set()  # every key added so far (a search objective leaves them out)

    def _evaluation_metrics(self) -> dict[str, float]:
        extra = self.accumulator.pop("eval")
        if self.evaluation is not None:
            extra.update(self.evaluation())
        return extra

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any):
        if logs is None:
            return
        if self.trainer.model.training:
            extra = self.accumulator.pop("train")
        else:
            prefix = _eval_prefix(logs)
            extra = {prefix + k: v for k, v in self._evaluation_metrics().items()}
        if not extra:
            return
        logs.update(extra)
        self.injected_keys.update(extra)
        if state.log_history and state.log_history[-1] is not logs:
            state.log_history[-1].update(extra)

    def on_predict(
        self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kwargs: Any
    ):
        # `Trainer.predict` logs nothing, so `on_log` never takes these: without this, they would be averaged
        # into the next evaluation's metrics. `metrics` is the dict `predict()` returns.
        extra = {_eval_prefix(metrics or {}) + k: v for k, v in self._evaluation_metrics().items()}
        if metrics is not None:
            metrics.update(extra)
            self.injected_keys.update(extra)


class NonFiniteSkipCallback(TrainerCallback):
    """Drops the pending step's update for ``on_nonfinite="skip"`` (gradients set to None before the step)."""

    def __init__(self, guard: NonFiniteGuard) -> None:
        self.guard = guard

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # the mark belongs to one optimizer step's window: a run stopped before that step's update (an
        # exception between micro-batches) must not drop the next run's first update
        self.guard.skip_pending = False

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.guard.skip_pending:
            return
        optimizer = kwargs["optimizer"]
        optimizer.zero_grad(set_to_none=True)
        model = kwargs.get("model")
        if model is not None:
            for p in model.parameters():
                p.grad = None
        self.guard.skipped_steps.append(state.global_step + 1)
        self.guard.skip_pending = False
