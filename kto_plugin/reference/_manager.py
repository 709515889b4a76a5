"""The reference-model manager: where reference log-probs come from, without ever touching the policy.

Modes (`ReferenceManager.mode`), decided once at `attach()` (precedence top to bottom):

* ``model``: a separate reference model: the given `ref_model`, or for a plain (non-PEFT) policy a frozen copy
  of the initial policy. Eval mode, no grad, placed on the device by accelerate (see `_sharding.py` for
  DeepSpeed/FSDP).
* ``named_adapter``: the reference is another adapter of the policy, switched in with `set_adapter` for
  reference passes and back after: `ref_adapter_name`, else an adapter named ``"ref"`` (convention), else a
  frozen copy of the policy's own adapter that we add under the name ``"ref"`` (TRL 1.16's behaviour for a
  `PeftModel` whose adapter already has trained weights).
* ``null_adapter``: the reference is the base model with every adapter off; no second model in memory.
* ``initial_policy``: only with `precompute_ref_log_probs` and no `ref_model` on a plain policy: the policy
  itself serves as the reference for the one precompute pass, before any optimizer step; no copy is made.
* ``released``: after the precompute pass of a ``model`` or ``initial_policy`` reference: nothing is held.

Which of ``null_adapter`` and the copied adapter a PEFT policy gets is `KTOConfig.peft_reference`:
``"auto"`` (the initial policy, by the cheapest exact route: the base model when the adapter provably changes
nothing, i.e. a fresh LoRA, else a frozen copy), ``"initial_adapter"`` (always the copy) or ``"base"``
(always the base model).

Every switch is a context manager with try/finally that restores the active adapter, every parameter's
`requires_grad` and every module's train/eval mode, also when the body raises.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from torch import nn

from ..config import PEFT_REFERENCES
from ._adapters import AdapterHost, is_peft_model

if TYPE_CHECKING:
    from transformers import Trainer

logger = logging.getLogger("kto_plugin")

REF_ADAPTER_CONVENTION = "ref"

__all__ = [
    "REF_ADAPTER_CONVENTION",
    "ReferenceManager",
    "ReferenceMode",
    "disable_dropout",
    "is_peft_model",
    "lm_head_of",
    "preserved_state",
]


class ReferenceMode(str, enum.Enum):
    """Where reference log-probs come from (see the module docstring). A `str` enum: ``mode == "model"`` holds."""

    UNSET = "unset"
    MODEL = "model"
    NAMED_ADAPTER = "named_adapter"
    NULL_ADAPTER = "null_adapter"
    INITIAL_POLICY = "initial_policy"
    RELEASED = "released"

    def __str__(self) -> str:
        return self.value


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


def lm_head_of(model: nn.Module) -> nn.Module | None:
    """The output embedding (LM head) of a model or PEFT wrapper, or None."""
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if getter is not None else None


def _vocab_size(model: nn.Module) -> int | None:
    head = lm_head_of(model)
    shape = getattr(getattr(head, "weight", None), "shape", None)
    return int(shape[0]) if shape else None


class ReferenceManager:
    """Owns the reference for one attachment.

    Args:
        ref_model: a separate reference model, or None.
        ref_adapter_name: a PEFT adapter of the policy that is the reference, or None.
    """

    def __init__(self, ref_model: nn.Module | None = None, ref_adapter_name: str | None = None) -> None:
        self.given_ref_model = ref_model
        self.requested_adapter = ref_adapter_name
        self.ref_adapter_name: str | None = None
        self.ref_model: nn.Module | None = None
        self.mode = ReferenceMode.UNSET
        self.host: AdapterHost | None = None
        self.created_adapter: str | None = None  # the frozen copy we added, deleted again by teardown()
        self.why = ""  # one phrase on why this mode, for the attach log
        self._policy_step: int | None = None
        self._given_device: Any = None
        self._accelerator: Any = None
        self._restore_dropout: list[tuple[nn.Dropout, float]] = []
        # a given ref_model dropped by `release` (after the precompute pass): a later setup must not go on without it
        self.released_given = False

    # --- setup ---

    def setup(
        self,
        trainer: Trainer,
        policy: nn.Module,
        disable_ref_dropout: bool = True,
        peft_reference: str = "auto",
        precompute: bool = False,
    ) -> None:
        """Decide the mode for `policy` (the unwrapped trainer model) and prepare the reference.

        Raises a ValueError naming the problem before any training step: merged adapters, a `ref_model` that
        is (or shares weights with) the policy, an unknown `ref_adapter_name`, a null reference with adapter
        biases, a reference with another vocabulary size.
        """
        if peft_reference not in PEFT_REFERENCES:
            raise ValueError(f"peft_reference must be one of {PEFT_REFERENCES}, got {peft_reference!r}.")
        host = AdapterHost.of(policy)
        if host is not None:
            self._refuse_merged(host)
        if self.given_ref_model is not None:
            self._check_separate(policy, self.given_ref_model)
            if self.requested_adapter is not None:
                raise ValueError(
                    "Pass either ref_model or ref_adapter_name, not both: each names the reference."
                )
            self.mode, self.why = ReferenceMode.MODEL, "the given ref_model"
            if precompute:
                # only needed for one pass: placed on the device, not registered with accelerate, moved back
                # and dropped by release()
                model = self.given_ref_model
                self._given_device = next(model.parameters()).device
                self.ref_model = model.requires_grad_(False).eval().to(trainer.accelerator.device)
            else:
                self.ref_model = self._prepare(trainer, self.given_ref_model)
        elif host is not None:
            self.host = host
            self._setup_adapters(host, peft_reference)
        else:
            if self.requested_adapter is not None:
                raise ValueError(
                    f"ref_adapter_name={self.requested_adapter!r} needs a model with PEFT adapters (a "
                    "peft.PeftModel, or adapters loaded with model.load_adapter), but the trainer's model "
                    f"is a {type(policy).__name__} without adapters."
                )
            if precompute:
                self.mode, self.why = ReferenceMode.INITIAL_POLICY, "the initial policy (precomputed, no copy kept)"
                self._policy_step = int(trainer.state.global_step)
            else:
                self.mode, self.why = ReferenceMode.MODEL, "a frozen copy of the initial policy"
                self.ref_model = self._prepare(trainer, copy.deepcopy(policy))
        if self.ref_model is not None:
            if disable_ref_dropout:
                self._restore_dropout = disable_dropout(self.ref_model)
            self._check_vocab(policy, trainer.accelerator.unwrap_model(self.ref_model))

    def _setup_adapters(self, host: AdapterHost, peft_reference: str) -> None:
        names, active = host.names, host.active
        name = self.requested_adapter
        if name is not None:
            if name not in names:
                raise ValueError(
                    f"ref_adapter_name={name!r} is not an adapter of the model; it has {names}. Load it "
                    f"first, e.g. model.load_adapter(path, adapter_name={name!r}), or pass one of those "
                    "names."
                )
            why = f"ref_adapter_name={name!r}"
        elif peft_reference == "auto" and REF_ADAPTER_CONVENTION in names:
            name, why = REF_ADAPTER_CONVENTION, f"the model has an adapter named {REF_ADAPTER_CONVENTION!r}"
        if name is not None:
            if name in active:
                raise ValueError(
                    f"The reference adapter {name!r} is the policy's active adapter (active: {active}), i.e. "
                    "the one being trained. Activate the adapter to train (model.set_adapter('default')) "
                    "and keep the reference adapter inactive; with transformers' model.load_adapter, load "
                    "the reference first, since the adapter loaded last becomes active."
                )
            self.mode, self.ref_adapter_name, self.why = ReferenceMode.NAMED_ADAPTER, name, why
            return
        if len(active) != 1:
            raise ValueError(
                f"The policy has {len(active)} active adapters ({active}); kto_plugin needs exactly one "
                "trained adapter to know what the reference is. Activate one, or pass ref_model= / "
                "ref_adapter_name=."
            )
        source = active[0]
        bias = getattr(host.config(source), "bias", "none")
        if bias != "none":
            raise ValueError(
                f"Adapter {source!r} has bias={bias!r}: it trains the base model's bias terms in place, so "
                "disabling the adapter does not give the base model back (a null reference would be wrong), "
                "and peft allows no second adapter with biases (no frozen copy either). Use a LoRA config "
                "with bias='none', or pass ref_model= (a separate copy of the model before training)."
            )
        if peft_reference == "auto":
            noop, reason = host.is_noop(source)
            use_copy = not noop
            why = (
                f"adapter {source!r} changes nothing yet ({reason}), so the base model is the initial policy"
                if noop
                else f"adapter {source!r} already changes the model ({reason})"
            )
        else:
            use_copy = peft_reference == "initial_adapter"
            why = f"peft_reference={peft_reference!r}"
        if use_copy:
            if host.is_prompt_learning(source) and host.kind != "peft":  # pragma: no cover
                # transformers' integration cannot load prompt-learning adapters in the first place
                raise ValueError("Prompt-learning adapters can only be copied inside a peft.PeftModel.")
            if REF_ADAPTER_CONVENTION in names:
                raise ValueError(
                    f"peft_reference={peft_reference!r} copies adapter {source!r} as "
                    f"{REF_ADAPTER_CONVENTION!r}, but the model already has an adapter named "
                    f"{REF_ADAPTER_CONVENTION!r}. Use it as the reference (peft_reference='auto' or "
                    f"ref_adapter_name={REF_ADAPTER_CONVENTION!r}) or delete it first."
                )
            host.copy_adapter(source, REF_ADAPTER_CONVENTION)
            self.created_adapter = REF_ADAPTER_CONVENTION
            self.mode, self.ref_adapter_name = ReferenceMode.NAMED_ADAPTER, REF_ADAPTER_CONVENTION
            self.why = f"a frozen copy of adapter {source!r} at attach ({why})"
            return
        self.mode, self.why = ReferenceMode.NULL_ADAPTER, f"the base model, adapters off ({why})"

    @staticmethod
    def _refuse_merged(host: AdapterHost) -> None:
        merged = host.merged()
        if merged:
            raise ValueError(
                f"Adapter(s) {merged} are merged into the base weights (merge_adapter()). A merged adapter "
                "is not trained (its weights no longer act separately) and disabling it silently unmerges "
                "the base weights. Call model.unmerge_adapter() before attach(), or merge_and_unload() and "
                "train a fresh adapter."
            )

    @staticmethod
    def _check_separate(policy: nn.Module, ref_model: nn.Module) -> None:
        if ref_model is policy or ref_model is getattr(policy, "base_model", None):
            raise ValueError(
                "ref_model is the policy model itself: the reference must stay fixed while the policy "
                "trains. Pass ref_model=None to use a frozen copy of the initial policy (or the "
                "adapter-free base model for PEFT), or pass a separate model."
            )
        policy_storage = {p.data_ptr() for p in policy.parameters() if p.data_ptr() != 0}
        shared = [n for n, p in ref_model.named_parameters() if p.data_ptr() in policy_storage]
        if shared:
            raise ValueError(
                f"ref_model shares {len(shared)} parameter tensors with the policy (e.g. {shared[0]!r}), so "
                "training would move the reference too. Pass a separate copy (copy.deepcopy(model) or a "
                "fresh from_pretrained), or ref_model=None."
            )

    def _prepare(self, trainer: Trainer, model: nn.Module) -> nn.Module:
        from ._sharding import prepare_reference

        model.requires_grad_(False)
        model.eval()
        self._accelerator = trainer.accelerator
        return prepare_reference(trainer, model)

    @staticmethod
    def _check_vocab(policy: nn.Module, ref_model: nn.Module) -> None:
        ours, theirs = _vocab_size(policy), _vocab_size(ref_model)
        if ours is not None and theirs is not None and ours != theirs:
            raise ValueError(
                f"The reference model's vocabulary ({theirs} logits) differs from the policy's ({ours}): "
                "their log-probs are not comparable. Use a reference with the same tokenizer and vocabulary "
                "size."
            )

    # --- use ---

    @property
    def holds_model(self) -> bool:
        """True when the reference is a separate module in memory."""
        return self.ref_model is not None

    @contextlib.contextmanager
    def activate(self, trainer: Trainer) -> Iterator[nn.Module]:
        """Yield the module whose forward is the reference's, restoring the policy exactly on exit."""
        if self.mode is ReferenceMode.MODEL:
            yield self.ref_model
            return
        if self.mode is ReferenceMode.RELEASED:
            raise ValueError(
                "This batch carries no precomputed reference log-probs, and the reference model was "
                "released after the precompute pass (precompute_ref_log_probs=True). Pass every evaluation "
                "dataset to the Trainer before kto.attach(trainer), or precompute it with "
                "kto.precompute_reference(dataset) before training starts."
            )
        model = trainer.model
        unwrapped = trainer.accelerator.unwrap_model(model)
        if self.mode is ReferenceMode.INITIAL_POLICY:
            if int(trainer.state.global_step) != self._policy_step:
                raise ValueError(
                    "The reference is the initial policy (precompute_ref_log_probs=True, no ref_model), "
                    "which is gone once training has taken a step (now at step "
                    f"{trainer.state.global_step}). Precompute every dataset before training "
                    "(kto.precompute_reference(dataset)), or pass ref_model=."
                )
            with preserved_state(unwrapped):
                unwrapped.eval()
                yield model
            return
        if self.mode not in (ReferenceMode.NULL_ADAPTER, ReferenceMode.NAMED_ADAPTER):
            raise RuntimeError(
                f"The reference manager is not set up (mode {self.mode.value!r}); call KTOPlugin.attach()."
            )
        host = self.host
        if host is None or host.model is not unwrapped:
            host = AdapterHost.of(unwrapped)
        with preserved_state(unwrapped):
            if self.mode is ReferenceMode.NULL_ADAPTER:
                with host.disabled():
                    yield model
            else:
                with host.switched(self.ref_adapter_name):
                    yield model

    def release(self) -> None:
        """Drop a separate reference model after precomputation; adapters and the initial policy cost
        nothing."""
        if self.mode is not ReferenceMode.MODEL:
            return
        for module, p in self._restore_dropout:
            module.p = p
        self._restore_dropout = []
        if self.given_ref_model is not None and self._given_device is not None:
            self.given_ref_model.to(self._given_device)  # the caller's model goes back where it was
        self._forget_prepared()
        self.ref_model = None
        self.released_given = self.released_given or self.given_ref_model is not None
        self.given_ref_model = None
        self.mode = ReferenceMode.RELEASED
        self.why = "released after precomputation"

    def _forget_prepared(self) -> None:
        # accelerate keeps every prepared model in a list (for save_state); take ours out so it can be freed
        models = getattr(self._accelerator, "_models", None)
        if models is not None and self.ref_model is not None:
            models[:] = [m for m in models if m is not self.ref_model]
        self._accelerator = None

    def teardown(self) -> None:
        for module, p in self._restore_dropout:
            module.p = p
        self._restore_dropout = []
        if self.created_adapter is not None and self.host is not None:
            self.host.delete_adapter(self.created_adapter)
        if self.given_ref_model is not None and self._given_device is not None:
            self.given_ref_model.to(self._given_device)
        self._given_device = None
        self._forget_prepared()
        self.created_adapter = None
        self.host = None
        self.ref_model = None
        self.ref_adapter_name = None
        self.mode = ReferenceMode.UNSET
        self.why = ""

    def describe(self) -> str:
        if self.mode is ReferenceMode.NAMED_ADAPTER:
            return f"PEFT adapter {self.ref_adapter_name!r}: {self.why}"
        return self.why or self.mode.value
