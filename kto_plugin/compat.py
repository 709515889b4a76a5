"""The stock Trainer's own features, made to work with KTO (or refused with a reason).

What `KTOPlugin.attach` installs through `TrainerCompat` (and `detach` undoes):

* ``model_init`` / ``hyperparameter_search``: `Trainer.train()` builds a new model with `model_init` *after*
  `attach()`. `trainer.model_init` is wrapped (same arity) so that every new model is re-bound before the
  Trainer uses it: the frozen-copy reference is taken from the model that actually trains, before a
  checkpoint is loaded into it, and dropout, log-prob paths and PEFT reference modes follow the new model.
  During a search, `hp_space` may name the KTO fields the loss reads at every step (`beta`,
  `desirable_weight`, `undesirable_weight`); and the default objective (the sum of all eval metrics when
  there are any) ignores the KTO metrics the plugin adds, so it stays `eval_loss` (or the sum of *your*
  `compute_metrics` values), as the Trainer documents.
* ``compute_metrics`` / ``preprocess_logits_for_metrics``: the loss hook's model outputs carry hidden states
  and one position of logits (`logits_to_keep=1`), which are of no use to a metric. The plugin installs its
  own `preprocess_logits_for_metrics` (`EvalPredictions`), so `EvalPrediction.predictions` is a dict of
  per-example arrays ``policy_logps``, ``reference_logps``, ``rewards`` (beta * log-ratio), and
  ``label_ids`` is the batch's KTO labels dict (``label``, ``input_ids``, ``completion_labels``, ...). If you
  pass your own `preprocess_logits_for_metrics`, it receives the full `[B, T, V]` logits (computed from the
  final hidden states, as the model would return them) and the labels dict, and its result is
  ``predictions["logits"]``. Without it no full logits are ever built.
* ``use_liger_kernel``: see `check_liger`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import default_compute_objective, number_of_arguments
from transformers.utils import is_liger_kernel_available

logger = logging.getLogger("kto_plugin")

# KTOConfig fields a hyperparameter search may set: the loss reads them at every step. The others shape the
# data (max_length, ...), the collator (loss_type, ...) or the reference (precompute_ref_log_probs, ...) at
# attach time.
HP_SEARCHABLE_FIELDS = ("beta", "desirable_weight", "undesirable_weight")


# --- compute_metrics / preprocess_logits_for_metrics ---


@dataclasses.dataclass
class EvalBatch:
    """What the loss hook keeps of the last evaluation micro-batch for `EvalPredictions`."""

    policy_logps: torch.Tensor  # (B,) summed completion log-probs of the policy
    reference_logps: torch.Tensor  # (B,) the same for the reference
    outputs: Any  # the policy's model outputs (hidden states, or full logits on the logits path)
    lm_head: Any  # the policy's output embedding
    use_hidden: bool  # whether `outputs` come from the hidden-state path (`logits_to_keep=1`)
    seq_len: int  # T of the batch's input_ids

    @torch.no_grad()
    def full_logits(self) -> torch.Tensor:
        """`[B, T, V]` logits of the policy, as `model(input_ids, attention_mask).logits` returns them."""
        hidden_states = getattr(self.outputs, "hidden_states", None)
        if self.use_hidden and hidden_states is not None and self.lm_head is not None:
            return self.lm_head(hidden_states[-1][:, -self.seq_len :])
        return self.outputs.logits[:, -self.seq_len :]


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
        beta = self.plugin.config.beta
        predictions = {
            "policy_logps": batch.policy_logps,
            "reference_logps": batch.reference_logps,
            "rewards": beta * (batch.policy_logps - batch.reference_logps),
        }
        if self.user_fn is not None:
            full = batch.full_logits()
            # the Trainer pads what it hands to this function across processes, so that gathering works
            full = self.plugin.trainer.accelerator.pad_across_processes(full, dim=1, pad_index=-100)
            predictions["logits"] = self.user_fn(full, labels)
        return predictions


# --- model_init / hyperparameter_search ---


def rebinding_model_init(
    user_init: Callable[..., Any], on_model: Callable[[Any, Any], None]
) -> Callable[..., Any]:
    """`user_init` with the same arity (the Trainer counts arguments), then `on_model(model, trial)`."""
    if number_of_arguments(user_init) == 0:

        def model_init() -> Any:
            model = user_init()
            on_model(model, None)
            return model

    else:

        def model_init(trial: Any) -> Any:  # type: ignore[misc]
            model = user_init(trial)
            on_model(model, trial)
            return model

    model_init.__wrapped__ = user_init  # type: ignore[attr-defined]
    return model_init


def trial_params(trainer: Any, trial: Any) -> dict[str, Any]:
    """The hyperparameters of `trial`, as `Trainer._hp_search_setup` will read them."""
    if trial is None or getattr(trainer, "hp_search_backend", None) is None:
        return {}
    if isinstance(trial, Mapping):  # Ray Tune and W&B sweeps pass the sampled values
        return dict(trial)
    # optuna: hp_space(trial) suggests each parameter; suggesting a name again returns the value already drawn
    return dict(trainer.hp_space(trial))


def apply_kto_hyperparameters(config: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """Set the KTOConfig fields that `params` names (and TrainingArguments lacks); returns what was set.

    Raises for KTOConfig fields that cannot change between trials of one attached plugin.
    """
    training_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    kto_fields = {f.name for f in dataclasses.fields(config)}
    applied = {}
    for name, value in params.items():
        if name in training_fields or name not in kto_fields:
            continue  # the Trainer sets TrainingArguments fields itself and warns about unknown names
        if name not in HP_SEARCHABLE_FIELDS:
            raise ValueError(
                f"hp_space sets KTOConfig.{name}, which cannot change between trials: it is fixed when the "
                f"dataset is prepared or the plugin attached. Searchable KTO fields: "
                f"{', '.join(HP_SEARCHABLE_FIELDS)}. "
                f"Run one search per value of {name}."
            )
        applied[name] = float(value)
    if applied:
        for name, value in applied.items():
            setattr(config, name, value)
        config.__post_init__()  # validate the new values (beta > 0, ...)
        logger.info("kto_plugin: hyperparameter search trial sets %s", applied)
    return applied


class KTOObjective:
    """`default_compute_objective` over the metrics minus the KTO metrics the plugin added.

    The Trainer's default objective is `eval_loss` when there are no other metrics and their sum otherwise;
    summing `eval_rewards/chosen`, `eval_kl`, ... would make it meaningless.
    """

    def __init__(self, injected_keys: Callable[[], set[str]]) -> None:
        self.injected_keys = injected_keys

    def __call__(self, metrics: dict[str, float]) -> float:
        added = self.injected_keys()
        return default_compute_objective({k: v for k, v in metrics.items() if k not in added})


# --- use_liger_kernel ---


def check_liger(args: Any) -> dict[str, Any] | None:
    """The `liger_kernel_config` to train with, or None when `use_liger_kernel` is off.

    The stock Trainer applies Liger's kernels to the policy in `train()`. kto_plugin keeps Liger's layer
    kernels (RMSNorm, RoPE, SwiGLU, ...) and turns off its fused linear cross-entropy, which replaces the
    model's forward: it computes a token-mean cross-entropy whose gradient is fixed inside the forward, while
    KTO's per-token gradient depends on the whole batch's summed log-probs and z0; kto_plugin's own
    completion-only chunked LM head already avoids the `[B, T, V]` logits. Liger's fused KTO loss is not used
    either: it projects every position (prompt included), has no desirable/undesirable weights, and returns
    only sums, so the `kto_loss`/`kto_metrics` hooks and the per-example metrics would need a second pass.
    """
    if not getattr(args, "use_liger_kernel", False):
        return None
    if not is_liger_kernel_available():
        raise ImportError(
            "TrainingArguments.use_liger_kernel=True, but liger-kernel is not installed (it needs Triton "
            "and a CUDA GPU): `pip install liger-kernel`, or set use_liger_kernel=False. kto_plugin does not "
            "need Liger to save memory: its chunked, completion-only LM head never materialises [B, T, V] "
            "logits."
        )
    config = dict(args.liger_kernel_config or {})
    if config.get("fused_linear_cross_entropy"):
        raise ValueError(
            'liger_kernel_config={"fused_linear_cross_entropy": True} is not supported with KTO: it replaces '
            "the model's forward with a token-mean cross-entropy whose gradient is fixed in the forward, and "
            "KTO's is not. Leave it unset: kto_plugin's chunked LM head gives the same memory saving, and "
            "Liger's layer kernels still apply."
        )
    config["fused_linear_cross_entropy"] = False
    return config


class CompatCallback(TrainerCallback):
    """Drops the kept evaluation batch after each step; gives a frozen-copy reference Liger's kernels."""

    def __init__(self, plugin: Any) -> None:
        self.plugin = plugin

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.plugin.loss_hook.eval_batch = None  # it holds the batch's hidden states

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        reference = self.plugin.reference
        if not args.use_liger_kernel or reference.ref_model is None or reference.given_ref_model is not None:
            return
        # The Trainer has just patched the policy with Liger's kernels; the frozen copy must compute the same
        # function as the initial policy, so it gets the same kernels (a separate ref_model is left as given).
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(
            self.plugin.trainer.accelerator.unwrap_model(reference.ref_model), args.liger_kernel_config
        )


class TrainerCompat:
    """Installs the pieces above on one trainer and restores it exactly on `uninstall`."""

    def __init__(self, plugin: Any) -> None:
        self.plugin = plugin
        self._saved: dict[str, Any] = {}
        self.callback: CompatCallback | None = None

    def install(self, trainer: Any) -> None:
        plugin = self.plugin
        saved = self._saved
        liger_config = check_liger(trainer.args)
        if liger_config is not None:
            saved["liger_kernel_config"] = trainer.args.liger_kernel_config
            trainer.args.liger_kernel_config = liger_config
        saved["preprocess_logits_for_metrics"] = trainer.preprocess_logits_for_metrics
        trainer.preprocess_logits_for_metrics = EvalPredictions(plugin, trainer.preprocess_logits_for_metrics)
        saved["model_init"] = trainer.model_init
        if trainer.model_init is not None:
            trainer.model_init = rebinding_model_init(trainer.model_init, self._on_new_model)
        self.callback = CompatCallback(plugin)
        trainer.callback_handler.callbacks.insert(1, self.callback)

    def _on_new_model(self, model: Any, trial: Any) -> None:
        """`Trainer.train()` made a new model (before loading any checkpoint into it): bind KTO to it."""
        plugin = self.plugin
        trainer = plugin.trainer
        apply_kto_hyperparameters(plugin.config, trial_params(trainer, trial))
        if getattr(trainer, "compute_objective", None) is default_compute_objective:
            self._saved.setdefault("compute_objective", default_compute_objective)
            trainer.compute_objective = KTOObjective(lambda: plugin.injected_metric_keys)
        plugin.rebind(trainer, trainer.accelerator.unwrap_model(model))

    def uninstall(self, trainer: Any) -> None:
        saved = self._saved
        if "liger_kernel_config" in saved:
            trainer.args.liger_kernel_config = saved["liger_kernel_config"]
        # `attach` may have failed before or during `install`: restore only what was changed
        if "preprocess_logits_for_metrics" in saved:
            trainer.preprocess_logits_for_metrics = saved["preprocess_logits_for_metrics"]
        if "model_init" in saved:
            trainer.model_init = saved["model_init"]
        if "compute_objective" in saved:
            trainer.compute_objective = saved["compute_objective"]
        if self.callback in trainer.callback_handler.callbacks:
            trainer.callback_handler.callbacks.remove(self.callback)
        self.callback = None
        self._saved = {}
