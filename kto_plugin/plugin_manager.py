"""The pluggy plugin manager: where plugins come from, in which order they are called, and what they may return.

Order: plugins passed to `KTOPlugin(plugins=...)` and entry-point plugins are called before the built-ins
(which are `trylast`), later registrations before earlier ones (pluggy's LIFO). Hooks are called here one
implementation at a time, so an error, a wrong shape or a NaN names the plugin and the hook.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import pluggy
import torch

from . import hookspecs
from ._builtin_plugins import BUILTIN_PLUGINS
from .hookspecs import PROJECT

logger = logging.getLogger("kto_plugin")

AUTOLOAD_ENV = "KTO_PLUGIN_DISABLE_AUTOLOAD"
_CALLED_HOOKS = ("kto_loss_types", "kto_loss", "kto_reference_point", "kto_metrics")


class PluginError(RuntimeError):
    """A plugin raised, or returned something kto_plugin cannot use."""


def _autoload_disabled() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


class KTOPluginManager:
    """Loads plugins once and calls the KTO hooks.

    Args:
        plugins: objects or modules with `@kto_plugin.hookimpl` methods/functions.
        autoload: load installed packages' entry points in group ``kto_plugin``; default: unless the
            environment variable ``KTO_PLUGIN_DISABLE_AUTOLOAD`` is set (as pytest's
            PYTEST_DISABLE_PLUGIN_AUTOLOAD).
    """

    def __init__(self, plugins: Iterable[Any] = (), autoload: bool | None = None) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.sources: dict[str, str] = {}
        for cls in BUILTIN_PLUGINS:
            name = f"builtin:{cls.name}"
            self.pm.register(cls(), name=name)
            self.sources[name] = "built-in"
        if autoload is None:
            autoload = not _autoload_disabled()
        if autoload:
            self.pm.load_setuptools_entrypoints(PROJECT)
            for plugin, dist in self.pm.list_plugin_distinfo():
                name = self.pm.get_name(plugin)
                self.sources[name] = f"entry point of {dist.metadata['name']} {dist.version}"
        for plugin in plugins:
            self.register(plugin, source="KTOPlugin(plugins=...)")
        self.check()

    def register(self, plugin: Any, source: str = "register()") -> str:
        """Register one more plugin object or module; returns its name."""
        if self.pm.is_registered(plugin):
            raise ValueError(
                f"Plugin {plugin!r} is registered twice (as {self.pm.get_name(plugin)!r}). Pass each plugin once."
            )
        name = self.pm.register(plugin)
        if name is None:  # blocked
            raise ValueError(f"Plugin {plugin!r} is blocked and was not registered.")
        self.sources[name] = source
        return name

    def check(self) -> None:
        """Fail on implementations that match no hook (a misspelled name) or use unsupported wrappers."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as err:
            known = ", ".join(sorted(n for n in dir(hookspecs) if n.startswith("kto_")))
            raise PluginValidationError(
                f"{err}. kto_plugin's hooks are: {known}. Check the spelling of the function name."
            ) from None
        for hook_name in _CALLED_HOOKS:
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.wrapper or impl.hookwrapper:
                    raise PluginValidationError(
                        f"Plugin {impl.plugin_name!r}: {hook_name} is a wrapper, which kto_plugin does not call. "
                        "Implement the hook itself; to modify a built-in loss, call kto_plugin.loss.kto_loss from "
                        "your implementation."
                    )

    def describe(self) -> list[tuple[str, str]]:
        """(name, source) of every registered plugin, in call order."""
        names = [self.pm.get_name(p) for p in self.pm.get_plugins()]
        order = {impl.plugin_name: i for i, impl in enumerate(reversed(self.pm.hook.kto_loss.get_hookimpls()))}
        names.sort(key=lambda n: order.get(n, -1))
        return [(n, self.sources.get(n, "unknown")) for n in names]

    def _impls(self, hook_name: str) -> list[Any]:
        return list(reversed(getattr(self.pm.hook, hook_name).get_hookimpls()))

    def _call(self, impl: Any, hook_name: str, kwargs: Mapping[str, Any]) -> Any:
        try:
            return impl.function(*[kwargs[a] for a in impl.argnames])
        except Exception as err:
            raise PluginError(f"Plugin {impl.plugin_name!r} raised in {hook_name}: {type(err).__name__}: {err}") from err

    # --- hooks ---

    def loss_types(self, config: Any) -> dict[str, bool]:
        """Every loss type a plugin implements, with whether it needs the KL pass."""
        merged: dict[str, bool] = {}
        for impl in self._impls("kto_loss_types"):
            result = self._call(impl, "kto_loss_types", {"config": config})
            if result is None:
                continue
            if not isinstance(result, Mapping):
                raise PluginError(
                    f"Plugin {impl.plugin_name!r}: kto_loss_types must return a dict {{loss_type: needs_kl}}, got "
                    f"{type(result).__name__}."
                )
            for name, needs_kl in result.items():
                merged.setdefault(str(name), bool(needs_kl))
        return merged

    def needs_kl(self, config: Any) -> bool:
        """Whether `config.loss_type` uses the KL reference point; an unknown loss type is an error."""
        types = self.loss_types(config)
        if config.loss_type not in types:
            raise ValueError(
                f"Unknown KTOConfig.loss_type {config.loss_type!r}. Available: {sorted(types)}. A plugin adds a loss "
                "type by implementing kto_loss_types and kto_loss (see the README, 'Writing a plugin')."
            )
        return types[config.loss_type]

    def loss(self, **kwargs: Any) -> torch.Tensor:
        """First non-None `kto_loss` result, checked for shape and NaN."""
        policy = kwargs["policy_logps"]
        for impl in self._impls("kto_loss"):
            result = self._call(impl, "kto_loss", kwargs)
            if result is None:
                continue
            where = f"Plugin {impl.plugin_name!r}: kto_loss for loss_type {kwargs['loss_type']!r}"
            if not isinstance(result, torch.Tensor):
                raise PluginError(f"{where} returned {type(result).__name__}; it must return a (B,) tensor.")
            if result.shape != policy.shape:
                raise PluginError(
                    f"{where} returned shape {tuple(result.shape)}; it must return one loss per example, "
                    f"shape {tuple(policy.shape)}."
                )
            if torch.isnan(result).any() and torch.isfinite(policy).all() and torch.isfinite(kwargs["reference_logps"]).all():
                raise PluginError(f"{where} returned NaN for finite inputs (losses {result.detach().tolist()}).")
            return result
        raise PluginError(f"No plugin computed kto_loss for loss_type {kwargs['loss_type']!r}.")

    def reference_point(self, **kwargs: Any) -> torch.Tensor | None:
        """First non-None `kto_reference_point` result (a finite scalar tensor), or None for the default."""
        for impl in self._impls("kto_reference_point"):
            result = self._call(impl, "kto_reference_point", kwargs)
            if result is None:
                continue
            where = f"Plugin {impl.plugin_name!r}: kto_reference_point"
            if not isinstance(result, torch.Tensor) or result.numel() != 1:
                raise PluginError(f"{where} must return a scalar tensor, got {result!r}.")
            if not torch.isfinite(result).all():
                raise PluginError(f"{where} returned a non-finite reference point {result.item()}.")
            return result.reshape(())
        return None

    def metrics(self, **kwargs: Any) -> dict[str, float]:
        """`kto_metrics` results of every plugin, merged (earlier-called plugins win a name)."""
        merged: dict[str, float] = {}
        for impl in self._impls("kto_metrics"):
            result = self._call(impl, "kto_metrics", kwargs)
            if result is None:
                continue
            if not isinstance(result, Mapping):
                raise PluginError(
                    f"Plugin {impl.plugin_name!r}: kto_metrics must return a dict {{name: number}}, got "
                    f"{type(result).__name__}."
                )
            for key, value in result.items():
                number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
                if isinstance(number, bool) or not isinstance(number, (int, float)):
                    raise PluginError(
                        f"Plugin {impl.plugin_name!r}: kto_metrics value {key!r} is {value!r}; it must be a number."
                    )
                if not math.isfinite(number):
                    raise PluginError(f"Plugin {impl.plugin_name!r}: kto_metrics value {key!r} is {number}.")
                merged.setdefault(str(key), float(number))
        return merged


class PluginValidationError(ValueError):
    """A plugin does not fit the hook specifications (misspelled hook, wrong arguments, wrapper)."""
