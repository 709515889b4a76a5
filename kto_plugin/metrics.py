"""Metrics: accumulated per micro-batch inside the loss call, averaged over the logging interval, logged by a callback.

Names and meaning follow TRL 1.16's `KTOTrainer`, so dashboards carry over. Each value is a mean over the
micro-batches of the logging interval of a per-micro-batch value that was already reduced across processes.
Memory is one running sum and count per name, however long the run.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback


class MetricsAccumulator:
    """Running sums and counts of per-micro-batch values, per mode ("train" / "eval")."""

    def __init__(self) -> None:
        self._sums: dict[str, dict[str, float]] = {"train": {}, "eval": {}}
        self._counts: dict[str, dict[str, int]] = {"train": {}, "eval": {}}
        self._latest: dict[str, dict[str, float]] = {"train": {}, "eval": {}}

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


def _eval_prefix(logs: dict[str, float]) -> str:
    # evaluate(metric_key_prefix=p) logs f"{p}_runtime"; the default prefix is "eval"
    for key in logs:
        if key.endswith("_runtime") and not key.startswith("train"):
            return key[: -len("runtime")]
    return "eval_"


class KTOMetricsCallback(TrainerCallback):
    """Adds the accumulated KTO metrics to every log.

    It must run before the reporting integrations, so `KTOPlugin.attach` inserts it at index 0 of the
    callback list; `Trainer.log` has already copied `logs` into `state.log_history`, so both are updated.
    """

    def __init__(self, accumulator: MetricsAccumulator, is_training: Any) -> None:
        self.accumulator = accumulator
        self._is_training = is_training  # () -> bool: the trainer model's mode, as TRL reads it
        self.injected_keys: set[str] = set()  # every key added so far (a search objective leaves them out)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any):
        if logs is None:
            return
        if self._is_training():
            extra = self.accumulator.pop("train")
        else:
            prefix = _eval_prefix(logs)
            extra = {prefix + k: v for k, v in self.accumulator.pop("eval").items()}
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
        extra = {_eval_prefix(metrics or {}) + k: v for k, v in self.accumulator.pop("eval").items()}
        if metrics is not None:
            metrics.update(extra)
            self.injected_keys.update(extra)
