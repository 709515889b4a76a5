"""The stock Trainer's own features with KTO: model_init, hyperparameter_search, compute_metrics,
preprocess_logits_for_metrics, callbacks, optimizers, use_liger_kernel."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import default_compute_objective

from helpers import args, kto_trainer
from reference_impl import naive_completion_logps
import kto_plugin
import kto_plugin.integrations._liger
from kto_plugin import KTOConfig, KTOPlugin
from kto_plugin.integrations._hpo import apply_kto_hyperparameters, trial_params
from kto_plugin.demo import build_tiny_model

KTO_KEYS = {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"}


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


class ModelFactory:
    """model_init: a differently initialised tiny Llama on every call (seed = call number), all kept."""

    def __init__(self, vocab_size, takes_trial=False):
        self.vocab_size = vocab_size
        self.made = []
        self.trials = []
        self.takes_trial = takes_trial

    def __call__(self, *trial):
        self.trials.extend(trial)
        model = build_tiny_model(
            self.vocab_size, hidden_size=32, num_layers=2, num_heads=4, seed=len(self.made)
        )
        model.config.attention_dropout = 0.1
        self.made.append(model)
        return model

    def init_fn(self):
        if self.takes_trial:
            return lambda trial: self(trial)
        return lambda: self()


def _model_init_trainer(
    tokenizer, rows, tmp_path, factory, kto_kwargs=None, plugins=(), eval_rows=None, **overrides
):
    kto = KTOPlugin(KTOConfig(max_length=96, **(kto_kwargs or {})), tokenizer=tokenizer, plugins=plugins)
    trainer = Trainer(
        model_init=factory.init_fn(),
        args=args(tmp_path, **overrides),
        train_dataset=kto.prepare_dataset(rows),
        eval_dataset=kto.prepare_dataset(eval_rows, name="eval") if eval_rows is not None else None,
        data_collator=kto.collator,
    )
    return kto, trainer


# --- model_init ---


def test_model_init_reference_is_the_model_that_trains(tokenizer, rows, tmp_path):
    factory = ModelFactory(len(tokenizer))
    kto, trainer = _model_init_trainer(tokenizer, rows, tmp_path, factory)
    user_init = trainer.model_init
    kto.attach(trainer)
    assert trainer.model_init is not user_init
    assert len(factory.made) == 1  # the Trainer built one model in __init__; attach bound to it
    trainer.train()
    assert len(factory.made) == 2  # train() built a second, differently initialised one
    trained = factory.made[1]
    assert trainer.model is trained
    assert not torch.equal(_params(factory.made[0]), _params(trained))
    # the reference is a frozen copy of the second model as model_init returned it
    fresh = ModelFactory(len(tokenizer))
    fresh(), fresh()
    assert torch.equal(_params(kto.reference.ref_model), _params(fresh.made[1]))
    # the first step's metrics come from the forward before the update: policy == reference there
    first = trainer.state.log_history[0]
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["kl"] == 0.0
    # dropout is off on the model that trains, and detach restores it
    dropouts = [m for m in trained.modules() if isinstance(m, torch.nn.Dropout)]
    assert all(m.p == 0.0 for m in dropouts)
    kto.detach()
    assert trainer.model_init is user_init


def test_model_init_reference_is_taken_before_a_checkpoint_is_loaded(tokenizer, rows, tmp_path):
    factory = ModelFactory(len(tokenizer))
    kto, trainer = _model_init_trainer(
        tokenizer, rows, tmp_path, factory, save_strategy="steps", save_steps=2, learning_rate=0.05
    )
    kto.attach(trainer)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    assert checkpoint.is_dir()

    factory2 = ModelFactory(len(tokenizer))
    kto2, resumed = _model_init_trainer(tokenizer, rows, tmp_path, factory2, max_steps=3, learning_rate=0.05)
    kto2.attach(resumed)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    # train() re-created the model (seed 1), then loaded the trained weights into it: the reference must be
    # model as model_init made it, not the checkpoint
    fresh = ModelFactory(len(tokenizer))
    fresh(), fresh()
    assert torch.equal(_params(kto2.reference.ref_model), _params(fresh.made[1]))
    assert not torch.equal(_params(kto2.reference.ref_model), _params(trainer.model))
    step3 = next(h for h in resumed.state.log_history if h.get("step") == 3 and "rewards/chosen" in h)
    assert step3["rewards/chosen"] != 0.0  # the resumed policy has moved away from that reference


# --- hyperparameter_search ---


def test_default_search_objective_ignores_the_kto_metrics(tokenizer, rows, tmp_path):
    factory = ModelFactory(len(tokenizer))
    kto, trainer = _model_init_trainer(tokenizer, rows, tmp_path, factory, eval_rows=rows[:16])
    kto.attach(trainer)
    trainer.compute_objective = default_compute_objective  # what hyperparameter_search() sets
    trainer.train()
    metrics = trainer.evaluate()
    assert {"eval_" + k for k in KTO_KEYS} <= set(metrics)
    # the Trainer's default would sum eval_rewards/*, eval_logps/*, eval_kl, ...: not a loss at all
    assert default_compute_objective(metrics) != pytest.approx(metrics["eval_loss"])
    assert trainer.compute_objective(metrics) == metrics["eval_loss"]
    with_user_metric = {**metrics, "eval_accuracy": 0.75}
    assert (
        trainer.compute_objective(with_user_metric) == 0.75
    )  # your own compute_metrics values are still summed
    kto.detach()
    assert trainer.compute_objective is default_compute_objective


def test_kto_fields_in_the_search_space():
    config = KTOConfig()
    applied = apply_kto_hyperparameters(
        config, {"beta": 0.3, "learning_rate": 1e-4, "undesirable_weight": 1.5, "not_a_field": 1}
    )
    assert applied == {"beta": 0.3, "undesirable_weight": 1.5}
    assert config.beta == 0.3 and config.undesirable_weight == 1.5
    with pytest.raises(ValueError, match="KTOConfig.max_length, which cannot change between trials"):
        apply_kto_hyperparameters(config, {"max_length": 64})
    with pytest.raises(ValueError, match="beta must be > 0"):
        apply_kto_hyperparameters(config, {"beta": -1.0})


def test_trial_params_from_a_dict_trial_and_outside_a_search():
    class T:
        hp_search_backend = "ray"

    assert trial_params(T(), {"beta": 0.2}) == {"beta": 0.2}
    T.hp_search_backend = None
    assert trial_params(T(), {"beta": 0.2}) == {}  # a plain train(trial=...) outside a search sets nothing


class Evaluations(TrainerCallback):
    def __init__(self, kto):
        self.kto = kto
        self.seen = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.seen.append((self.kto.config.beta, metrics["eval_loss"], dict(metrics)))


class BetaSeen:
    def __init__(self):
        self.betas = []

    @kto_plugin.hookimpl
    def kto_metrics(self, config):
        self.betas.append(config.beta)
        return {}


@pytest.mark.skipif(
    importlib.util.find_spec("optuna") is None, reason="optuna is in the dev extra; this environment lacks it"
)
@pytest.mark.parametrize("takes_trial", [True, False], ids=["model_init(trial)", "model_init()"])
def test_hyperparameter_search_with_optuna(takes_trial, tokenizer, rows, tmp_path):
    """The trial's beta reaches the loss whether or not model_init takes the trial (the Trainer passes the trial
    only to a model_init of one argument)."""
    import optuna

    factory = ModelFactory(len(tokenizer), takes_trial=takes_trial)
    seen_beta = BetaSeen()
    kto, trainer = _model_init_trainer(
        tokenizer, rows, tmp_path, factory, eval_rows=rows[:16], plugins=[seen_beta]
    )
    evaluations = Evaluations(kto)
    trainer.add_callback(evaluations)
    kto.attach(trainer)

    def hp_space(trial):
        return {
            "learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-1, log=True),
            "beta": trial.suggest_categorical("beta", [0.05, 0.5]),
        }

    best = trainer.hyperparameter_search(
        hp_space=hp_space,
        backend="optuna",
        n_trials=3,
        direction="minimize",
        sampler=optuna.samplers.RandomSampler(seed=3),
    )
    assert len(evaluations.seen) == 3
    assert len(factory.made) == 4  # Trainer.__init__ builds a first model, then one per trial
    if takes_trial:
        assert factory.trials[0] is None  # the first one without a trial
        assert len(factory.trials) == 4 and all(t is not None for t in factory.trials[1:])
    # the objective is each trial's eval_loss, and the best run is the lowest one, with its beta
    losses = [loss for _, loss, _ in evaluations.seen]
    assert best.objective == pytest.approx(min(losses))
    best_beta = evaluations.seen[losses.index(min(losses))][0]
    assert best.hyperparameters["beta"] == best_beta
    # beta from hp_space reached the loss
    assert {b for b, _, _ in evaluations.seen} <= {0.05, 0.5}
    assert set(seen_beta.betas) == {b for b, _, _ in evaluations.seen}


# --- compute_metrics / preprocess_logits_for_metrics ---


def _untruncated_rows(rows, tokenizer):
    """12 rows (8 desirable) that max_length=96 leaves whole: an unpadded forward per row is the reference."""
    return [r for r in rows if len(tokenizer(r["prompt"] + r["completion"]).input_ids) < 90][:12]


def _plain_logps(model, dataset):
    """Summed completion log-probs of each prepared row from one unpadded forward (no plugin code)."""
    out = []
    with torch.no_grad():
        for row in dataset:
            ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
            mask = torch.tensor([[0] * len(row["prompt_ids"]) + [1] * len(row["completion_ids"])])
            out.append(naive_completion_logps(model(input_ids=ids).logits, ids, mask)[0])
    return torch.stack(out)


def test_compute_metrics_gets_kto_predictions_and_labels(base_model, tokenizer, rows, tmp_path):
    seen = []

    def compute_metrics(pred):
        seen.append(pred)
        rewards, label = pred.predictions["rewards"], pred.label_ids["label"]
        return {"reward_accuracy": float(((rewards > 0) == label).mean())}

    kto, trainer = kto_trainer(
        copy.deepcopy(base_model),
        tokenizer,
        rows,
        tmp_path,
        eval_rows=_untruncated_rows(rows, tokenizer),
        max_steps=3,
        learning_rate=0.05,
    )
    trainer.compute_metrics = compute_metrics
    kto.attach(trainer)
    n = len(trainer.eval_dataset)

    metrics = trainer.evaluate()
    pred = seen[-1]
    assert set(pred.predictions) == {
        "policy_logps",
        "reference_logps",
        "rewards",
    }  # no full logits unless asked
    for key in pred.predictions:
        assert pred.predictions[key].shape == (n,)
    assert pred.label_ids["label"].tolist() == trainer.eval_dataset["label"]
    assert pred.label_ids["input_ids"].shape[0] == n
    expected = _plain_logps(trainer.model, trainer.eval_dataset)
    assert torch.allclose(torch.from_numpy(pred.predictions["policy_logps"]), expected, rtol=1e-5, atol=1e-4)
    assert (pred.predictions["reference_logps"] == pred.predictions["policy_logps"]).all()
    assert (pred.predictions["rewards"] == 0).all()
    assert metrics["eval_reward_accuracy"] == pytest.approx(
        float(((pred.predictions["rewards"] > 0) == pred.label_ids["label"]).mean())
    )

    trainer.train()
    trainer.evaluate()
    pred = seen[-1]
    expected = _plain_logps(trainer.model, trainer.eval_dataset)
    assert torch.allclose(torch.from_numpy(pred.predictions["policy_logps"]), expected, rtol=1e-5, atol=1e-4)
    rewards = 0.1 * (pred.predictions["policy_logps"] - pred.predictions["reference_logps"])
    assert abs(rewards).max() > 1e-3
    assert torch.allclose(torch.from_numpy(pred.predictions["rewards"]), torch.from_numpy(rewards), atol=1e-6)
    assert kto.loss_hook.eval_batch is None  # no hidden states are kept after evaluation
    out = trainer.predict(trainer.eval_dataset)  # predict() gives the same per-example dict
    assert torch.allclose(
        torch.from_numpy(out.predictions["rewards"]), torch.from_numpy(pred.predictions["rewards"])
    )


def test_predict_reports_kto_metrics_and_leaves_the_next_evaluation_alone(model, tokenizer, rows, tmp_path):
    eval_rows = _untruncated_rows(rows, tokenizer)
    kto, trainer = kto_trainer(
        model, tokenizer, rows, tmp_path, eval_rows=eval_rows, max_steps=2, learning_rate=0.05
    )
    kto.attach(trainer)
    trainer.train()
    first = trainer.evaluate()
    other = kto.prepare_dataset(rows[-16:], name="other")
    out = trainer.predict(other)
    assert {"test_" + k for k in KTO_KEYS} <= set(out.metrics)
    assert out.metrics["test_logps/chosen"] != pytest.approx(first["eval_logps/chosen"])
    again = trainer.evaluate()
    for key in ("eval_logps/chosen", "eval_rewards/rejected", "eval_kl"):
        assert again[key] == pytest.approx(first[key], rel=1e-6)  # predict's batches are not averaged in


def test_preprocess_logits_for_metrics_gets_the_full_logits(base_model, tokenizer, rows, tmp_path):
    calls = []

    def preprocess(logits, labels):
        calls.append((logits.clone(), {k: v.clone() for k, v in labels.items()}))
        return logits.argmax(-1)

    kto, trainer = kto_trainer(copy.deepcopy(base_model), tokenizer, rows, tmp_path, eval_rows=rows[:16])
    trainer.compute_metrics = lambda pred: {"n": float(len(pred.predictions["logits"]))}
    trainer.preprocess_logits_for_metrics = preprocess
    kto.attach(trainer)
    metrics = trainer.evaluate()
    n = len(trainer.eval_dataset)
    assert metrics["eval_n"] == n
    assert sum(len(c[0]) for c in calls) == n
    with torch.no_grad():
        for logits, labels in calls:
            direct = trainer.model(
                input_ids=labels["input_ids"], attention_mask=labels["attention_mask"]
            ).logits
            assert logits.shape == direct.shape  # [B, T, V], not the hook's one-position logits
            assert torch.allclose(logits, direct, atol=1e-5)
    kto.detach()
    assert trainer.preprocess_logits_for_metrics is preprocess


# --- callbacks, optimizers ---


class Recorder(TrainerCallback):
    def __init__(self):
        self.logs, self.evaluations = [], []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evaluations.append(dict(metrics))


def test_user_callbacks_see_the_kto_metrics(model, tokenizer, rows, tmp_path):
    at_init, added_later = Recorder(), Recorder()
    kto = KTOPlugin(KTOConfig(max_length=96), tokenizer=tokenizer)
    trainer = Trainer(
        model=model,
        args=args(tmp_path),
        train_dataset=kto.prepare_dataset(rows),
        eval_dataset=kto.prepare_dataset(rows[:16], name="eval"),
        data_collator=kto.collator,
        callbacks=[at_init],
    )
    kto.attach(trainer)
    trainer.add_callback(added_later)
    trainer.train()
    trainer.evaluate()
    for recorder in (at_init, added_later):
        assert KTO_KEYS <= set(recorder.logs[0])
        assert {"eval_" + k for k in KTO_KEYS} <= set(recorder.evaluations[-1])


def test_user_optimizer_and_scheduler(model, tokenizer, rows, tmp_path, caplog):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    kto = KTOPlugin(KTOConfig(max_length=96), tokenizer=tokenizer)
    trainer = Trainer(
        model=model,
        args=args(tmp_path, max_steps=3),
        train_dataset=kto.prepare_dataset(rows),
        data_collator=kto.collator,
        optimizers=(optimizer, scheduler),
    )
    with caplog.at_level("WARNING", logger="kto_plugin"):
        kto.attach(trainer)
    assert "learning_rate=0.2 is outside" in caplog.text  # the guidance reads the rate that will be used
    start = _params(model)
    trainer.train()
    assert trainer.optimizer.optimizer is optimizer  # wrapped by accelerate, not replaced
    assert trainer.lr_scheduler is scheduler
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert logged == pytest.approx([0.2, 0.1, 0.2 / 3])  # the user's schedule, not the Trainer's linear one
    assert not torch.equal(_params(trainer.model), start)
    assert torch.equal(_params(kto.reference.ref_model), start)  # the optimizer never touched the reference
    reference_ids = {id(p) for p in kto.reference.ref_model.parameters()}
    assert not reference_ids & {id(p) for g in optimizer.param_groups for p in g["params"]}


# --- use_liger_kernel ---


def test_liger_without_the_package_is_refused_before_anything_changes(model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, use_liger_kernel=True)
    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed here")
    with pytest.raises(ImportError, match="use_liger_kernel=True, but liger-kernel is not installed"):
        kto.attach(trainer)
    assert trainer.compute_loss_func is None and kto.trainer is None


@pytest.fixture
def fake_liger(monkeypatch):
    """Liger 'installed': availability and kernel application replaced by a recorder (no Triton here)."""
    applied = []

    def apply(model, config):
        applied.append((model, dict(config or {})))

    monkeypatch.setattr(kto_plugin.integrations._liger, "is_liger_kernel_available", lambda: True)
    monkeypatch.setattr("transformers.trainer.apply_liger_kernel", apply)
    monkeypatch.setattr("transformers.integrations.liger.apply_liger_kernel", apply)
    return applied


def test_liger_keeps_layer_kernels_and_turns_off_fused_cross_entropy(
    fake_liger, model, tokenizer, rows, tmp_path
):
    kto, trainer = kto_trainer(
        model,
        tokenizer,
        rows,
        tmp_path,
        use_liger_kernel=True,
        max_steps=1,
        liger_kernel_config={"rms_norm": True},
    )
    kto.attach(trainer)
    assert trainer.args.liger_kernel_config == {"rms_norm": True, "fused_linear_cross_entropy": False}
    trainer.train()
    # the Trainer patched the policy; the plugin gave the frozen copy the same kernels
    patched = [m for m, _ in fake_liger]
    assert any(m is trainer.model for m in patched)
    assert any(m is kto.reference.ref_model for m in patched)
    assert all(c == {"rms_norm": True, "fused_linear_cross_entropy": False} for _, c in fake_liger)
    kto.detach()
    assert trainer.args.liger_kernel_config == {"rms_norm": True}


def test_liger_fused_cross_entropy_is_refused(fake_liger, model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(
        model,
        tokenizer,
        rows,
        tmp_path,
        use_liger_kernel=True,
        liger_kernel_config={"fused_linear_cross_entropy": True},
    )
    with pytest.raises(ValueError, match="fused_linear_cross_entropy.*not supported with KTO"):
        kto.attach(trainer)
    assert trainer.compute_loss_func is None
