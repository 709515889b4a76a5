"""``model_init`` and ``hyperparameter_search`` with KTO.

`Trainer.train()` builds a new model with `model_init` *after* `attach()`. `trainer.model_init` is wrapped so
that every new model is re-bound before the Trainer uses it: the frozen-copy reference is taken from the model
that actually trains, before a checkpoint is loaded into it, and dropout, log-prob paths and PEFT reference
modes follow the new model. During a search, `hp_space` may name the KTO fields the loss reads at every step
(`beta`, `desirable_weight`, `undesirable_weight`); and the default objective (the sum of all eval metrics when
there are any) ignores the KTO metrics the plugin adds, so it stays `eval_loss` (or the sum of *your*
`compute_metrics` values), as the Trainer documents.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

from transformers import TrainingArguments
from transformers.trainer_utils import default_compute_objective, number_of_arguments

logger = logging.getLogger("kto_plugin")

# KTOConfig fields a hyperparameter search may set: the loss reads them at every step. The others shape the
# data (max_length, ...), the collator (loss_type, ...) or the reference (precompute_ref_log_probs, ...) at
# attach time.
HP_SEARCHABLE_FIELDS = ("beta", "desirable_weight", "undesirable_weight")


class RebindingModelInit:
    """`Trainer.model_init` that calls the user's, then re-binds the plugin to the new model (a class, not a
    closure, so the trainer pickles).

    It always takes the trial, whatever the user's `model_init` takes: the Trainer passes the trial only to a
    `model_init` of one argument, and a trial's KTO fields (`beta`, ...) must reach the plugin also when the
    user's `model_init` takes none (the common case).
    """

    def __init__(self, user_init: Callable[..., Any], plugin: Any) -> None:
        self.user_init = user_init
        self.plugin = plugin
        self.takes_trial = number_of_arguments(user_init) != 0

    def __call__(self, trial: Any) -> Any:
        model = self.user_init(trial) if self.takes_trial else self.user_init()
        on_new_model(self.plugin, model, trial)
        return model


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

    def __init__(self, plugin: Any) -> None:
        self.plugin = plugin

    def __call__(self, metrics: dict[str, float]) -> float:
        added = self.plugin.injected_metric_keys
        return default_compute_objective({k: v for k, v in metrics.items() if k not in added})


def on_new_model(plugin: Any, model: Any, trial: Any) -> None:
    """`Trainer.train()` made a new model with `model_init` (before loading any checkpoint into it): apply the
    trial's KTO hyperparameters and bind the plugin to the new model."""
    trainer = plugin.trainer
    apply_kto_hyperparameters(plugin.config, trial_params(trainer, trial))
    if getattr(trainer, "compute_objective", None) is default_compute_objective:
        plugin.ledger.setattr(trainer, "compute_objective", KTOObjective(plugin))
    plugin.rebind(trainer, trainer.accelerator.unwrap_model(model))


def install_model_init(plugin: Any, trainer: Any) -> None:
    """Wrap `trainer.model_init` (when set) so that every model `train()` builds is bound before it is used."""
    if trainer.model_init is not None:
        plugin.ledger.setattr(trainer, "model_init", RebindingModelInit(trainer.model_init, plugin))
