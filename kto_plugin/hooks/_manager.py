"""The pluggy plugin manager: where plugins come from, in which order they are called, what they may return.

Sources, in registration order: the built-ins (the KTO family of `kto_plugin.hooks._builtin`, all `trylast`),
installed packages' entry points in group ``kto_plugin`` (loaded once, when the manager is built, unless the environment variable
``KTO_PLUGIN_DISABLE_AUTOLOAD`` is set), then the plugins passed to `KTOPlugin(plugins=...)`, last to first.
pluggy calls later registrations first, so the call order is: the passed plugins in list order, the installed
ones, the built-ins. Calling the hooks and checking what they return is `kto_plugin.hooks._calls` (`HookCalls`,
which the manager inherits).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import os
import types
from collections.abc import Iterable
from typing import Any

import pluggy

from .. import hookspecs
from ..errors import PluginError, PluginValidationError
from ..hookspecs import PROJECT
from ._builtin import BUILTIN_PLUGINS
from ._calls import HOOK_NAMES, HookCalls

logger = logging.getLogger("kto_plugin")

AUTOLOAD_ENV = "KTO_PLUGIN_DISABLE_AUTOLOAD"

def autoload_disabled() -> bool:
    """True when ``KTO_PLUGIN_DISABLE_AUTOLOAD`` is set to anything but "", "0", "false" or "no"."""
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _readable_name(plugin: Any) -> str:
    if isinstance(plugin, types.ModuleType):
        return plugin.__name__
    cls = plugin if inspect.isclass(plugin) else type(plugin)
    return f"{cls.__module__}.{cls.__qualname__}"


def _needs_instance(plugin: Any) -> bool:
    """A class whose hook implementations are plain methods: pluggy would call them without `self`."""
    if not inspect.isclass(plugin):
        return False
    for name in HOOK_NAMES:
        attr = inspect.getattr_static(plugin, name, None)
        if inspect.isfunction(attr):
            return True
    return False


class KTOPluginManager(HookCalls):
    """Loads plugins once and calls the KTO hooks.

    Args:
        plugins: objects or modules with `@kto_plugin.hookimpl` methods/functions, called in list order
            (before entry-point plugins and the built-ins).
        autoload: load installed packages' entry points in group ``kto_plugin``; default: unless the
            environment variable ``KTO_PLUGIN_DISABLE_AUTOLOAD`` is set (as pytest's
            PYTEST_DISABLE_PLUGIN_AUTOLOAD).
    """

    def __init__(self, plugins: Iterable[Any] = (), autoload: bool | None = None) -> None:
        if isinstance(plugins, (str, bytes, types.ModuleType)) or not isinstance(plugins, Iterable):
            raise TypeError(
                f"plugins must be a list of plugin objects or modules, got {plugins!r}: pass [plugin]."
            )
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._sources: dict[str, str] = {}  # name -> where it came from, in registration order
        # plugin name -> the metric names its kto_metrics returned first
        self._metric_names: dict[str, tuple[str, ...]] = {}
        for cls in BUILTIN_PLUGINS:
            self._register(cls(), f"builtin:{cls.name}", "built-in")
        if autoload is None:
            autoload = not autoload_disabled()
        if autoload:
            self._load_entry_points()
        plugins = list(plugins)
        names: list[str] = []
        # named in list order and registered last to first, so that they are called first to last
        for i, plugin in enumerate(plugins):
            if any(plugin is other for other in plugins[:i]):
                raise ValueError(
                    f"Plugin {_readable_name(plugin)!r} is passed twice in plugins=[...]. Pass it once."
                )
            names.append(self._free_name(_readable_name(plugin), taken=names))
        for plugin, name in reversed(list(zip(plugins, names, strict=True))):
            self.register(plugin, source="KTOPlugin(plugins=...)", name=name)
        self.check()

    # --- pickling (Ray Tune pickles the Trainer, and with it the attached plugin) ---

    def __getstate__(self) -> dict[str, Any]:
        """The plugins in registration order (modules by name: a module object does not pickle) and their
        `kto_state_dict`; pluggy's manager is rebuilt from them on unpickling."""
        registered = []
        for name, source in self._sources.items():
            plugin = self.pm.get_plugin(name)
            if plugin is None or source == "built-in":
                continue
            ref = ("module", plugin.__name__) if isinstance(plugin, types.ModuleType) else ("object", plugin)
            registered.append((ref, name, source))
        return {"registered": registered, "metric_names": self._metric_names, "states": self.state_dict()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._sources = {}
        self._metric_names = dict(state["metric_names"])
        for cls in BUILTIN_PLUGINS:
            self._register(cls(), f"builtin:{cls.name}", "built-in")
        for (kind, plugin), name, source in state["registered"]:
            self._register(importlib.import_module(plugin) if kind == "module" else plugin, name, source)
        self.load_state_dict(state.get("states"))  # the built-ins are new objects: give them their state back

    # --- registration ---

    def _load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=PROJECT):
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "an unknown distribution"
            if self.pm.has_plugin(ep.name):
                logger.warning(
                    "kto_plugin: skipping entry point %r of %s: a plugin named %r is already loaded (%s).",
                    ep.name,
                    dist,
                    ep.name,
                    self._sources.get(ep.name),
                )
                continue
            try:
                plugin = ep.load()
            except Exception as err:
                raise PluginError(
                    f"The kto_plugin entry point {ep.name!r} = {ep.value!r} of {dist} failed to load: "
                    f"{type(err).__name__}: {err}. Fix or uninstall that package, or set {AUTOLOAD_ENV}=1 to "
                    "skip installed plugins."
                ) from err
            self._register(plugin, ep.name, f"entry point {ep.name!r} of {dist}")

    def _register(self, plugin: Any, name: str, source: str) -> str:
        if _needs_instance(plugin):
            raise PluginValidationError(
                f"Plugin {_readable_name(plugin)!r} ({source}) is a class whose hooks are methods: register "
                f"an instance, {plugin.__name__}(), not the class."
            )
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as err:
            raise PluginValidationError(
                f"{err} (plugin from {source})\nAn implementation may take any subset of its hook's arguments: "
                + "; ".join(f"{h}({', '.join(getattr(self.pm.hook, h).spec.argnames)})" for h in HOOK_NAMES)
            ) from None
        self._sources[name] = source
        return name

    def _free_name(self, base: str, taken: Iterable[str] = ()) -> str:
        taken = set(taken)
        name, n = base, 1
        while name in taken or self.pm.has_plugin(name):  # another instance of the same class
            n += 1
            name = f"{base}#{n}"
        return name

    def register(self, plugin: Any, source: str = "register()", name: str | None = None) -> str:
        """Register one more plugin object or module, called before those registered earlier; returns its name
        (the module name, or the class path for an object).

        A plugin already loaded from an entry point is not registered again (it would be called twice); any
        other object registered twice is an error.
        """
        if self.pm.is_registered(plugin):
            name = self.pm.get_name(plugin)
            if self._sources.get(name, "").startswith("entry point"):
                logger.info(
                    "kto_plugin: %r is already loaded from its %s; not registering it again.",
                    name,
                    self._sources[name],
                )
                return name
            raise ValueError(
                f"Plugin {name!r} is registered twice ({self._sources.get(name)} and {source}). Pass each "
                "plugin once."
            )
        name = self._free_name(name or _readable_name(plugin))
        self._register(plugin, name, source)
        try:
            self.check()
        except PluginValidationError:
            self.pm.unregister(plugin)
            del self._sources[name]
            raise
        return name

    def check(self) -> None:
        """Fail on implementations that match no hook (a misspelled name) or use unsupported wrappers."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as err:
            raise PluginValidationError(
                f"{err}. kto_plugin's hooks are: {', '.join(HOOK_NAMES)}. Check the spelling of the function "
                "name."
            ) from None
        for hook_name in HOOK_NAMES:
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.wrapper or impl.hookwrapper:
                    raise PluginValidationError(
                        f"Plugin {impl.plugin_name!r}: {hook_name} is a wrapper, which kto_plugin does not "
                        "call. Implement the hook itself; to modify a built-in loss, call "
                        "kto_plugin.loss.kto_loss from your implementation."
                    )

    def describe(self) -> list[tuple[str, str]]:
        """(name, source) of every registered plugin, most recently registered (first called) first."""
        return [
            (name, source) for name, source in reversed(self._sources.items()) if self.pm.has_plugin(name)
        ]
