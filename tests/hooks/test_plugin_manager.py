"""The plugin manager (plugin_manager.py): where plugins come from and in which order they are called,
validation at registration, and errors that name the plugin and the hook."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
import torch.nn.functional as F

from kto_plugin import KTOConfig, KTOPlugin, KTOPluginManager, PluginError, PluginValidationError, hookimpl
from kto_plugin import loss as kto_loss_fns
from kto_plugin.step._metrics import FAMILY_NAMES

BETA = 0.1
# the built-in plugins (the KTO family), in the order they are called: after every other plugin
BUILTINS = [
    "builtin:reward_metrics", "builtin:sft_term", "builtin:ema", "builtin:positive_mean", "builtin:humanline",
    "builtin:bco", "builtin:apo_zero_unpaired", "builtin:kto",
]


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


def plugin_metrics(pm):
    """`pm.metrics` without the built-in family's own metrics (the reward accuracy every run logs)."""
    return {k: v for k, v in pm.metrics(**metric_kwargs()).items() if k not in FAMILY_NAMES}


# --- order and fall-through ---


def test_passed_plugins_are_called_in_list_order_before_the_builtins():
    first, second = Constant(1.0), Constant(2.0)
    pm = manager(first, second)
    assert pm.loss(**hook_kwargs()).tolist() == [1.0] * 4
    assert pm.loss(**hook_kwargs("apo_zero_unpaired")).tolist() == [1.0] * 4  # Constant ignores loss_type
    names = [name for name, _ in pm.describe()]
    assert names == ["test_plugin_manager.Constant", "test_plugin_manager.Constant#2", *BUILTINS]
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
    assert plugin_metrics(pm) == {}
    assert pm.loss_types(KTOConfig()) == {"kto": True, "apo_zero_unpaired": False, "bco": False, "humanline": True}


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
    assert plugin_metrics(pm) == {"ep/loaded": 1.0}
    assert plugin_metrics(KTOPluginManager(autoload=False)) == {}  # the argument overrides


def test_entry_point_plugins_come_after_passed_plugins_and_before_builtins(install_fake, monkeypatch):
    install_fake("fake-kto-plugin", "fake_kto_plugin_mod", "fake")
    monkeypatch.delenv("KTO_PLUGIN_DISABLE_AUTOLOAD")
    names = [name for name, _ in KTOPluginManager([Passes()]).describe()]
    assert names == ["test_plugin_manager.Passes", "fake", *BUILTINS]


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
    metrics = plugin_metrics(pm)
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
    assert plugin_metrics(pm) == {"ep/loaded": 1.0}
    assert fake_kto_plugin_mod.CALLS == [1]
    assert [name for name, _ in pm.describe()].count("fake") == 1


def test_duplicate_registration_is_refused():
    plugin = Passes()
    with pytest.raises(ValueError, match=r"'test_plugin_manager.Passes' is passed twice"):
        manager(plugin, plugin)
    pm = manager(plugin)
    with pytest.raises(ValueError, match="registered twice"):
        pm.register(plugin)
    assert [name for name, _ in manager(Passes(), Passes()).describe()][:2] == [
        "test_plugin_manager.Passes",
        "test_plugin_manager.Passes#2",
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
    assert len(pm.describe()) == len(BUILTINS)  # not left half-registered
    pm.check()


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

    with pytest.raises(PluginValidationError, match=r"'test_plugin_manager.*Wrapper': kto_loss is a wrapper"):
        manager(Wrapper())


def test_a_class_instead_of_an_instance_is_refused():
    with pytest.raises(PluginValidationError, match=r"register an instance, Passes\(\)"):
        manager(Passes)


# --- misbehaving plugins get errors naming the plugin and the hook ---


def _plugin(hook, returns):
    """A plugin `test_plugin_manager.Bad` whose `hook` returns `returns(arguments)` or raises."""
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
    ("kto_loss", _raise, "Plugin 'test_plugin_manager.Bad' raised in kto_loss: RuntimeError: boom"),
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
    ("kto_reference_point", _raise, "Plugin 'test_plugin_manager.Bad' raised in kto_reference_point"),
    ("kto_metrics", lambda kw: [1.0], "kto_metrics must return a dict {name: number}, got list"),
    ("kto_metrics", lambda kw: {"m": "high"}, "kto_metrics value 'm' is 'high'; it must be a number"),
    ("kto_metrics", lambda kw: {"m": torch.ones(2)}, "kto_metrics value 'm' is tensor"),
    ("kto_metrics", lambda kw: {"m": float("nan")}, "kto_metrics value 'm' is nan; it must be finite"),
    (
        "kto_metrics",
        lambda kw: {"kl": 1.0},
        "kto_metrics returned 'kl', a name kto_plugin or the Trainer already logs",
    ),
    ("kto_metrics", _raise, "Plugin 'test_plugin_manager.Bad' raised in kto_metrics"),
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
    assert "'test_plugin_manager.Bad'" in str(info.value) and hook in str(info.value)


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
    assert plugin_metrics(pm) == {"a": 1.0}
    with pytest.raises(
        PluginError, match=r"'test_plugin_manager.Bad': kto_metrics returned the names \['b'\] after \['a'\]"
    ):
        pm.metrics(**metric_kwargs())


def test_unknown_loss_type_lists_plugin_provided_ones(tokenizer):
    with pytest.raises(
        ValueError,
        match=r"Unknown KTOConfig.loss_type 'lgosig'. Available: "
        r"\['apo_zero_unpaired', 'bco', 'humanline', 'kto', 'logsig'\]",
    ):
        KTOPlugin(KTOConfig(loss_type="lgosig"), tokenizer=tokenizer, plugins=[LogSigmoid()])
