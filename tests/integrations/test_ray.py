"""Ray Tune through `trainer.hyperparameter_search(backend="ray")` with the plugin attached: Ray pickles the
Trainer (model_init, plugin, datasets, collator) to its worker processes, each trial trains there with its own
`beta`, and a KTO metric is the objective."""

from __future__ import annotations

import sys

import pytest
from helpers import args
from transformers import Trainer

import kto_plugin
from kto_plugin import KTOConfig, KTOPlugin
from kto_plugin.demo import build_tiny_model

pytestmark = pytest.mark.slow

KTO_EVAL_KEYS = {"eval_kl", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins",
                 "eval_logps/chosen", "eval_logps/rejected"}


class TinyModel:
    """model_init without a trial argument (the common form)."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def __call__(self):
        return build_tiny_model(self.vocab_size, hidden_size=32, num_layers=2, num_heads=4, seed=1)


class BetaInTheLoss:
    """Reports the beta the loss was computed with, as the metric `beta_in_loss` (from the worker process)."""

    @kto_plugin.hookimpl
    def kto_metrics(self, config):
        return {"beta_in_loss": config.beta}


def by_margin(metrics):
    return metrics["eval_rewards/margins"]


@pytest.fixture
def ray_session():
    ray = pytest.importorskip("ray", reason="ray[tune] is in the dev extra")
    # the workers unpickle this module's classes by value: they cannot import a test module
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_two_trial_search_with_ray_tune(ray_session, tokenizer, rows, tmp_path):
    from accelerate.state import GradientState
    from ray import tune

    # accelerate's per-process GradientState keeps weak references to the dataloaders of earlier, unfinished
    # train() runs (earlier tests), and a weak reference does not pickle: any Trainer would fail to ship then
    GradientState._reset_state()
    kto = KTOPlugin(KTOConfig(max_length=96), tokenizer=tokenizer, plugins=[BetaInTheLoss()])
    trainer = Trainer(model_init=TinyModel(len(tokenizer)), args=args(tmp_path, max_steps=2),
                      train_dataset=kto.prepare_dataset(rows[:40]),
                      eval_dataset=kto.prepare_dataset(rows[40:56], name="eval"), data_collator=kto.collator)
    kto.attach(trainer)
    best = trainer.hyperparameter_search(
        hp_space=lambda _: {"beta": tune.grid_search([0.05, 0.5])}, backend="ray", n_trials=1,
        direction="maximize", compute_objective=by_margin, storage_path=str(tmp_path / "ray"), verbose=0,
    )
    trials = best.run_summary.trials
    assert sorted(t.config["beta"] for t in trials) == [0.05, 0.5]
    for trial in trials:
        result = trial.last_result
        assert KTO_EVAL_KEYS <= set(result)
        # the trial's beta reached the loss in the worker, and the objective is that trial's KTO margin
        assert result["eval_beta_in_loss"] == pytest.approx(trial.config["beta"])
        assert result["objective"] == result["eval_rewards/margins"]
    winner = max(trials, key=lambda t: t.last_result["objective"])
    assert best.hyperparameters["beta"] == winner.config["beta"]
    assert best.objective == winner.last_result["objective"]
    # the driver's trainer is still attached to this plugin (Ray trained pickled copies)
    assert kto.trainer is trainer and trainer.compute_loss_func is kto.loss_hook
