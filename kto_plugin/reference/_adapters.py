"""The PEFT adapters of a policy, seen through one small interface whatever holds them.

Two hosts carry adapters:

* a `peft.PeftModel` (``get_peft_model``, ``PeftModel.from_pretrained``): switched with its own public API,
  ``disable_adapter()`` and ``set_adapter(name)``;
* a transformers `PreTrainedModel` whose adapters were injected by transformers' PEFT integration
  (``model.load_adapter(path)``), with no `PeftModel` wrapper. transformers 5.24's ``disable_adapters()``,
  ``enable_adapters()``, ``set_adapter()`` and ``active_adapters()`` refuse any peft older than 0.22, and the
  newest peft released today is 0.21.2, so they cannot be called on this stack. They only loop over peft's
  tuner layers (`BaseTunerLayer`, `AuxiliaryTrainingWrapper`) calling the layers' own public
  ``enable_adapters`` / ``set_adapter``; we do the same loop, and restore every layer's exact state on exit.

Every switch here changes ``requires_grad`` of adapter weights as a side effect (peft's layers do that);
callers wrap them in `kto_plugin.reference._manager.preserved_state`, which restores every flag.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def _tuner_classes() -> tuple[type, ...]:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return (BaseTunerLayer, AuxiliaryTrainingWrapper)


def is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


class AdapterHost:
    """The adapters of `model` (a `PeftModel`, or a `PreTrainedModel` with integration-loaded adapters).

    Use `AdapterHost.of(model)`, which returns None for a model without adapters.
    """

    def __init__(self, model: nn.Module, kind: str) -> None:
        self.model = model
        self.kind = kind  # "peft" or "transformers"

    @classmethod
    def of(cls, model: Any) -> AdapterHost | None:
        if is_peft_model(model):
            return cls(model, "peft")
        if getattr(model, "_hf_peft_config_loaded", False) and getattr(model, "peft_config", None):
            return cls(model, "transformers")
        return None

    # --- what is there ---

    @property
    def names(self) -> list[str]:
        return list(self.model.peft_config)

    def config(self, name: str) -> Any:
        return self.model.peft_config[name]

    def layers(self) -> list[nn.Module]:
        """peft's tuner layers and auxiliary wrappers (modules_to_save, trainable tokens) inside the model."""
        classes = _tuner_classes()
        return [m for m in self.model.modules() if isinstance(m, classes)]

    @property
    def active(self) -> list[str]:
        """The adapter(s) the policy trains and runs with."""
        if self.kind == "peft":
            return list(self.model.active_adapters)
        from peft.tuners.tuners_utils import BaseTunerLayer

        for layer in self.layers():
            if isinstance(layer, BaseTunerLayer):
                return list(layer.active_adapters)
        return []

    def merged(self) -> list[str]:
        """Names of adapters merged into the base weights (`merge_adapter()`), empty when none is."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        names: set[str] = set()
        for layer in self.layers():
            if isinstance(layer, BaseTunerLayer):
                names.update(layer.merged_adapters)
        return sorted(names)

    def is_prompt_learning(self, name: str) -> bool:
        config = self.config(name)
        return bool(
            getattr(config, "is_prompt_learning", False) or getattr(config, "is_adaption_prompt", False)
        )

    def parameters_of(self, name: str) -> dict[str, nn.Parameter]:
        """The parameters that belong to adapter `name`, by qualified name (`...lora_A.<name>.weight`)."""
        token = f".{name}."
        return {n: p for n, p in self.model.named_parameters() if token in f".{n}."}

    # --- does an adapter change the output at all ---

    def is_noop(self, name: str) -> tuple[bool, str]:
        """Whether adapter `name` provably leaves every output unchanged, and why (or why not).

        Proven only for plain LoRA: every adapted layer has an all-zero ``lora_B`` or ``lora_A`` (a fresh
        ``get_peft_model`` adapter), no DoRA, no bias, no modules_to_save or trainable tokens. Anything else
        counts as changing the output.
        """
        from peft.tuners.lora import LoraLayer

        config = self.config(name)
        kind = str(getattr(config, "peft_type", type(config).__name__))
        if "LORA" not in kind.upper() or type(config).__name__ != "LoraConfig":
            return False, f"it is a {kind} adapter (only plain LoRA is checked for a zero update)"
        for attr, why in (
            ("use_dora", "it uses DoRA"),
            ("modules_to_save", "it has modules_to_save"),
            ("trainable_token_indices", "it has trainable_token_indices"),
            ("lora_bias", "it has a LoRA bias"),
        ):
            if getattr(config, attr, None):
                return False, why
        if getattr(config, "bias", "none") != "none":
            return False, f"bias={config.bias!r}"
        seen = 0
        for layer in self.layers():
            if not isinstance(layer, LoraLayer):
                continue
            halves = []
            for a_attr, b_attr in (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")):
                a, b = getattr(layer, a_attr, {}), getattr(layer, b_attr, {})
                if name in a and name in b:
                    halves.append((a[name], b[name]))
            for a, b in halves:
                seen += 1
                if not (_all_zero(b) or _all_zero(a)):
                    return (
                        False,
                        "its LoRA weights are not zero (it was trained or initialised non-trivially)",
                    )
        if seen == 0:
            return False, "no LoRA layer holds it"
        return True, "every LoRA update B @ A is zero"

    # --- switching, each exactly undone ---

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model: every adapter off."""
        if self.kind == "peft":
            with self.model.disable_adapter():
                yield
            return
        with self._layer_state_restored():
            for layer in self.layers():
                layer.enable_adapters(False)
            yield

    @contextlib.contextmanager
    def switched(self, name: str) -> Iterator[None]:
        """Run with adapter `name` active instead of the policy's; the previous adapter is active again on
        exit."""
        if self.kind == "peft":
            previous = self.model.active_adapter
            self.model.set_adapter(name, inference_mode=True)
            try:
                yield
            finally:
                self.model.set_adapter(previous)
            return
        with self._layer_state_restored():
            for layer in self.layers():
                layer.set_adapter(name, inference_mode=True)
            yield

    @contextlib.contextmanager
    def _layer_state_restored(self) -> Iterator[None]:
        states = [
            (layer, list(layer.active_adapters), bool(layer.disable_adapters)) for layer in self.layers()
        ]
        try:
            yield
        finally:
            for layer, active, disabled in states:
                layer.set_adapter(active)
                layer.enable_adapters(not disabled)

    def activate(self, name: str) -> None:
        """Make adapter `name` the active, trainable one (peft's `set_adapter`: the other adapters' weights stop
        requiring grad). Callers snapshot the previous state to undo it (`active`, `requires_grad` flags)."""
        if name not in self.names:
            raise ValueError(f"{name!r} is not an adapter of the model; it has {self.names}.")
        if self.kind == "peft":
            self.model.set_adapter(name)
            return
        for layer in self.layers():
            layer.set_adapter(name)

    def restore_active(self, previous: list[str], grads: list[tuple[nn.Parameter, bool]]) -> None:
        """Make `previous` the active adapter(s) again and set every `requires_grad` flag back (undoes
        `activate`)."""
        if len(previous) == 1:
            self.activate(previous[0])
        else:  # several active adapters (only a tuner-level set_adapter makes that): restore each layer
            for layer in self.layers():
                layer.set_adapter(previous)
        for p, flag in grads:
            p.requires_grad_(flag)

    # --- a frozen copy of an adapter, and its removal ---

    def copy_adapter(self, source: str, target: str) -> None:
        """Add adapter `target` as a frozen, bit-identical copy of adapter `source`.

        The copy has the source's config (with ``inference_mode=True``) and the source's exact weights, dtypes
        and devices; the active adapter and every existing `requires_grad` flag are unchanged afterwards.
        """
        if target in self.names:
            raise ValueError(f"The model already has an adapter named {target!r}.")
        config = copy.deepcopy(self.config(source))
        config.inference_mode = True
        grads = [(p, p.requires_grad) for p in self.model.parameters()]
        with self._layer_state_restored():
            if self.kind == "peft":
                self.model.add_adapter(target, config)
            else:
                from peft import inject_adapter_in_model

                inject_adapter_in_model(config, self.model, target)
                self.model.peft_config[target] = config  # where transformers' integration keeps them
        for p, flag in grads:
            p.requires_grad_(flag)
        sources = self.parameters_of(source)
        targets = self.parameters_of(target)
        expected = {_rename(n, source, target) for n in sources}
        if set(targets) != expected:
            self.delete_adapter(target)
            raise RuntimeError(
                f"Copying adapter {source!r} to {target!r} produced parameters that do not match one to one "
                f"({len(sources)} vs {len(targets)}); this adapter type cannot be copied. Pass ref_model=, "
                "or peft_reference='base'."
            )
        with torch.no_grad():
            for name, param in sources.items():
                twin = targets[_rename(name, source, target)]
                twin.data = param.data.detach().clone()
                twin.requires_grad_(False)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` (one this package added); the active adapter is unchanged."""
        if self.kind == "peft":
            self.model.delete_adapter(name)
            return
        from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
        from peft.tuners.tuners_utils import delete_adapter

        prefix = PEFT_TYPE_TO_PREFIX_MAPPING[self.config(name).peft_type]
        with self._layer_state_restored_without(name):
            delete_adapter(self.model, name, prefix=prefix)
        del self.model.peft_config[name]

    @contextlib.contextmanager
    def _layer_state_restored_without(self, name: str) -> Iterator[None]:
        states = [
            (layer, [a for a in layer.active_adapters if a != name], bool(layer.disable_adapters))
            for layer in self.layers()
        ]
        grads = [(p, p.requires_grad) for p in self.model.parameters()]
        yield
        alive = {id(p) for p in self.model.parameters()}
        for layer, active, disabled in states:
            if active:
                layer.set_adapter(active)
            layer.enable_adapters(not disabled)
        for p, flag in grads:
            if id(p) in alive:
                p.requires_grad_(flag)


def activate_trained_adapter(model: nn.Module, name: str, ledger: Any) -> None:
    """Make adapter `name` of `model` the active, trainable one (`model_adapter_name`); `ledger` (a
    `kto_plugin.trainer` ledger) restores the previously active adapter(s) and every `requires_grad` flag."""
    host = AdapterHost.of(model)
    if host is None:
        raise ValueError(
            f"model_adapter_name={name!r} needs a model with PEFT adapters, but the trainer's model is a "
            f"{type(model).__name__} without adapters. Wrap it (peft.get_peft_model or peft_config=) first."
        )
    if name not in host.names:
        raise ValueError(
            f"model_adapter_name={name!r} is not an adapter of the model; it has {host.names}. Load it first, "
            f"e.g. model.load_adapter(path, adapter_name={name!r}, is_trainable=True), or pass one of those names."
        )
    ledger.on_undo(host, "restore_active", host.active, [(p, p.requires_grad) for p in model.parameters()])
    host.activate(name)


def _rename(param_name: str, source: str, target: str) -> str:
    return f".{param_name}.".replace(f".{source}.", f".{target}.")[1:-1]


def _all_zero(module: Any) -> bool:
    tensors = [module] if isinstance(module, torch.Tensor) else list(module.parameters())
    return bool(tensors) and all(not t.detach().any() for t in tensors)
