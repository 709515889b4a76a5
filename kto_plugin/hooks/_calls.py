"""Calling the hooks: one implementation at a time, so that an error, a wrong type or shape, or a NaN names the
plugin and the hook (`kto_plugin.PluginError`). `HookCalls` is the calling half of `KTOPluginManager`."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from ..errors import PluginError
from ..loss import KTOLossOutput
from ..step._metrics import RESERVED_METRIC_NAMES

HOOK_NAMES = (
    "kto_loss_types", "kto_loss", "kto_reference_point", "kto_metrics",  # the first release's
    "kto_inputs", "kto_log_ratios", "kto_loss_terms", "kto_evaluation_metrics", "kto_state_dict",
    "kto_load_state_dict",
)
# what `kto_inputs` may ask for
OPTIONAL_INPUTS = ("token_logps",)


class LossResult(NamedTuple):
    losses: torch.Tensor  # (B,) as `kto_loss` returned them
    reference_point: torch.Tensor | None  # the `kl` of a returned `KTOLossOutput`, else None


def _with_defaults(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`kwargs` with the arguments added to the hooks after the first release, where a caller of the manager's
    methods did not pass them (so calls written against the first release keep working)."""
    out = dict(kwargs)
    if "log_ratios" not in out and "policy_logps" in out and "reference_logps" in out:
        out["log_ratios"] = out["policy_logps"] - out["reference_logps"]
    if "kl_log_ratios" not in out and "policy_kl_logps" in out and "reference_kl_logps" in out:
        out["kl_log_ratios"] = out["policy_kl_logps"] - out["reference_kl_logps"]
    if "kl" in out:
        out.setdefault("reference_point", out["kl"])
    for name in ("num_tokens", "kl_num_tokens", "policy_token_logps", "reference_token_logps"):
        out.setdefault(name, None)
    out.setdefault("training", False)
    out.setdefault("reduce_sum", _same)
    return out


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _finite(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


class HookCalls:
    """The hook calls of `KTOPluginManager` (which provides ``pm``, ``_sources`` and ``_metric_names``)."""

    pm: Any
    _sources: dict[str, str]
    _metric_names: dict[str, tuple[str, ...]]

    def _impls(self, hook_name: str) -> list[Any]:
        # pluggy keeps implementations in reverse call order
        return list(reversed(getattr(self.pm.hook, hook_name).get_hookimpls()))

    def _call(self, impl: Any, hook_name: str, kwargs: Mapping[str, Any]) -> Any:
        try:
            return impl.function(*[kwargs[a] for a in impl.argnames])
        except Exception as err:
            raise PluginError(
                f"Plugin {impl.plugin_name!r} raised in {hook_name}: {type(err).__name__}: {err}"
            ) from err

    def _builtin(self, impl: Any) -> bool:
        return self._sources.get(impl.plugin_name) == "built-in"

    # --- at construction and attach ---

    def _declared(self, config: Any) -> dict[str, tuple[bool, str]]:
        """{loss_type: (needs_kl, declaring plugin)}, the first plugin called winning a name."""
        merged: dict[str, tuple[bool, str]] = {}
        for impl in self._impls("kto_loss_types"):
            result = self._call(impl, "kto_loss_types", {"config": config})
            if result is None:
                continue
            if not isinstance(result, Mapping) or not all(isinstance(v, bool) for v in result.values()):
                raise PluginError(
                    f"Plugin {impl.plugin_name!r}: kto_loss_types must return a dict {{loss_type: needs_kl}} "
                    f"with bool values, got {result!r}."
                )
            for name, needs_kl in result.items():
                merged.setdefault(str(name), (needs_kl, impl.plugin_name))
        return merged

    def loss_types(self, config: Any) -> dict[str, bool]:
        """Every loss type a plugin implements, with whether it needs the KL pass (first called wins)."""
        return {name: needs_kl for name, (needs_kl, _) in self._declared(config).items()}

    def needs_kl(self, config: Any) -> bool:
        """Whether `config.loss_type` uses the KL reference point; an unknown loss type is an error."""
        types_ = self.loss_types(config)
        if config.loss_type not in types_:
            raise ValueError(
                f"Unknown KTOConfig.loss_type {config.loss_type!r}. Available: {sorted(types_)}. A plugin "
                "adds a loss type by implementing kto_loss_types and kto_loss (see docs/plugins.md, 'Writing a "
                "plugin')."
            )
        return types_[config.loss_type]

    def inputs(self, config: Any) -> set[str]:
        """The optional inputs (`OPTIONAL_INPUTS`) that some plugin asks for under `config` (`kto_inputs`)."""
        wanted: set[str] = set()
        for impl in self._impls("kto_inputs"):
            result = self._call(impl, "kto_inputs", {"config": config})
            if result is None:
                continue
            names = {result} if isinstance(result, str) else set(result)
            unknown = names - set(OPTIONAL_INPUTS)
            if unknown:
                raise PluginError(
                    f"Plugin {impl.plugin_name!r}: kto_inputs asked for {sorted(unknown)}; the optional inputs are "
                    f"{list(OPTIONAL_INPUTS)}."
                )
            wanted |= names
        return wanted

    def check_config(self, config: Any, needs_kl: bool) -> set[str]:
        """Refuse what the configured plugins cannot honour, before any step; returns `inputs(config)`."""
        if config.length_normalize:
            _, declaring = self._declared(config)[config.loss_type]
            for impl in self._impls("kto_loss"):
                if impl.plugin_name == declaring and "log_ratios" not in impl.argnames:
                    raise ValueError(
                        f"KTOConfig.length_normalize=True, but plugin {declaring!r} computes loss_type "
                        f"{config.loss_type!r} without taking log_ratios, so it would ignore the normalisation. "
                        "Compute the loss from the log_ratios argument of kto_loss, or set length_normalize=False."
                    )
        if config.reference_point != "mean" and not needs_kl:
            raise ValueError(
                f"KTOConfig.reference_point={config.reference_point!r} sets z0, but loss_type {config.loss_type!r} "
                "has no KL reference point (needs_kl=False). Use a loss with one (kto, humanline) or the default "
                "reference_point='mean'."
            )
        wanted = self.inputs(config)
        if "token_logps" in wanted and config.precompute_ref_log_probs:
            raise ValueError(
                f"loss_type {config.loss_type!r} (or another registered plugin) needs per-token log-probs, which "
                "precomputed reference log-probs do not keep (they are sums). Set precompute_ref_log_probs=False."
            )
        return wanted

    # --- every micro-batch ---

    def log_ratios(self, **kwargs: Any) -> torch.Tensor | None:
        """First non-None `kto_log_ratios` result, checked for shape and gradient; None: the default."""
        policy = kwargs["policy_logps"]
        impl, result = self._first("kto_log_ratios", kwargs)
        if impl is None:
            return None
        where = f"Plugin {impl.plugin_name!r}: kto_log_ratios"
        if not isinstance(result, torch.Tensor) or result.shape != policy.shape:
            raise PluginError(f"{where} must return a tensor of shape {tuple(policy.shape)}, got {result!r}.")
        tokens = kwargs.get("policy_token_logps")
        with_grad = policy.requires_grad or (tokens is not None and tokens.requires_grad)
        if with_grad and not result.requires_grad:
            raise PluginError(f"{where} returned a tensor without gradient; compute it with torch operations.")
        return result

    def _first(self, hook_name: str, kwargs: Mapping[str, Any]) -> tuple[Any, Any]:
        """(implementation, result) of the first implementation of a firstresult hook that returns something other
        than None; (None, None) when none does."""
        for impl in self._impls(hook_name):
            result = self._call(impl, hook_name, kwargs)
            if result is not None:
                return impl, result
        return None, None

    def loss(self, **kwargs: Any) -> torch.Tensor:
        """The (B,) losses of the first non-None `kto_loss` result (`loss_result`)."""
        return self.loss_result(**kwargs).losses

    def loss_result(self, **kwargs: Any) -> LossResult:
        """First non-None `kto_loss` result, checked for type, shape, gradient and NaN, with the reference point a
        returned `KTOLossOutput` names."""
        kwargs = _with_defaults(kwargs)
        policy = kwargs["policy_logps"]
        impl, result = self._first("kto_loss", kwargs)
        if impl is None:
            raise PluginError(
                f"No plugin computed kto_loss for loss_type {kwargs['loss_type']!r}: every implementation "
                "returned None, although a plugin declared it in kto_loss_types."
            )
        where = f"Plugin {impl.plugin_name!r}: kto_loss for loss_type {kwargs['loss_type']!r}"
        reference_point = None
        if isinstance(result, KTOLossOutput):
            reference_point = torch.as_tensor(result.kl).detach().float().reshape(())
            result = result.losses
        if not isinstance(result, torch.Tensor):
            raise PluginError(
                f"{where} returned {type(result).__name__}; it must return a (B,) tensor or a KTOLossOutput."
            )
        if result.shape != policy.shape:
            raise PluginError(
                f"{where} returned shape {tuple(result.shape)}; it must return one loss per example, "
                f"shape {tuple(policy.shape)}."
            )
        if policy.requires_grad and not result.requires_grad:
            raise PluginError(
                f"{where} returned a tensor without gradient; compute it from policy_logps with torch "
                "operations (no .item(), .detach() or torch.no_grad())."
            )
        if torch.isnan(result).any() and _finite(policy, kwargs["reference_logps"], kwargs["kl"],
                                                  kwargs.get("log_ratios")):
            raise PluginError(f"{where} returned NaN for finite inputs (losses {result.detach().tolist()}).")
        return LossResult(result, reference_point)

    def reference_point(self, **kwargs: Any) -> torch.Tensor | None:
        """First non-None `kto_reference_point` result (a scalar tensor, finite for finite pairs), or None for the
        default."""
        kwargs = _with_defaults(kwargs)
        impl, result = self._first("kto_reference_point", kwargs)
        if impl is None:
            return None
        where = f"Plugin {impl.plugin_name!r}: kto_reference_point"
        if not isinstance(result, torch.Tensor) or result.numel() != 1:
            raise PluginError(f"{where} must return a scalar tensor, got {result!r}.")
        if not torch.isfinite(result).all() and _finite(kwargs.get("kl_log_ratios")):
            raise PluginError(f"{where} returned a non-finite reference point {result.item()}.")
        return result.reshape(())

    def loss_terms(self, **kwargs: Any) -> dict[str, torch.Tensor]:
        """`kto_loss_terms` of every plugin, merged: scalar tensors, with a gradient where the loss has one."""
        kwargs = _with_defaults(kwargs)
        merged: dict[str, torch.Tensor] = {}
        for impl in self._impls("kto_loss_terms"):
            result = self._named(impl, "kto_loss_terms", self._call(impl, "kto_loss_terms", kwargs))
            where = f"Plugin {impl.plugin_name!r}: kto_loss_terms"
            for key, value in result.items():
                if not isinstance(value, torch.Tensor) or value.numel() != 1:
                    raise PluginError(f"{where} value {key!r} must be a scalar tensor, got {value!r}.")
                if kwargs["policy_logps"].requires_grad and not value.requires_grad:
                    raise PluginError(f"{where} value {key!r} has no gradient; compute it with torch operations.")
                if not torch.isfinite(value) and _finite(kwargs["policy_logps"], kwargs["reference_logps"]):
                    raise PluginError(f"{where} value {key!r} is {value.item()} for finite inputs.")
                merged.setdefault(key, value.reshape(()))
        return merged

    def metrics(self, **kwargs: Any) -> dict[str, float]:
        """`kto_metrics` results of every plugin, merged (earlier-called plugins win a name).

        Each plugin must return the same names on every call: the values are all-reduced across processes in
        one call, so a name missing on one process would desynchronise them.
        """
        kwargs = _with_defaults(kwargs)
        merged: dict[str, float] = {}
        for impl in self._impls("kto_metrics"):
            result = self._named(impl, "kto_metrics", self._call(impl, "kto_metrics", kwargs))
            for key, value in self._numbers(impl, "kto_metrics", result).items():
                merged.setdefault(key, value)
        return merged

    def evaluation_metrics(self, **kwargs: Any) -> dict[str, float]:
        """`kto_evaluation_metrics` of every plugin, merged (earlier-called plugins win a name)."""
        merged: dict[str, float] = {}
        for impl in self._impls("kto_evaluation_metrics"):
            result = self._call(impl, "kto_evaluation_metrics", kwargs)
            for key, value in self._numbers(impl, "kto_evaluation_metrics", result).items():
                merged.setdefault(key, value)
        return merged

    def _named(self, impl: Any, hook_name: str, result: Any) -> Mapping[str, Any]:
        """`result` as a mapping that has the names this plugin returned the first time."""
        where = f"Plugin {impl.plugin_name!r}: {hook_name}"
        result = {} if result is None else result
        if not isinstance(result, Mapping):
            raise PluginError(f"{where} must return a dict {{name: number}}, got {type(result).__name__}.")
        names = tuple(sorted(str(k) for k in result))
        key = impl.plugin_name if hook_name == "kto_metrics" else f"{impl.plugin_name}:{hook_name}"
        previous = self._metric_names.setdefault(key, names)
        if names != previous:
            raise PluginError(
                f"{where} returned the names {list(names)} after {list(previous)}; it must return the "
                "same names on every call (they are reduced across processes in one all-reduce). Return "
                "0.0 where a value is undefined."
            )
        for name in names:
            self._check_name(impl, where, name)
        return {str(k): v for k, v in result.items()}

    def _check_name(self, impl: Any, where: str, name: str) -> None:
        if name in RESERVED_METRIC_NAMES and not self._builtin(impl):
            raise PluginError(
                f"{where} returned {name!r}, a name kto_plugin or the Trainer already logs; "
                "rename it (e.g. with a prefix of your own)."
            )

    def _numbers(self, impl: Any, hook_name: str, result: Any) -> dict[str, float]:
        where = f"Plugin {impl.plugin_name!r}: {hook_name}"
        if result is None:
            return {}
        if not isinstance(result, Mapping):
            raise PluginError(f"{where} must return a dict {{name: number}}, got {type(result).__name__}.")
        out = {}
        for key, value in result.items():
            self._check_name(impl, where, str(key))
            number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise PluginError(f"{where} value {key!r} is {value!r}; it must be a number.")
            if not math.isfinite(number):
                raise PluginError(f"{where} value {key!r} is {number}; it must be finite.")
            out[str(key)] = float(number)
        return out

    # --- checkpoints ---

    def state_dict(self) -> dict[str, Any]:
        """{plugin name: its `kto_state_dict`} of every plugin with state, checked to be JSON-serialisable."""
        states = {}
        for impl in self._impls("kto_state_dict"):
            state = self._call(impl, "kto_state_dict", {})
            if state is None:
                continue
            try:
                json.dumps(state, allow_nan=False)
            except (TypeError, ValueError) as err:
                raise PluginError(
                    f"Plugin {impl.plugin_name!r}: kto_state_dict must return JSON-serialisable, finite values "
                    f"(numbers, strings, lists, dicts): {err}."
                ) from None
            states[impl.plugin_name] = state
        return states

    def load_state_dict(self, states: Mapping[str, Any] | None) -> None:
        """Give every plugin with `kto_load_state_dict` its saved state (None: start afresh). A checkpoint that holds
        the state of a plugin not registered now is refused: resuming without it would not be exact."""
        states = dict(states or {})
        for impl in self._impls("kto_load_state_dict"):
            self._call(impl, "kto_load_state_dict", {"state": states.pop(impl.plugin_name, None)})
        if states:
            raise ValueError(
                f"The checkpoint holds the state of plugin(s) {sorted(states)}, which are not registered now, so the "
                "run could not resume exactly. Pass the same plugins (KTOPlugin(plugins=[...]) or installed ones) "
                "as in the run that wrote it."
            )
