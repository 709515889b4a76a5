"""The reference-model manager: where reference log-probs come from, without ever touching the policy.

Modes (`ReferenceManager.mode`):

* ``model``: a separate reference model (given, or a frozen copy of the initial policy), eval mode, no grad.
* ``null_adapter``: the policy is a PEFT model and the reference is its base model with the adapter off
  (`disable_adapter()`); no second model in memory.
* ``named_adapter``: the reference is another adapter of the policy (e.g. ``"ref"``), switched in with
  `set_adapter` for reference passes and back after.

Every switch is a context manager with try/finally that restores the active adapter, every parameter's
`requires_grad` and the train/eval mode, also when the body raises.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

from torch import nn

logger = logging.getLogger("kto_plugin")

REF_ADAPTER_CONVENTION = "ref"


def is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def disable_dropout(model: nn.Module) -> list[tuple[nn.Dropout, float]]:
    """Set every dropout probability to 0; returns what to restore."""
    changed = []
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p != 0:
            changed.append((module, module.p))
            module.p = 0.0
    return changed


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore `requires_grad` of every parameter and the train/eval mode of every module on exit."""
    grads = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for p, flag in grads:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag


class ReferenceManager:
    """Owns the reference for one attachment.

    Args:
        ref_model: a separate reference model, or None.
        ref_adapter_name: a PEFT adapter of the policy that is the reference, or None.
    """

    def __init__(self, ref_model: nn.Module | None = None, ref_adapter_name: str | None = None) -> None:
        self.given_ref_model = ref_model
        self.ref_adapter_name = ref_adapter_name
        self.ref_model: nn.Module | None = None
        self.mode = "unset"
        self._restore_dropout: list[tuple[nn.Dropout, float]] = []

    def setup(self, trainer: Any, policy: nn.Module, disable_ref_dropout: bool) -> None:
        """Decide the mode for `policy` (the unwrapped trainer model) and prepare the reference."""
        if self.given_ref_model is not None and self.given_ref_model is policy:
            raise ValueError(
                "ref_model is the policy model itself: the reference must stay fixed while the policy trains. "
                "Pass ref_model=None to use a frozen copy of the initial policy (or the adapter-free base model "
                "for PEFT), or pass a separate model."
            )
        if self.given_ref_model is not None:
            self.mode = "model"
            self.ref_model = self._prepare(trainer, self.given_ref_model)
        elif is_peft_model(policy):
            adapters = list(policy.peft_config)
            name = self.ref_adapter_name
            if name is None and REF_ADAPTER_CONVENTION in adapters:
                name = REF_ADAPTER_CONVENTION
            if name is not None and name not in adapters:
                raise ValueError(
                    f"ref_adapter_name={name!r} is not an adapter of the model; it has {adapters}. Load it with "
                    f"model.load_adapter(path, adapter_name={name!r}) or pass an existing name."
                )
            self.ref_adapter_name = name
            self.mode = "named_adapter" if name is not None else "null_adapter"
        else:
            if self.ref_adapter_name is not None:
                raise ValueError(
                    f"ref_adapter_name={self.ref_adapter_name!r} needs a PEFT model, but the trainer's model is a "
                    f"{type(policy).__name__}."
                )
            self.mode = "model"
            self.ref_model = self._prepare(trainer, copy.deepcopy(policy))
            logger.info("kto_plugin: reference = a frozen copy of the initial policy")
        if self.ref_model is not None and disable_ref_dropout:
            self._restore_dropout = disable_dropout(self.ref_model)
        self._check_vocab(policy)

    def _prepare(self, trainer: Any, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)
        model.eval()
        accelerator = getattr(trainer, "accelerator", None)
        if accelerator is not None:
            # device placement and (under mixed precision) the autocast forward, as the Trainer does for the policy
            model = accelerator.prepare_model(model, evaluation_mode=True)
        else:  # pragma: no cover - every transformers 5 Trainer has an accelerator
            model = model.to(trainer.args.device)
        return model

    def _check_vocab(self, policy: nn.Module) -> None:
        if self.ref_model is None:
            return
        sizes = []
        for model in (policy, self.ref_model):
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            sizes.append(getattr(getattr(head, "weight", None), "shape", [None])[0])
        if None not in sizes and sizes[0] != sizes[1]:
            raise ValueError(
                f"The reference model's vocabulary ({sizes[1]} logits) differs from the policy's ({sizes[0]}): their "
                "log-probs are not comparable. Use a reference with the same tokenizer and vocabulary size."
            )

    @contextlib.contextmanager
    def activate(self, trainer: Any) -> Iterator[nn.Module]:
        """Yield the module whose forward is the reference's, restoring the policy exactly on exit."""
        if self.mode == "model":
            yield self.ref_model
            return
        model = trainer.model
        unwrapped = trainer.accelerator.unwrap_model(model)
        with preserved_state(unwrapped):
            if self.mode == "null_adapter":
                with unwrapped.disable_adapter():
                    yield model
            else:
                previous = unwrapped.active_adapter
                unwrapped.set_adapter(self.ref_adapter_name)
                try:
                    yield model
                finally:
                    unwrapped.set_adapter(previous)

    def teardown(self) -> None:
        for module, p in self._restore_dropout:
            module.p = p
        self._restore_dropout = []
        self.ref_model = None
        self.mode = "unset"

    def describe(self) -> str:
        if self.mode == "model":
            return "separate model" if self.given_ref_model is not None else "frozen copy of the initial policy"
        if self.mode == "null_adapter":
            return "PEFT base model (adapter disabled)"
        if self.mode == "named_adapter":
            return f"PEFT adapter {self.ref_adapter_name!r}"
        return self.mode


def lm_head_of(model: nn.Module) -> nn.Module | None:
    """The output embedding (LM head) of a model or PEFT wrapper, or None."""
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if getter is not None else None

