"""`KTOPlugin`: KTO on a stock `transformers.Trainer` in four lines, with `attach()` and an exact `detach()`."""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterable
from typing import Any

import datasets
from torch import nn
from transformers import Trainer

from .config import KTOConfig
from .data import DataReport, KTOCollator, VisionKTOCollator
from .data._formats import as_dataset
from .data._prepare import Preparer
from .data._report import store_report
from .data._vision import is_processor
from .hooks import KTOPluginManager
from .reference import ReferenceManager, ReferenceMode
from .reference._cache import default_cache_dir
from .reference._manager import preserved_state
from .reference._precompute import ReferencePrecomputer, check_precomputable
from .step._compute_loss import KTOComputeLoss
from .step._metrics import MetricsAccumulator
from .step._nonfinite import NonFiniteGuard
from .trainer._attach import bind_model, install
from .trainer._guidance import Adviser
from .trainer._ledger import Ledger
from .trainer._models import is_model_name, load_pretrained, wrap_trainer_model, wrap_with_peft
from .trainer._validation import validate

logger = logging.getLogger("kto_plugin")

def _one_of(name: str, argument: Any, configured: Any) -> Any:
    """The value given to KTOPlugin or in KTOConfig (the documented API has it there); refuses two different ones."""
    if argument is not None and configured is not None and argument != configured:
        raise ValueError(
            f"{name} is {argument!r} in KTOPlugin(...) but {configured!r} in KTOConfig: give it in one place."
        )
    return argument if argument is not None else configured


class KTOPlugin:
    """KTO for an existing Trainer.

    Example::

        kto = KTOPlugin(KTOConfig(beta=0.1), tokenizer=tokenizer)
        train_ds = kto.prepare_dataset(raw_train)
        trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=kto.collator)
        kto.attach(trainer)
        trainer.train()

    Args:
        config: KTO settings; default `KTOConfig()`.
        tokenizer: the policy's tokenizer (its pad token pads batches; EOS ends plain-text completions).
        ref_model: a separate reference model, or its name or path (loaded with `from_pretrained` at `attach()`,
            with `KTOConfig.ref_model_init_kwargs`, else `model_init_kwargs`, in the policy's dtype unless one is
            named). None: the initial policy: a frozen copy of a plain model; for a
            PEFT model the base model with the adapter off, or a frozen copy of an already-trained adapter
            (`KTOConfig.peft_reference`); with `precompute_ref_log_probs`, no reference model at all.
        ref_adapter_name: a PEFT adapter of the policy to use as the reference (an adapter named ``"ref"``
            is used by convention when present).
        peft_config: a `peft.PeftConfig` (e.g. `LoraConfig`): the plugin wraps the model with `get_peft_model`,
            either in `wrap_model(model)` before the Trainer is built (needed for quantized models and for
            `model_init`) or at `attach()`, and the reference is the base model with the adapter off (as TRL).
        model_adapter_name: with several PEFT adapters loaded, the one to train: made active (and trainable) at
            `attach()`, active for every policy forward, restored by `detach()`. Also settable in `KTOConfig`.
        plugins: extra pluggy plugins (objects or modules with `@kto_plugin.hookimpl` hooks), called in list
            order before installed (entry-point) plugins and the built-ins. See `kto_plugin.hookspecs`.
    """

    def __init__(
        self,
        config: KTOConfig | None = None,
        tokenizer: Any = None,
        ref_model: Any = None,
        ref_adapter_name: str | None = None,
        plugins: Iterable[Any] = (),
        model_adapter_name: str | None = None,
        peft_config: Any = None,
    ) -> None:
        if tokenizer is None:
            raise ValueError("KTOPlugin needs the policy's tokenizer: KTOPlugin(config, tokenizer=tokenizer).")
        self.config = config if config is not None else KTOConfig()
        if not isinstance(self.config, KTOConfig):
            raise TypeError(f"config must be a KTOConfig, got {type(self.config).__name__}.")
        # a vision-language model's processor (`kto_plugin.data._vision`): its tokenizer does the tokenizer's work
        self.processor = tokenizer if is_processor(tokenizer) else None
        if self.processor is not None:
            tokenizer = self.processor.tokenizer
        self.tokenizer = tokenizer
        ref_adapter_name = _one_of("ref_adapter_name", ref_adapter_name, self.config.ref_adapter_name)
        self.model_adapter_name = _one_of("model_adapter_name", model_adapter_name, self.config.model_adapter_name)
        if self.model_adapter_name is not None and self.model_adapter_name == ref_adapter_name:
            raise ValueError(
                f"model_adapter_name and ref_adapter_name are both {ref_adapter_name!r}: the trained adapter cannot "
                "also be the fixed reference. Name two different adapters."
            )
        self.peft_config = peft_config
        if peft_config is not None:
            from peft import PeftConfig

            if not isinstance(peft_config, PeftConfig):
                raise TypeError(
                    f"peft_config must be a peft.PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}."
                )
        self._wrapped: weakref.WeakSet = weakref.WeakSet()  # models this plugin wrapped with peft_config
        self.plugins = KTOPluginManager(plugins)
        self.needs_kl = self.plugins.needs_kl(self.config)
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ValueError(
                    "The tokenizer has neither a pad token nor an EOS token. Set one: tokenizer.pad_token = '...'."
                )
            tokenizer.pad_token = tokenizer.eos_token
            logger.warning("kto_plugin: the tokenizer has no pad token; using its EOS token %r to pad.", tokenizer.eos_token)
        collator_kwargs = dict(
            pad_token_id=self.config.padding_value if self.config.padding_value is not None else tokenizer.pad_token_id,
            label_pad_token_id=self.config.label_pad_token_id,
            max_length=self.config.max_length,
            truncation_mode=self.config.truncation_mode,
            pad_to_multiple_of=self.config.pad_to_multiple_of,
            build_kl=self.needs_kl,
        )
        self.collator = (KTOCollator(**collator_kwargs) if self.processor is None
                         else VisionKTOCollator(self.processor, **collator_kwargs))
        # a reference named by path is loaded at attach(), when the policy's dtype is known
        self.ref_model_name = ref_model if is_model_name(ref_model) else None
        if self.ref_model_name is not None and ref_adapter_name is not None:
            raise ValueError("Pass either ref_model or ref_adapter_name, not both: each names the reference.")
        self.reference = ReferenceManager(None if self.ref_model_name is not None else ref_model, ref_adapter_name)
        self.metrics = MetricsAccumulator()
        self.nonfinite = NonFiniteGuard(self.config.on_nonfinite)
        self.loss_hook = KTOComputeLoss(
            self.config, self.plugins, self.reference, self.metrics, self.needs_kl, self.nonfinite
        )
        self.loss_hook.inputs = self.plugins.check_config(self.config, self.needs_kl)
        self.data_reports: dict[str, DataReport] = {}
        self.trainer: Trainer | None = None
        # every change attach() makes: to the Trainer (`ledger`) and to the policy it trains (`binding`)
        self.ledger = Ledger()
        self.binding = Ledger()
        self.metrics_callback: Any = None
        # with activation_offloading: the saved-tensor hooks around each training step (counts what it moved)
        self.activation_offloader: Any = None
        self.adviser = Adviser()
        self._precomputer: ReferencePrecomputer | None = None

    # --- data ---

    def prepare_dataset(self, dataset: Any, name: str = "train") -> Any:
        """Validate and tokenize preference data: unpaired ``{prompt, completion, label}``, paired
        ``{prompt, chosen, rejected}`` or implicit-prompt ``{chosen, rejected}``, plain text or conversational.

        Takes a `datasets.Dataset`, an `IterableDataset` (prepared lazily as it is read), a `DatasetDict` /
        `IterableDatasetDict` (each split, reported under its split name), a list of row dicts or a dict of
        columns; returns a `datasets` object of the same kind with `prompt_ids`, `completion_ids`, `label` and
        `row_index` (the input row's position, kept through drops; names rows in non-finite reports; a
        `row_index` column of your own is kept instead), other columns kept. Paired rows come out in `KTOConfig.paired_order`. What is dropped or truncated
        is counted in `self.data_reports[name]` and logged once.
        """
        data = as_dataset(dataset, name)
        if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            return type(data)({split: self.prepare_dataset(ds, name=split) for split, ds in data.items()})
        started = time.perf_counter()
        prepared, report = Preparer(self.tokenizer, self.config, self.processor)(data, name)
        if not report.streaming:
            report.seconds = time.perf_counter() - started
        store_report(self.data_reports, report)
        noteworthy = (report.dropped_prompt_too_long or report.truncated or report.prompt_truncated
                      or report.completion_limited or report.balance or report.skipped_bad_rows)
        logger.log(logging.WARNING if noteworthy else logging.INFO, "kto_plugin: prepared %s", report.summary())
        return prepared

    # --- models ---

    def wrap_model(self, model: Any) -> Any:
        """The model to give the Trainer: `model` (an instance, or a name/path loaded with `from_pretrained` and
        `KTOConfig.model_init_kwargs`) wrapped with `peft_config` when one was given.

        Example::

            kto = KTOPlugin(KTOConfig(), tokenizer=tokenizer, peft_config=LoraConfig(r=16, task_type="CAUSAL_LM"))
            trainer = Trainer(model=kto.wrap_model("path/to/model"), ...)
        """
        if is_model_name(model):
            model = load_pretrained(
                model, self.config.model_init_kwargs, trust_remote_code=self.config.trust_remote_code
            )
        if self.peft_config is None:
            return model
        if model in self._wrapped:
            return model
        wrapped = wrap_with_peft(model, self.peft_config)
        self._wrapped.add(wrapped)
        return wrapped

    def _wrap_attached_model(self, trainer: Trainer, wrapping: Ledger) -> None:
        """With `peft_config`, wrap the Trainer's model now unless `wrap_model` already did; refuse where the
        Trainer has already captured the unwrapped model's parameters. `wrapping` records how to unwrap (the
        adapter's layers removed, the Trainer's `model` / `model_wrapped` and every `requires_grad` as before),
        which is undone only if `attach` fails: after a successful attach the adapter is the user's model."""
        if self.peft_config is None:
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        if model in self._wrapped:
            return
        wrapping.on_undo(self, "_forget_wrapped", model, [(p, p.requires_grad) for p in model.parameters()])
        wrapped = wrap_trainer_model(trainer, model, self.peft_config, wrapping)
        self._wrapped.add(wrapped)
        logger.info("kto_plugin: wrapped the Trainer's model with peft_config (%s)", type(self.peft_config).__name__)

    def _forget_wrapped(self, model: nn.Module, requires_grad: list) -> None:
        """Undo `_wrap_attached_model` (after the Trainer got `model` back): remove the adapter layers without
        merging them, and set every `requires_grad` flag back."""
        for wrapped in list(self._wrapped):
            if wrapped.get_base_model() is model:
                wrapped.unload()
                self._wrapped.discard(wrapped)
        for p, flag in requires_grad:
            p.requires_grad_(flag)

    # --- attach / detach ---

    def attach(self, trainer: Trainer) -> Trainer:
        """Make `trainer` train with KTO. Idempotent; undone by `detach()`. Returns the trainer."""
        if self.trainer is trainer:
            return trainer
        if self.trainer is not None:
            raise RuntimeError("This KTOPlugin is attached to another Trainer; call detach() first.")
        if isinstance(getattr(trainer, "compute_loss_func", None), KTOComputeLoss):
            raise RuntimeError(
                "This Trainer is attached to another KTOPlugin: two plugins would stack their wrappers and "
                "callbacks. Call detach() on that plugin first (or keep using it)."
            )
        if getattr(trainer, "compute_loss_func", None) is not None:
            raise ValueError(
                "The trainer already has a compute_loss_func; KTO replaces the loss. Create the Trainer without "
                "compute_loss_func."
            )
        # plugins registered since construction (kto.plugins.register) count too
        self.plugins.check()
        self.needs_kl = self.loss_hook.needs_kl = self.collator.build_kl = self.plugins.needs_kl(self.config)
        self.loss_hook.inputs = self.plugins.check_config(self.config, self.needs_kl)
        validate(self, trainer)
        self._load_named_reference(trainer.accelerator.unwrap_model(trainer.model))  # may fail: before any change
        if self.reference.released_given and self.reference.given_ref_model is None:
            raise ValueError(
                "The ref_model given to KTOPlugin was released after the precompute pass of an earlier attach() "
                "(precompute_ref_log_probs=True keeps no reference model), so this attach() has no reference "
                "to precompute from; without it the reference would silently become a copy of the policy. "
                "Create a new KTOPlugin with ref_model=... (or pass ref_model as a path, which is loaded again)."
            )
        wrapping = Ledger()
        self._wrap_attached_model(trainer, wrapping)
        self.trainer = trainer  # from here on, `detach` undoes whatever was installed
        try:
            policy_path = bind_model(self, trainer, trainer.accelerator.unwrap_model(trainer.model))
            install(self, trainer, policy_path)
        except BaseException:
            self.detach()
            wrapping.undo()  # a refusal after the model was wrapped: the trainer gets the user's model back
            raise
        return trainer

    def detach(self) -> None:
        """Restore the trainer exactly as it was before `attach()` (`KTOPlugin.ledger`, then `binding`, undone)."""
        if self.trainer is None:
            return
        try:
            self.ledger.undo()
        finally:
            self.binding.undo()
            self.metrics_callback = None
            self._precomputer = None
            self.trainer = None

    def rebind(self, trainer: Trainer, policy: nn.Module) -> None:
        """Re-bind to a new policy instance (`Trainer.train()` re-creates the model when `model_init` is set).

        The frozen-copy reference is taken from `policy`, which is the model as `model_init` returned it.
        """
        self.binding.undo()
        policy_path = bind_model(self, trainer, policy)
        logger.info(
            "kto_plugin: model_init made a new model; re-bound (reference: %s, log-probs from %s)",
            self.reference.describe(), policy_path.name,
        )

    def peft_reference_of(self, policy: nn.Module) -> str:
        """`KTOConfig.peft_reference` for `policy`: an adapter this plugin added from `peft_config` has the base
        model as its reference (TRL's null reference)."""
        if policy in self._wrapped and self.config.peft_reference == "auto":
            return "base"
        return self.config.peft_reference

    def _load_named_reference(self, policy: nn.Module) -> None:
        if self.ref_model_name is None or self.reference.given_ref_model is not None:
            return
        config = self.config
        init = config.ref_model_init_kwargs if config.ref_model_init_kwargs is not None else config.model_init_kwargs
        self.reference.released_given = False
        self.reference.given_ref_model = load_pretrained(
            self.ref_model_name, init, trust_remote_code=config.trust_remote_code,
            default_dtype=getattr(policy, "dtype", None), argument="ref_model",
        )
        logger.info("kto_plugin: loaded the reference model from %r", str(self.ref_model_name))

    @property
    def injected_metric_keys(self) -> set[str]:
        """Every metric key the plugin has added to the logs of the attached trainer (e.g. ``eval_kl``)."""
        return self.metrics_callback.injected_keys if self.metrics_callback is not None else set()

    def __getstate__(self) -> dict[str, Any]:
        # the weak set of models wrapped with peft_config travels as a list (a WeakSet does not pickle)
        state = dict(self.__dict__)
        state["_wrapped"] = list(self._wrapped)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        wrapped = state.pop("_wrapped")
        self.__dict__.update(state)
        self._wrapped = weakref.WeakSet(wrapped)

    # --- precomputed reference log-probs ---

    def precompute_reference(self, dataset: Any, name: str = "eval", train: bool = False) -> Any:
        """`dataset` with precomputed reference log-probs (``ref_logps``, and for KL ``kl_completion_ids``,
        ``ref_kl_logps``), from the attached reference; cached like the datasets precomputed at `attach()`.

        Use it for a dataset you pass later:
        ``trainer.evaluate(eval_dataset=kto.precompute_reference(ds))``. KL partners are grouped by
        ``per_device_eval_batch_size`` (``per_device_train_batch_size`` if `train`). A separate reference
        model is released after `attach()`'s pass, and the initial policy is gone after the first training
        step; an adapter reference is always available.
        """
        trainer = self.trainer
        if trainer is None:
            raise RuntimeError(
                "precompute_reference needs an attached trainer: call kto.attach(trainer) first."
            )
        check_precomputable(dataset, name)
        args = trainer.args
        group = args.per_device_train_batch_size if train else args.per_device_eval_batch_size
        batch_size = self.config.precompute_ref_batch_size or group
        if self._precomputer is None:
            self._precomputer = self._make_precomputer(trainer)
        policy = trainer.accelerator.unwrap_model(trainer.model)
        with preserved_state(policy):
            policy.eval()  # a deterministic reference: no dropout whatever disable_dropout says
            return self._precomputer(dataset, name, group, batch_size)

    def _make_precomputer(self, trainer: Trainer) -> ReferencePrecomputer:
        if self.reference.mode is ReferenceMode.RELEASED:
            raise ValueError(
                "The reference model was released after attach()'s precompute pass "
                "(precompute_ref_log_probs=True). Pass every dataset to the Trainer before "
                "kto.attach(trainer) so it is precomputed then."
            )
        config = self.config
        cache_dir = (config.precompute_cache_dir or default_cache_dir()) if config.precompute_cache else None
        settings = {
            "max_length": config.max_length,
            "truncation_mode": config.truncation_mode,
            "logps_path": self.loss_hook.reference_path.name,
        }
        return ReferencePrecomputer(
            trainer,
            self.reference,
            self.loss_hook.passes,
            self.collator,
            settings,
            self.needs_kl,
            cache_dir,
        )

    def precompute_attached_datasets(self, trainer: Trainer) -> None:
        """At `attach()` with ``precompute_ref_log_probs=True``: the Trainer's datasets get their precomputed
        columns (given back by `detach`), then a separate reference model is released."""
        if trainer.train_dataset is not None:
            self.ledger.setattr(
                trainer, "train_dataset", self.precompute_reference(trainer.train_dataset, name="train", train=True)
            )
        if isinstance(trainer.eval_dataset, dict):
            self.ledger.setattr(trainer, "eval_dataset", {
                name: self.precompute_reference(ds, name=name) for name, ds in trainer.eval_dataset.items()
            })
        elif trainer.eval_dataset is not None:
            self.ledger.setattr(trainer, "eval_dataset", self.precompute_reference(trainer.eval_dataset, name="eval"))
        if self.reference.holds_model:
            self.reference.release()
            logger.info("kto_plugin: reference model released; training uses the precomputed log-probs")
