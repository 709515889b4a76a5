"""Plugin hooks (hookspecs.py, plugin_manager.py): sources and order of plugins, validation, errors naming the
plugin and the hook, and custom losses, reference points and metrics in real training runs."""

from __future__ import annotations

import copy
import logging
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from helpers import kto_trainer
from kto_plugin import KTOConfig, KTOPlugin, KTOPluginManager, PluginError, PluginValidationError, hookimpl
from kto_plugin import loss as kto_loss_fns
from kto_plugin.plugin_manager import RESERVED_METRIC_NAMES

BETA = 0.1


# --- plugins used below ---


class Constant:
    """Claims loss_type `kto` and returns a constant loss per example (differentiable)."""

    def __init__(self, value):
        self.value = value

    @hookimpl
    def kto_loss(self, policy_logps):
        return policy_logps * 0 + self.value


class Passes:
    """Implements every hook and always returns None: it must be transparent."""

    calls = 0

    @hookimpl
    def kto_loss_types(self):
        return None

    @hookimpl
    def kto_loss(self, loss_type):
        type(self).calls += 1

    @hookimpl
    def kto_reference_point(self):
        return None

    @hookimpl
    def kto_metrics(self):
        return None


class LogSigmoid:
    """-log sigmoid(beta * (r - z0)) / -log sigmoid(beta * (z0 - r)), under the loss type `logsig`."""

    @hookimpl
    def kto_loss_types(self):
        return {"logsig": True}

    @hookimpl
    def kto_loss(self, loss_type, policy_logps, reference_logps, kl, labels, config):
        if loss_type != "logsig":
            return None
        r = policy_logps - reference_logps
        return -F.logsigmoid(config.beta * torch.where(labels, r - kl, kl - r))


class Unrelated:
    """A plugin for another loss type, with a reference point and a metric that must not touch `kto`."""

    @hookimpl
    def kto_loss_types(self):
        return {"unrelated": True}

    @hookimpl
    def kto_loss(self, loss_type, policy_logps):
        return policy_logps * 0 + 123.0 if loss_type == "unrelated" else None

    @hookimpl
    def kto_reference_point(self, config):
        return torch.tensor(9.0) if config.loss_type == "unrelated" else None

    @hookimpl
    def kto_metrics(self, labels):
        return {"unrelated/n": float(labels.numel())}


class Recorder:
    """Records what kto_metrics receives, and returns a call counter as a metric."""

    def __init__(self):
        self.seen = []

    @hookimpl
    def kto_metrics(self, policy_logps, reference_logps, kl, labels, losses, config):
        self.seen.append(
            dict(
                policy=policy_logps.clone(),
                reference=reference_logps.clone(),
                kl=kl.clone(),
                labels=labels.clone(),
                losses=losses.clone(),
            )
        )
        return {"test/calls": len(self.seen)}


def hook_kwargs(loss_type="kto"):
    """Keyword arguments of a kto_loss call on a batch of 4 (2 desirable, 2 undesirable)."""
    return dict(
        loss_type=loss_type,
        policy_logps=torch.tensor([-3.0, -2.0, -4.0, -1.0], requires_grad=True),
        reference_logps=torch.tensor([-2.5, -2.0, -3.0, -1.5]),
        kl=torch.tensor(0.2),
        labels=torch.tensor([True, False, True, False]),
        config=KTOConfig(beta=BETA),
    )


def metric_kwargs():
    kw = hook_kwargs()
    del kw["loss_type"]
    kw["losses"] = torch.ones(4)
    return kw


def manager(*plugins, **kw):
    return KTOPluginManager(list(plugins), autoload=kw.pop("autoload", False), **kw)


# --- order and fall-through ---


def test_passed_plugins_are_called_in_list_order_before_the_builtins():
    first, second = Constant(1.0), Constant(2.0)
    pm = manager(first, second)
    assert pm.loss(**hook_kwargs()).tolist() == [1.0] * 4
    assert pm.loss(**hook_kwargs("apo_zero_unpaired")).tolist() == [1.0] * 4  # Constant ignores loss_type
    names = [name for name, _ in pm.describe()]
    assert names == [
        "test_hooks.Constant",
        "test_hooks.Constant#2",
        "builtin:apo_zero_unpaired",
        "builtin:kto",
    ]
    assert manager(second, first).loss(**hook_kwargs()).tolist() == [2.0] * 4


def test_a_plugin_redeclaring_a_builtin_loss_type_wins():
    class KLFreeKTO:
        @hookimpl
        def kto_loss_types(self):
            return {"kto": False}

    pm = manager(KLFreeKTO())
    assert pm.needs_kl(KTOConfig(loss_type="kto")) is False
    assert manager().needs_kl(KTOConfig(loss_type="kto")) is True
    assert manager().needs_kl(KTOConfig(loss_type="apo_zero_unpaired")) is False


def test_firstresult_falls_through_on_none_to_the_builtin():
    Passes.calls = 0
    pm = manager(Passes())
    kw = hook_kwargs()
    expected = kto_loss_fns.kto_loss(
        kw["policy_logps"], kw["reference_logps"], kw["labels"], kw["kl"], BETA
    ).losses
    assert torch.equal(pm.loss(**kw), expected)
    assert Passes.calls == 1
    apo = kto_loss_fns.apo_zero_unpaired_loss(
        kw["policy_logps"], kw["reference_logps"], kw["labels"], BETA
    ).losses
    assert torch.equal(pm.loss(**{**kw, "loss_type": "apo_zero_unpaired"}), apo)
    assert (
        pm.reference_point(
            policy_kl_logps=torch.zeros(4), reference_kl_logps=torch.zeros(4), config=KTOConfig()
        )
        is None
    )
    assert pm.metrics(**metric_kwargs()) == {}
    assert pm.loss_types(KTOConfig()) == {"kto": True, "apo_zero_unpaired": False}


def test_a_declared_loss_type_that_no_plugin_computes_is_an_error():
    class DeclaresOnly:
        @hookimpl
        def kto_loss_types(self):
            return {"ghost": True}

    pm = manager(DeclaresOnly())
    with pytest.raises(PluginError, match="No plugin computed kto_loss for loss_type 'ghost'"):
        pm.loss(**hook_kwargs("ghost"))


# --- sources: entry points, the disable variable, duplicates ---

_EP_MODULE = """
from kto_plugin import hookimpl
CALLS = []

@hookimpl
def kto_metrics(labels):
    CALLS.append(1)
    return {"{metric}": 1.0}
"""


@pytest.fixture
def install_fake(tmp_path, monkeypatch):
    """Puts a distribution with a `kto_plugin` entry point (a dist-info folder, as pip makes) on sys.path."""
    modules = []

    def install(dist_name, module, entry_name, folder="site", metric="ep/loaded", body=_EP_MODULE):
        root = tmp_path / folder
        root.mkdir(exist_ok=True)
        (root / f"{module}.py").write_text(body.replace("{metric}", metric))
        info = root / f"{dist_name.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[kto_plugin]\n{entry_name} = {module}\n")
        monkeypatch.syspath_prepend(str(root))
        modules.append(module)

    yield install
    for module in modules:
        sys.modules.pop(module, None)


def test_entry_points_load_unless_the_variable_disables_them(install_fake, monkeypatch):
    install_fake("fake-kto-plugin", "fake_kto_plugin_mod", "fake")
    for value in ("1", "true", "yes"):
        monkeypatch.setenv("KTO_PLUGIN_DISABLE_AUTOLOAD", value)
        assert "fake" not in dict(KTOPluginManager().describe())
    for value in ("0", "", "false"):
        monkeypatch.setenv("KTO_PLUGIN_DISABLE_AUTOLOAD", value)
        assert dict(KTOPluginManager().describe())["fake"] == "entry point 'fake' of fake-kto-plugin 1.0"
    monkeypatch.delenv("KTO_PLUGIN_DISABLE_AUTOLOAD")
    pm = KTOPluginManager()
    assert pm.metrics(**metric_kwargs()) == {"ep/loaded": 1.0}
    assert KTOPluginManager(autoload=False).metrics(**metric_kwargs()) == {}  # the argument overrides


def test_entry_point_plugins_come_after_passed_plugins_and_before_builtins(install_fake, monkeypatch):
    install_fake("fake-kto-plugin", "fake_kto_plugin_mod", "fake")
    monkeypatch.delenv("KTO_PLUGIN_DISABLE_AUTOLOAD")
    names = [name for name, _ in KTOPluginManager([Passes()]).describe()]
    assert names == ["test_hooks.Passes", "fake", "builtin:apo_zero_unpaired", "builtin:kto"]


def test_each_entry_point_is_loaded_once(install_fake, monkeypatch, caplog):
    # the same distribution on sys.path twice, and another distribution reusing the entry point's name
    install_fake("fake-kto-plugin", "fake_kto_plugin_mod", "fake", folder="a")
    install_fake("fake-kto-plugin", "fake_kto_plugin_mod", "fake", folder="b")
    install_fake("other-dist", "other_kto_plugin_mod", "fake", folder="c", metric="ep/other")
    monkeypatch.delenv("KTO_PLUGIN_DISABLE_AUTOLOAD")
    with caplog.at_level(logging.WARNING, logger="kto_plugin"):
        pm = KTOPluginManager()
    assert "skipping entry point 'fake'" in caplog.text and "is already loaded" in caplog.text
    assert [name for name, _ in pm.describe()].count("fake") == 1
    metrics = pm.metrics(**metric_kwargs())
    assert len(metrics) == 1  # one of the two distributions, once
    module = sys.modules["other_kto_plugin_mod" if "ep/other" in metrics else "fake_kto_plugin_mod"]
    assert module.CALLS == [1]


def test_a_broken_entry_point_names_the_package(install_fake, monkeypatch):
    install_fake("broken-dist", "broken_kto_plugin_mod", "broken", body="raise ImportError('no torch_xyz')\n")
    monkeypatch.delenv("KTO_PLUGIN_DISABLE_AUTOLOAD")
    with pytest.raises(
        PluginError,
        match=r"entry point 'broken'.*broken-dist 1.0.*no torch_xyz.*"
        r"KTO_PLUGIN_DISABLE_AUTOLOAD=1",
    ):
        KTOPluginManager()


def test_an_installed_plugin_passed_again_is_registered_once(install_fake, monkeypatch):
    install_fake("fake-kto-plugin", "fake_kto_plugin_mod", "fake")
    monkeypatch.delenv("KTO_PLUGIN_DISABLE_AUTOLOAD")
    import fake_kto_plugin_mod

    pm = KTOPluginManager([fake_kto_plugin_mod])
    assert pm.metrics(**metric_kwargs()) == {"ep/loaded": 1.0}
    assert fake_kto_plugin_mod.CALLS == [1]
    assert [name for name, _ in pm.describe()].count("fake") == 1


def test_duplicate_registration_is_refused():
    plugin = Passes()
    with pytest.raises(ValueError, match=r"'test_hooks.Passes' is passed twice"):
        manager(plugin, plugin)
    pm = manager(plugin)
    with pytest.raises(ValueError, match="registered twice"):
        pm.register(plugin)
    assert [name for name, _ in manager(Passes(), Passes()).describe()][:2] == [
        "test_hooks.Passes",
        "test_hooks.Passes#2",
    ]  # two instances are two plugins


def test_plugins_must_be_a_list():
    with pytest.raises(TypeError, match=r"pass \[plugin\]"):
        KTOPluginManager(Passes())


# --- validation at registration and attach ---


class Misspelled:
    @hookimpl
    def kto_los(self, policy_logps):
        return policy_logps


def test_a_misspelled_hook_fails_with_the_list_of_hooks(tokenizer):
    with pytest.raises(
        PluginValidationError, match=r"kto_los.*kto_loss_types, kto_loss, kto_reference_point"
    ):
        KTOPlugin(tokenizer=tokenizer, plugins=[Misspelled()])
    pm = manager()
    with pytest.raises(PluginValidationError, match="kto_los"):
        pm.register(Misspelled())
    assert len(pm.describe()) == 2  # not left half-registered
    pm.check()


def test_check_pending_runs_on_attach(model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path)
    kto.plugins.pm.register(Misspelled())  # behind the manager's back: only attach() can catch it
    with pytest.raises(PluginValidationError, match="kto_los"):
        kto.attach(trainer)
    assert trainer.compute_loss_func is None


def test_a_plugin_registered_after_construction_counts_at_attach(model, tokenizer, rows, tmp_path):
    class KLFreeKTO:
        @hookimpl
        def kto_loss_types(self):
            return {"kto": False}

    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path)
    assert kto.collator.build_kl
    kto.plugins.register(KLFreeKTO())
    kto.attach(trainer)
    assert not kto.collator.build_kl and not kto.loss_hook.needs_kl


def test_an_argument_not_in_the_spec_is_refused():
    class WrongArgument:
        @hookimpl
        def kto_loss(self, policy_logps, chosen_logps):
            return None

    with pytest.raises(
        PluginValidationError, match=r"(?s)'chosen_logps'.*hookspec.*kto_loss\(loss_type, policy_logps"
    ):
        manager(WrongArgument())


def test_wrappers_are_refused():
    class Wrapper:
        @hookimpl(wrapper=True)
        def kto_loss(self):
            result = yield
            return result * 2

    with pytest.raises(PluginValidationError, match=r"'test_hooks.*Wrapper': kto_loss is a wrapper"):
        manager(Wrapper())


def test_a_class_instead_of_an_instance_is_refused():
    with pytest.raises(PluginValidationError, match=r"register an instance, Passes\(\)"):
        manager(Passes)


# --- misbehaving plugins get errors naming the plugin and the hook ---


def _plugin(hook, returns):
    """A plugin named `test_hooks.Bad` whose `hook` returns `returns(arguments)`, or raises what that raises."""
    if hook == "kto_loss":

        def impl(self, loss_type, policy_logps, reference_logps, kl, labels, config):
            return returns(locals())
    elif hook == "kto_loss_types":

        def impl(self, config):
            return returns(locals())
    elif hook == "kto_reference_point":

        def impl(self, policy_kl_logps, reference_kl_logps, config):
            return returns(locals())
    else:

        def impl(self, policy_logps, reference_logps, kl, labels, losses, config):
            return returns(locals())

    impl.__name__ = hook
    return type("Bad", (), {hook: hookimpl(impl)})()


def _raise(kw):
    raise RuntimeError("boom")


BAD = [
    ("kto_loss", _raise, "Plugin 'test_hooks.Bad' raised in kto_loss: RuntimeError: boom"),
    (
        "kto_loss",
        lambda kw: kw["policy_logps"][:3] * 1,
        r"kto_loss for loss_type 'kto' returned shape \(3,\); .*\(4,\)",
    ),
    (
        "kto_loss",
        lambda kw: [0.5] * 4,
        r"kto_loss for loss_type 'kto' returned list; it must return a \(B,\) tensor",
    ),
    ("kto_loss", lambda kw: kw["policy_logps"] * float("nan"), "kto_loss for loss_type 'kto' returned NaN"),
    (
        "kto_loss",
        lambda kw: kw["policy_logps"].detach(),
        "kto_loss for loss_type 'kto' returned a tensor without grad",
    ),
    ("kto_loss_types", lambda kw: ["mine"], "kto_loss_types must return a dict"),
    ("kto_loss_types", lambda kw: {"mine": "yes"}, "kto_loss_types must return a dict .* bool values"),
    ("kto_reference_point", lambda kw: torch.zeros(2), "kto_reference_point must return a scalar tensor"),
    (
        "kto_reference_point",
        lambda kw: torch.tensor(float("inf")),
        "kto_reference_point returned a non-finite",
    ),
    ("kto_reference_point", _raise, "Plugin 'test_hooks.Bad' raised in kto_reference_point"),
    ("kto_metrics", lambda kw: [1.0], "kto_metrics must return a dict {name: number}, got list"),
    ("kto_metrics", lambda kw: {"m": "high"}, "kto_metrics value 'm' is 'high'; it must be a number"),
    ("kto_metrics", lambda kw: {"m": torch.ones(2)}, "kto_metrics value 'm' is tensor"),
    ("kto_metrics", lambda kw: {"m": float("nan")}, "kto_metrics value 'm' is nan; it must be finite"),
    (
        "kto_metrics",
        lambda kw: {"kl": 1.0},
        "kto_metrics returned 'kl', a name kto_plugin or the Trainer already logs",
    ),
    ("kto_metrics", _raise, "Plugin 'test_hooks.Bad' raised in kto_metrics"),
]


@pytest.mark.parametrize("hook,returns,message", BAD, ids=[f"{h}-{i}" for i, (h, _, _) in enumerate(BAD)])
def test_a_misbehaving_plugin_is_named_with_its_hook(hook, returns, message):
    pm = manager(_plugin(hook, returns))
    call = {
        "kto_loss": lambda: pm.loss(**hook_kwargs()),
        "kto_loss_types": lambda: pm.loss_types(KTOConfig()),
        "kto_reference_point": lambda: pm.reference_point(
            policy_kl_logps=torch.zeros(4), reference_kl_logps=torch.zeros(4), config=KTOConfig()
        ),
        "kto_metrics": lambda: pm.metrics(**metric_kwargs()),
    }[hook]
    with pytest.raises(PluginError, match=message) as info:
        call()
    assert "'test_hooks.Bad'" in str(info.value) and hook in str(info.value)


def test_nan_losses_from_nan_inputs_are_passed_on():
    pm = manager(_plugin("kto_loss", lambda kw: kw["policy_logps"] * 1))
    kw = hook_kwargs()
    kw["reference_logps"] = torch.tensor([float("nan"), 0.0, 0.0, 0.0])
    assert pm.loss(**kw).shape == (4,)  # the plugin did not cause it; the loss itself reports NaN


def test_metric_names_must_not_change_between_calls():
    calls = []
    pm = manager(
        _plugin("kto_metrics", lambda kw: calls.append(1) or ({"a": 1.0} if len(calls) == 1 else {"b": 1.0}))
    )
    assert pm.metrics(**metric_kwargs()) == {"a": 1.0}
    with pytest.raises(
        PluginError, match=r"'test_hooks.Bad': kto_metrics returned the names \['b'\] after \['a'\]"
    ):
        pm.metrics(**metric_kwargs())


def test_an_error_in_training_names_the_plugin(model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(
        model, tokenizer, rows, tmp_path, plugin_kwargs={"plugins": [_plugin("kto_loss", _raise)]}
    )
    kto.attach(trainer)
    with pytest.raises(PluginError, match="Plugin 'test_hooks.Bad' raised in kto_loss: RuntimeError: boom"):
        trainer.train()


def test_unknown_loss_type_lists_plugin_provided_ones(tokenizer):
    with pytest.raises(
        ValueError,
        match=r"Unknown KTOConfig.loss_type 'lgosig'. Available: "
        r"\['apo_zero_unpaired', 'kto', 'logsig'\]",
    ):
        KTOPlugin(KTOConfig(loss_type="lgosig"), tokenizer=tokenizer, plugins=[LogSigmoid()])


# --- in training ---


def _train_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


def test_custom_loss_is_what_the_trainer_optimises(model, tokenizer, rows, tmp_path):
    recorder = Recorder()
    kto, trainer = kto_trainer(
        model,
        tokenizer,
        rows,
        tmp_path,
        max_steps=3,
        kto_kwargs={"loss_type": "logsig", "beta": BETA, "desirable_weight": 1.5},
        plugin_kwargs={"plugins": [LogSigmoid(), recorder]},
    )
    kto.attach(trainer)
    trainer.train()
    logs = _train_logs(trainer)
    # step 1: policy == reference, so r = 0 and z0 = 0: every loss is -log sigmoid(0) = log 2
    assert recorder.seen[0]["losses"].tolist() == pytest.approx([math.log(2)] * 4, abs=1e-6)
    assert recorder.seen[0]["kl"].item() == 0.0
    n_desirable = int(recorder.seen[0]["labels"].sum())
    assert 0 < n_desirable < 4
    assert logs[0]["loss"] == pytest.approx(math.log(2) * (1.5 * n_desirable + 4 - n_desirable) / 4, rel=1e-6)
    # later steps: the logged loss is the weighted mean of the formula applied to what the hooks received
    for step, seen in enumerate(recorder.seen):
        r = seen["policy"] - seen["reference"]
        z0, labels = seen["kl"].item(), seen["labels"]
        by_hand = [
            math.log1p(math.exp(-BETA * ((ri - z0) if d else (z0 - ri))))
            for ri, d in zip(r.tolist(), labels, strict=True)
        ]
        weights = [1.5 if d else 1.0 for d in labels]
        assert seen["losses"].tolist() == pytest.approx(by_hand, rel=1e-5)
        assert logs[step]["loss"] == pytest.approx(
            sum(w * v for w, v in zip(weights, by_hand, strict=True)) / 4, rel=1e-5
        )
    assert logs[2]["kl"] == pytest.approx(recorder.seen[2]["kl"].item())


class KLFree:
    """A loss that declares needs_kl=False (the unpaired APO-zero form under another name)."""

    @hookimpl
    def kto_loss_types(self):
        return {"kl_free": False}

    @hookimpl
    def kto_loss(self, loss_type, policy_logps, reference_logps, labels, config):
        if loss_type == "kl_free":
            return kto_loss_fns.apo_zero_unpaired_loss(
                policy_logps, reference_logps, labels, config.beta
            ).losses

    @hookimpl
    def kto_reference_point(self, config):
        if config.loss_type == "kl_free":
            raise AssertionError("kto_reference_point must not be called for a loss that needs no KL")


def _count_forwards(kto, trainer):
    counts = {"policy": 0, "reference": 0}
    trainer.model.register_forward_pre_hook(lambda *a: counts.__setitem__("policy", counts["policy"] + 1))
    kto.reference.ref_model.register_forward_pre_hook(
        lambda *a: counts.__setitem__("reference", counts["reference"] + 1)
    )
    return counts


@pytest.mark.parametrize("loss_type,forwards", [("kl_free", 1), ("kto", 2)])
def test_a_loss_without_kl_skips_the_kl_forward(loss_type, forwards, model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(
        model,
        tokenizer,
        rows,
        tmp_path,
        kto_kwargs={"loss_type": loss_type},
        plugin_kwargs={"plugins": [KLFree()]},
        max_steps=2,
    )
    kto.attach(trainer)
    counts = _count_forwards(kto, trainer)
    batch = kto.collator([trainer.train_dataset[i] for i in range(4)])
    assert ("kl_input_ids" in batch["labels"]) == (forwards == 2)
    trainer.train()
    assert counts == {"policy": 2 * forwards, "reference": 2 * forwards}
    if loss_type == "kl_free":
        assert all(h["kl"] == 0.0 for h in _train_logs(trainer))


def test_a_custom_reference_point_is_used(model, tokenizer, rows, tmp_path):
    class FixedZ0:
        seen = []

        @hookimpl
        def kto_reference_point(self, policy_kl_logps, reference_kl_logps):
            self.seen.append((policy_kl_logps.shape, reference_kl_logps.shape))
            return torch.tensor(7.0)

    recorder = Recorder()
    kto, trainer = kto_trainer(
        model,
        tokenizer,
        rows,
        tmp_path,
        max_steps=1,
        kto_kwargs={"beta": BETA, "desirable_weight": 2.0},
        plugin_kwargs={"plugins": [FixedZ0(), recorder]},
    )
    kto.attach(trainer)
    trainer.train()
    log = _train_logs(trainer)[0]
    assert FixedZ0.seen == [(torch.Size([4]), torch.Size([4]))]
    assert log["kl"] == 7.0 and recorder.seen[0]["kl"].item() == 7.0
    # step 1, r = 0: desirable 1 - sigmoid(beta * (0 - 7)), undesirable 1 - sigmoid(beta * (7 - 0))
    labels = recorder.seen[0]["labels"].tolist()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = sum(2.0 * (1 - sig(-BETA * 7.0)) if d else 1 - sig(BETA * 7.0) for d in labels) / 4
    assert expected != pytest.approx(
        0.5 * (2.0 * labels.count(True) + labels.count(False)) / 4
    )  # z0 = 0 differs
    assert log["loss"] == pytest.approx(expected, rel=1e-6)


class Integrations(TrainerCallback):
    """Stands in for a report_to integration: records what on_log receives."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_custom_metric_is_logged_averaged_and_prefixed_in_eval(model, tokenizer, rows, tmp_path):
    recorder, integration = Recorder(), Integrations()
    kto, trainer = kto_trainer(
        model, tokenizer, rows, tmp_path, max_steps=4, logging_steps=2, plugin_kwargs={"plugins": [recorder]}
    )
    trainer.eval_dataset = trainer.train_dataset.select(range(8))
    trainer.add_callback(integration)
    kto.attach(trainer)
    trainer.train()
    # calls 1..4 in training, logged every 2 steps: the interval means
    assert [h["test/calls"] for h in _train_logs(trainer)] == [1.5, 3.5]
    metrics = trainer.evaluate()  # two eval batches: calls 5 and 6
    assert metrics["eval_test/calls"] == 5.5
    assert trainer.state.log_history[-1]["eval_test/calls"] == 5.5
    assert [h.get("test/calls") for h in integration.logs if "loss" in h] == [1.5, 3.5]
    assert integration.logs[-1]["eval_test/calls"] == 5.5
    assert "test/calls" not in metrics


def test_reserved_metric_names_cover_every_built_in_log_key(model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, max_steps=1)
    trainer.eval_dataset = trainer.train_dataset.select(range(4))
    kto.attach(trainer)
    trainer.train()
    step, summary = trainer.state.log_history[0], trainer.state.log_history[-1]
    assert "kl" in step and "train_runtime" in summary
    eval_keys = {k.removeprefix("eval_") for k in trainer.evaluate()}
    assert "rewards/chosen" in eval_keys
    assert set(step) | set(summary) | eval_keys <= RESERVED_METRIC_NAMES


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_builtin_losses_are_unaffected_by_other_plugins(loss_type, base_model, tokenizer, rows, tmp_path):
    runs = []
    for plugins in ([], [Unrelated(), Passes()]):
        kto, trainer = kto_trainer(
            copy.deepcopy(base_model),
            tokenizer,
            rows,
            tmp_path,
            max_steps=3,
            kto_kwargs={"loss_type": loss_type},
            plugin_kwargs={"plugins": plugins},
        )
        kto.attach(trainer)
        trainer.train()
        weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        logs = [{k: v for k, v in h.items() if k != "unrelated/n"} for h in _train_logs(trainer)]
        runs.append((weights, logs, [h.get("unrelated/n") for h in _train_logs(trainer)]))
    (w_plain, logs_plain, _), (w_plugged, logs_plugged, unrelated) = runs
    assert unrelated == [4.0, 4.0, 4.0]  # the other plugin did run
    assert logs_plain == logs_plugged  # exactly: same numbers, same keys
    assert torch.equal(w_plain, w_plugged)


def test_plugins_are_logged_with_their_source_at_attach(model, tokenizer, rows, tmp_path, caplog):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, plugin_kwargs={"plugins": [LogSigmoid()]})
    with caplog.at_level(logging.INFO, logger="kto_plugin"):
        kto.attach(trainer)
        kto.attach(trainer)  # idempotent: logged once
    lines = [r.getMessage() for r in caplog.records if "plugins:" in r.getMessage()]
    assert len(lines) == 1
    assert (
        "plugins: test_hooks.LogSigmoid [KTOPlugin(plugins=...)], builtin:apo_zero_unpaired [built-in], "
        "builtin:kto [built-in]"
    ) in lines[0]
