"""`KTOPlugin`: KTO on a stock `transformers.Trainer` in four lines, with `attach()` and an exact `detach()`."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from typing import Any

import datasets

from .collator import KTOCollator
from .compat import TrainerCompat, check_liger
from .compute_loss import KTOComputeLoss
from .config import KTOConfig
from .data import DataReport, Preparer, as_dataset
from .generation import KTOGenerationCallback
from .guidance import Adviser, attach_advice, label_counts
from .logprobs import LogpsPath, choose_path
from .metrics import KTOMetricsCallback, MetricsAccumulator
from .nonfinite import NonFiniteGuard, NonFiniteSkipCallback
from .offload import ActivationOffloader, wrap_training_step
from .plugin_manager import KTOPluginManager
from .adapters import AdapterHost, activate_trained_adapter
from .models import (
    check_architecture,
    decoder_start_token_id,
    is_model_name,
    load_pretrained,
    wrap_trainer_model,
    wrap_with_peft,
)
from .precompute import ReferencePrecomputer, default_cache_dir
from .reference import ReferenceManager, disable_dropout, preserved_state
from .resume import RecordCheckpointTrain, ResumeCallback
from .router import router_aux_coef
from .sharding import sharding_of
from .sync import ReferenceSyncCallback, sync_pairs
from .vision import VisionKTOCollator, is_processor

logger = logging.getLogger("kto_plugin")

_MISSING = object()


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
        # a vision-language model's processor (`kto_plugin.vision`): its tokenizer does the tokenizer's work
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
        self._restore_adapter: Any = None
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
        self.data_reports: dict[str, DataReport] = {}
        self.trainer: Any = None
        self._saved: dict[str, Any] = {}
        self._callback: KTOMetricsCallback | None = None
        self._generation: KTOGenerationCallback | None = None
        self._resume: ResumeCallback | None = None
        self._skip_callback: NonFiniteSkipCallback | None = None
        self._sync: ReferenceSyncCallback | None = None
        # with activation_offloading: the saved-tensor hooks around each training step (counts what it moved)
        self.activation_offloader: ActivationOffloader | None = None
        self._compat = TrainerCompat(self)
        self._restore_dropout: list = []
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
        prepared, report = Preparer(self.tokenizer, self.config, self.processor)(data, name)
        self.data_reports[name] = report
        noteworthy = (report.dropped_prompt_too_long or report.truncated or report.prompt_truncated
                      or report.completion_limited or report.balance)
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

    def _wrap_attached_model(self, trainer: Any) -> Any:
        """With `peft_config`, wrap the Trainer's model now unless `wrap_model` already did; refuse where the
        Trainer has already captured the unwrapped model's parameters.

        Returns None, or when it wrapped, a function that unwraps (for an `attach` that fails later): the
        adapter's layers removed, the Trainer's `model` / `model_wrapped` and every `requires_grad` as before."""
        if self.peft_config is None:
            return None
        model = trainer.accelerator.unwrap_model(trainer.model)
        if model in self._wrapped:
            return None
        saved_model, saved_wrapped = trainer.model, trainer.model_wrapped
        requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        wrapped = wrap_trainer_model(trainer, model, self.peft_config)
        self._wrapped.add(wrapped)
        logger.info("kto_plugin: wrapped the Trainer's model with peft_config (%s)", type(self.peft_config).__name__)

        def unwrap() -> None:
            wrapped.unload()  # removes the adapter layers it injected into `model`, without merging them
            self._wrapped.discard(wrapped)
            for p, flag in requires_grad:
                p.requires_grad_(flag)
            trainer.model, trainer.model_wrapped = saved_model, saved_wrapped

        return unwrap

    # --- attach / detach ---

    def attach(self, trainer: Any) -> Any:
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
        self._validate(trainer)
        self._load_named_reference(trainer.accelerator.unwrap_model(trainer.model))  # may fail: before any change
        if self.reference.released_given and self.reference.given_ref_model is None:
            raise ValueError(
                "The ref_model given to KTOPlugin was released after the precompute pass of an earlier attach() "
                "(precompute_ref_log_probs=True keeps no reference model), so this attach() has no reference "
                "to precompute from; without it the reference would silently become a copy of the policy. "
                "Create a new KTOPlugin with ref_model=... (or pass ref_model as a path, which is loaded again)."
            )
        unwrap = self._wrap_attached_model(trainer)
        try:
            self._install(trainer)
        except BaseException:
            # a refusal or error after the model was wrapped: the trainer gets the user's model back unchanged
            if unwrap is not None:
                unwrap()
            raise
        return trainer

    def _install(self, trainer: Any) -> None:
        """Everything `attach` changes on the trainer; on any failure it is all undone (`detach`)."""
        policy = trainer.accelerator.unwrap_model(trainer.model)

        saved = self._saved
        saved["compute_loss_func"] = trainer.compute_loss_func
        saved["loss_is_scaled_for_ga"] = trainer.__dict__.get("loss_is_scaled_for_ga", _MISSING)
        saved["remove_unused_columns"] = trainer.args.remove_unused_columns
        saved["label_names"] = trainer.label_names
        saved["data_collator"] = trainer.data_collator
        saved["collator_model_kwargs"] = self.collator.model_kwargs
        saved["collator_encoder_decoder"] = (self.collator.encoder_decoder, self.collator.decoder_start_token_id)
        saved["train_dataset"] = trainer.train_dataset
        saved["eval_dataset"] = trainer.eval_dataset
        saved["get_batch_samples"] = trainer.__dict__.get("get_batch_samples", _MISSING)
        saved["training_step"] = trainer.__dict__.get("training_step", _MISSING)
        saved["train"] = trainer.__dict__.get("train", _MISSING)
        self.trainer = trainer  # from here on, `detach` undoes whatever was installed
        try:
            self._install_saved(trainer, policy)
        except BaseException:
            self.detach()
            raise

    def _install_saved(self, trainer: Any, policy: Any) -> None:
        policy_path = self._bind_policy(trainer, policy)

        trainer.compute_loss_func = self.loss_hook
        # the loss is a per-micro-batch mean: let the Trainer divide by the accumulation steps
        trainer.loss_is_scaled_for_ga = False
        trainer.args.remove_unused_columns = False
        trainer.label_names = ["labels"]
        if trainer.data_collator is not self.collator:
            # also another KTOCollator (e.g. an earlier KTOPlugin's): the batch must be built as this plugin
            # set its collator up (KL batch or not, model kwargs, encoder-decoder layout)
            if isinstance(trainer.data_collator, KTOCollator):
                logger.info("kto_plugin: the Trainer's KTOCollator is not this plugin's; using kto.collator")
            trainer.data_collator = self.collator
        self._callback = KTOMetricsCallback(self.metrics, lambda: trainer.model.training)
        trainer.callback_handler.callbacks.insert(0, self._callback)
        if self.config.generate_during_eval:
            self._generation = KTOGenerationCallback(
                trainer, self.reference, self.tokenizer, self.config.generate_num_prompts,
                self.config.generate_max_new_tokens,
            )
            trainer.callback_handler.callbacks.insert(1, self._generation)
        # last: its on_log stores the accumulator after the metrics callback has taken the interval's values
        self._resume = ResumeCallback(self)
        trainer.callback_handler.callbacks.append(self._resume)
        trainer.train = RecordCheckpointTrain(trainer.train, trainer, self._resume)
        if self.config.on_nonfinite == "skip":
            self._skip_callback = NonFiniteSkipCallback(self.nonfinite)
            trainer.callback_handler.callbacks.insert(0, self._skip_callback)
        if self.config.kl_estimate == "window" and self.needs_kl:
            trainer.get_batch_samples = WindowBatchSamples(trainer.get_batch_samples, trainer, self.loss_hook)
        if self.config.activation_offloading:
            self.activation_offloader = ActivationOffloader()
            trainer.training_step = wrap_training_step(trainer, self.activation_offloader)
        if self.config.sync_ref_model:
            self._sync = ReferenceSyncCallback(
                trainer, self.reference, self.config.ref_model_mixup_alpha, self.config.ref_model_sync_steps
            )
            trainer.callback_handler.callbacks.append(self._sync)  # after the optimizer step, as TRL's
        self._compat.install(trainer)
        if self.config.precompute_ref_log_probs:
            self._precompute_attached_datasets(trainer)
        counts = label_counts(trainer, self.data_reports)
        self._log_summary(policy_path, counts)
        if self.config.warn_guidance:
            is_adapter = AdapterHost.of(policy) is not None
            self.adviser.give(attach_advice(self.config, trainer, self.needs_kl, is_adapter, counts))

    def _load_named_reference(self, policy: Any) -> None:
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

    def _bind_policy(self, trainer: Any, policy: Any) -> LogpsPath:
        """The architecture and the trained adapter (`model_adapter_name`), then everything else `_bind_model`
        ties to the policy; the adapter is switched back if that fails."""
        self._set_architecture(policy)
        self._activate_model_adapter(policy)
        try:
            return self._bind_model(trainer, policy)
        except BaseException:
            if self._restore_adapter is not None:
                self._restore_adapter()
                self._restore_adapter = None
            raise

    def _bind_model(self, trainer: Any, policy: Any) -> LogpsPath:
        """Everything tied to the policy instance: the reference, the log-prob paths, dropout."""
        aux_coef = router_aux_coef(self.config, policy)  # may refuse: before anything is set up
        self.reference.setup(
            trainer,
            policy,
            disable_ref_dropout=self.config.disable_dropout,
            peft_reference=self._peft_reference(policy),
            precompute=self.config.precompute_ref_log_probs,
        )
        if self.config.sync_ref_model:
            try:
                sync_pairs(trainer, self.reference)  # refuses a reference that cannot follow the policy
            except BaseException:
                self.reference.teardown()
                raise
        policy_path = choose_path(policy, sharded=self._sharded(trainer))
        reference_model = self.reference.ref_model
        reference_path = (
            choose_path(trainer.accelerator.unwrap_model(reference_model), sharded=self._sharded(trainer))
            if reference_model is not None
            else policy_path
        )
        policy_path.ignore_index = reference_path.ignore_index = self.config.label_pad_token_id
        self.loss_hook.bind(trainer, policy_path, reference_path)
        self.loss_hook.router_aux_loss_coef = aux_coef
        self.collator.model_kwargs = policy_path.model_kwargs()
        if aux_coef is not None:
            # the Trainer's policy forward (not the reference or KL passes) returns the model's own aux_loss
            self.collator.model_kwargs["output_router_logits"] = True
        if self.config.disable_dropout:
            self._restore_dropout = disable_dropout(policy)
        return policy_path

    def _unbind_model(self) -> None:
        for module, p in self._restore_dropout:
            module.p = p
        self._restore_dropout = []
        self.reference.teardown()
        if self._restore_adapter is not None:
            self._restore_adapter()
            self._restore_adapter = None

    def _set_architecture(self, policy: Any) -> None:
        """Encoder-decoder or decoder-only, from the model's config; the collator builds batches to match."""
        encoder_decoder = check_architecture(policy, self.reference.given_ref_model, self.config.is_encoder_decoder)
        self.collator.encoder_decoder = encoder_decoder
        self.collator.decoder_start_token_id = decoder_start_token_id(policy) if encoder_decoder else None

    def _peft_reference(self, policy: Any) -> str:
        # an adapter this plugin added from peft_config has the base model as reference (TRL's null reference)
        if policy in self._wrapped and self.config.peft_reference == "auto":
            return "base"
        return self.config.peft_reference

    def _activate_model_adapter(self, policy: Any) -> None:
        """Make `model_adapter_name` the active, trainable adapter; `_unbind_model` restores the previous one."""
        name = self.model_adapter_name
        if name is None:
            return
        self._restore_adapter = activate_trained_adapter(policy, name)

    def rebind(self, trainer: Any, policy: Any) -> None:
        """Re-bind to a new policy instance (`Trainer.train()` re-creates the model when `model_init` is set).

        The frozen-copy reference is taken from `policy`, which is the model as `model_init` returned it.
        """
        self._unbind_model()
        policy_path = self._bind_policy(trainer, policy)
        logger.info(
            "kto_plugin: model_init made a new model; re-bound (reference: %s, log-probs from %s)",
            self.reference.describe(), policy_path.name,
        )

    @property
    def injected_metric_keys(self) -> set[str]:
        """Every metric key the plugin has added to the logs of the attached trainer (e.g. ``eval_kl``)."""
        return self._callback.injected_keys if self._callback is not None else set()

    def _log_summary(self, policy_path: Any, counts: tuple[int, int] | None) -> None:
        c = self.config
        data = (
            f"{counts[0]} desirable (weight {c.desirable_weight}) / {counts[1]} undesirable (weight "
            f"{c.undesirable_weight})" if counts is not None else "label counts unknown"
        )
        third_party = [(n, src) for n, src in self.plugins.describe() if src != "built-in"]
        logger.info(
            "kto_plugin: attached: loss=%s beta=%s | reference: %s | KL pass: %s | %s | log-probs from %s%s | "
            "%d third-party plugin(s)%s",
            c.loss_type,
            c.beta,
            self.reference.describe(),
            "on" if self.needs_kl else "off",
            data,
            policy_path.name,
            f" ({policy_path.reason})" if policy_path.reason else "",
            len(third_party),
            (": " + ", ".join(f"{n} [{src}]" for n, src in third_party)) if third_party else "",
        )

    def detach(self) -> None:
        """Restore the trainer exactly as it was before `attach()`."""
        trainer = self.trainer
        if trainer is None:
            return
        saved = self._saved
        trainer.compute_loss_func = saved["compute_loss_func"]
        if saved["loss_is_scaled_for_ga"] is _MISSING:
            trainer.__dict__.pop("loss_is_scaled_for_ga", None)
        else:
            trainer.loss_is_scaled_for_ga = saved["loss_is_scaled_for_ga"]
        trainer.args.remove_unused_columns = saved["remove_unused_columns"]
        trainer.label_names = saved["label_names"]
        trainer.data_collator = saved["data_collator"]
        self.collator.model_kwargs = saved["collator_model_kwargs"]
        self.collator.encoder_decoder, self.collator.decoder_start_token_id = saved["collator_encoder_decoder"]
        trainer.train_dataset = saved["train_dataset"]
        trainer.eval_dataset = saved["eval_dataset"]
        if saved["get_batch_samples"] is _MISSING:
            trainer.__dict__.pop("get_batch_samples", None)
        else:
            trainer.get_batch_samples = saved["get_batch_samples"]
        self.loss_hook.window_kl = None
        if saved["training_step"] is _MISSING:
            trainer.__dict__.pop("training_step", None)
        else:
            trainer.training_step = saved["training_step"]
        if saved["train"] is _MISSING:
            trainer.__dict__.pop("train", None)
        else:
            trainer.train = saved["train"]
        for callback in (self._callback, self._generation, self._skip_callback, self._resume, self._sync):
            if callback in trainer.callback_handler.callbacks:
                trainer.callback_handler.callbacks.remove(callback)
        self._compat.uninstall(trainer)
        self._unbind_model()
        self._callback = None
        self._generation = None
        self._resume = None
        self._skip_callback = None
        self._sync = None
        self._saved = {}
        self._precomputer = None
        self.trainer = None

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
        self._check_precomputable(dataset, name)
        args = trainer.args
        group = args.per_device_train_batch_size if train else args.per_device_eval_batch_size
        batch_size = self.config.precompute_ref_batch_size or group
        if self._precomputer is None:
            self._precomputer = self._make_precomputer(trainer)
        policy = trainer.accelerator.unwrap_model(trainer.model)
        with preserved_state(policy):
            policy.eval()  # a deterministic reference: no dropout whatever disable_dropout says
            return self._precomputer(dataset, name, group, batch_size)

    def _make_precomputer(self, trainer: Any) -> ReferencePrecomputer:
        if self.reference.mode == "released":
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
            lambda labels: self.loss_hook.reference_logps(trainer, labels),
            self.collator,
            settings,
            self.needs_kl,
            cache_dir,
        )

    def _precompute_attached_datasets(self, trainer: Any) -> None:
        if trainer.train_dataset is not None:
            trainer.train_dataset = self.precompute_reference(trainer.train_dataset, name="train", train=True)
        if isinstance(trainer.eval_dataset, dict):
            trainer.eval_dataset = {
                name: self.precompute_reference(ds, name=name) for name, ds in trainer.eval_dataset.items()
            }
        elif trainer.eval_dataset is not None:
            trainer.eval_dataset = self.precompute_reference(trainer.eval_dataset, name="eval")
        if self.reference.holds_model:
            self.reference.release()
            logger.info("kto_plugin: reference model released; training uses the precomputed log-probs")

    def _check_precomputable(self, dataset: Any, name: str) -> None:
        if isinstance(dataset, datasets.IterableDataset):
            raise ValueError(
                f"precompute_ref_log_probs=True cannot precompute the {name} dataset: it is an "
                "IterableDataset. Precomputation runs the reference over every row once before training and "
                "stores the results as columns of the dataset (cached on disk by its content), which needs a "
                "map-style dataset whose rows can be counted, indexed and extended; a stream has none of "
                "that. Materialise it (e.g. datasets.Dataset.from_generator(...) or load_dataset(..., "
                "streaming=False)), or set precompute_ref_log_probs=False to compute reference log-probs on "
                "the fly."
            )
        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(
                f"precompute_ref_log_probs=True needs the {name} dataset as a datasets.Dataset (it adds "
                f"columns), got {type(dataset).__name__}. Use kto.prepare_dataset(...), or "
                "datasets.Dataset.from_list(rows)."
            )
        missing = [c for c in ("prompt_ids", "completion_ids", "label") if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"The {name} dataset lacks {missing} (it has {dataset.column_names}): pass it through "
                "kto.prepare_dataset(...) before precomputing."
            )

    # --- checks ---

    @staticmethod
    def _sharded(trainer: Any) -> bool:
        return bool(getattr(trainer, "is_fsdp_enabled", False)) or bool(
            getattr(trainer, "is_deepspeed_enabled", False)
        )

    @staticmethod
    def _check_last_batch(dataset: Any, batch_size: int, drop_last: bool, name: str) -> None:
        try:
            size = len(dataset)
        except TypeError:  # None or an IterableDataset
            return
        if not drop_last and size % batch_size == 1:
            raise ValueError(
                f"The {name} dataset has {size} rows, so with a per-device batch of {batch_size} its last batch holds "
                "1 row, which has no mismatched pair for the KL estimate. Set dataloader_drop_last=True, change "
                f"the batch size, or add or remove a row."
            )

    def _check_padding_value(self, policy: Any) -> None:
        value = self.config.padding_value
        embeddings = policy.get_input_embeddings() if hasattr(policy, "get_input_embeddings") else None
        size = getattr(embeddings, "num_embeddings", None)
        if value is not None and size is not None and value >= size:
            raise ValueError(
                f"KTOConfig.padding_value={value} is not a token id of the model (its input embedding has {size} "
                "rows): padded positions are still looked up in the embedding. Use an id below that, or None for "
                "the tokenizer's pad token."
            )

    def _validate_precompute(self, trainer: Any) -> None:
        kind = sharding_of(trainer)
        if kind in ("fsdp", "deepspeed3"):
            raise NotImplementedError(
                f"precompute_ref_log_probs=True under {'FSDP' if kind == 'fsdp' else 'DeepSpeed ZeRO-3'} "
                "is not supported in this version: at attach() the policy is not yet sharded and placed, so "
                "the pass cannot run there. Use a PEFT model (its null reference costs no memory), or "
                "DeepSpeed ZeRO-1/2 / DDP."
            )
        if getattr(trainer, "model_init", None) is not None:
            raise ValueError(
                "precompute_ref_log_probs=True with a Trainer built from model_init: the pass at attach() would use "
                "the model that exists now, but train() builds a new one. Pass model= instead of model_init=, or "
                "turn precompute off."
            )
        has_adapter = self.peft_config is not None or AdapterHost.of(trainer.accelerator.unwrap_model(trainer.model))
        if self.config.generate_during_eval and not has_adapter:
            raise ValueError(
                "generate_during_eval=True needs a live reference to generate from, but precompute_ref_log_probs=True "
                "keeps no reference model (only PEFT adapter references stay available). Turn one of them off."
            )
        splits = {"train": trainer.train_dataset}
        if isinstance(trainer.eval_dataset, dict):
            splits.update(trainer.eval_dataset)
        else:
            splits["eval"] = trainer.eval_dataset
        for name, dataset in splits.items():
            if dataset is not None:
                self._check_precomputable(dataset, name)

    def _validate(self, trainer: Any) -> None:
        args = trainer.args
        policy = trainer.accelerator.unwrap_model(trainer.model)
        self._check_padding_value(policy)
        if self.needs_kl:
            for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
                if getattr(args, name) < 2:
                    raise ValueError(
                        f"TrainingArguments.{name}={getattr(args, name)}: loss_type={self.config.loss_type!r} estimates "
                        "its KL reference point from mismatched pairs within a per-device batch, which needs at "
                        f"least 2 rows. Set {name} >= 2 (the paper recommends >= 4)."
                    )
            if trainer.accelerator.num_processes == 1:
                self._check_last_batch(trainer.train_dataset, args.per_device_train_batch_size,
                                       args.dataloader_drop_last, "train")
                eval_sets = trainer.eval_dataset if isinstance(trainer.eval_dataset, dict) else {
                    "eval": trainer.eval_dataset}
                for name, ds in eval_sets.items():
                    self._check_last_batch(ds, args.per_device_eval_batch_size, args.dataloader_drop_last, name)
        if self.config.precompute_ref_log_probs:
            self._validate_precompute(trainer)
        if self.config.generate_during_eval and self.processor is not None:
            raise NotImplementedError(
                "KTOConfig.generate_during_eval is not supported with a processor (vision-language rows): the "
                "samples would be generated without the images. Turn it off."
            )
        if self.config.generate_during_eval and getattr(trainer, "is_fsdp_enabled", False):
            raise NotImplementedError(
                "KTOConfig.generate_during_eval is not supported under FSDP (generation would need the full "
                "parameters gathered on every rank). Turn it off, or generate from a saved checkpoint after training."
            )
        if self.config.on_nonfinite == "skip" and getattr(trainer, "is_deepspeed_enabled", False):
            raise NotImplementedError(
                "KTOConfig.on_nonfinite='skip' is not supported under DeepSpeed: its engine steps the optimizer "
                "inside backward, so the plugin cannot drop an update. Use on_nonfinite='warn' or 'raise' (DeepSpeed's "
                "fp16 loss scaler already skips overflowing steps)."
            )
        check_liger(args)  # raises before anything is changed
        if self.config.activation_offloading and sharding_of(trainer) in ("fsdp", "deepspeed3"):
            raise NotImplementedError(
                "KTOConfig.activation_offloading is not supported under FSDP or DeepSpeed ZeRO-3 in this version "
                "(gathered parameters would be taken for activations and copied). Use DDP or ZeRO-1/2, or turn it "
                "off (activation checkpointing, gradient_checkpointing=True, also saves activation memory)."
            )


class WindowBatchSamples:
    """Wraps a trainer's `get_batch_samples` (instance attribute, undone by `detach`) for ``kl_estimate="window"``:
    after the Trainer fetches a gradient-accumulation window's micro-batches, z0 is estimated over all of them
    (and all processes) before the first one's loss."""

    def __init__(self, original: Any, trainer: Any, loss_hook: KTOComputeLoss) -> None:
        self.original = original
        self.trainer = trainer
        self.loss_hook = loss_hook

    def __call__(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
        batch_samples, num_items_in_batch = self.original(epoch_iterator, num_batches, device)
        self.loss_hook.window_kl = None
        if batch_samples:
            self.loss_hook.window_reference_point(self.trainer, batch_samples)
        return batch_samples, num_items_in_batch
