"""`KTOPlugin`: KTO on a stock `transformers.Trainer` in four lines, with `attach()` and an exact `detach()`."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import datasets

from .collator import KTOCollator
from .compute_loss import KTOComputeLoss
from .config import KTOConfig
from .data import DataReport, _as_dataset, prepare_split
from .logprobs import choose_path
from .metrics import KTOMetricsCallback, MetricsAccumulator
from .plugin_manager import KTOPluginManager
from .reference import ReferenceManager, disable_dropout

logger = logging.getLogger("kto_plugin")

_MISSING = object()


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
        ref_model: a separate reference model. None: a frozen copy of the initial policy, or for a PEFT
            model the base model with the adapter off (or the adapter named by `ref_adapter_name`).
        ref_adapter_name: a PEFT adapter of the policy to use as the reference (an adapter named ``"ref"``
            is used by convention when present).
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
    ) -> None:
        if tokenizer is None:
            raise ValueError("KTOPlugin needs the policy's tokenizer: KTOPlugin(config, tokenizer=tokenizer).")
        self.config = config if config is not None else KTOConfig()
        if not isinstance(self.config, KTOConfig):
            raise TypeError(f"config must be a KTOConfig, got {type(self.config).__name__}.")
        self.tokenizer = tokenizer
        self.plugins = KTOPluginManager(plugins)
        self.needs_kl = self.plugins.needs_kl(self.config)
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ValueError(
                    "The tokenizer has neither a pad token nor an EOS token. Set one: tokenizer.pad_token = '...'."
                )
            tokenizer.pad_token = tokenizer.eos_token
            logger.warning("kto_plugin: the tokenizer has no pad token; using its EOS token %r to pad.", tokenizer.eos_token)
        self.collator = KTOCollator(
            pad_token_id=tokenizer.pad_token_id,
            max_length=self.config.max_length,
            truncation_mode=self.config.truncation_mode,
            pad_to_multiple_of=self.config.pad_to_multiple_of,
            build_kl=self.needs_kl,
        )
        self.reference = ReferenceManager(ref_model, ref_adapter_name)
        self.metrics = MetricsAccumulator()
        self.loss_hook = KTOComputeLoss(self.config, self.plugins, self.reference, self.metrics, self.needs_kl)
        self.data_reports: dict[str, DataReport] = {}
        self.trainer: Any = None
        self._saved: dict[str, Any] = {}
        self._callback: KTOMetricsCallback | None = None
        self._restore_dropout: list = []

    # --- data ---

    def prepare_dataset(self, dataset: Any, name: str = "train") -> Any:
        """Tokenize unpaired rows ``{prompt, completion, label}`` (plain text or conversational).

        Takes a `datasets.Dataset`, a `DatasetDict` (each split, reported under its split name) or a list of
        dicts; returns the same kind with `prompt_ids`, `completion_ids` and `label` (other columns kept).
        What is dropped or truncated is counted in `self.data_reports[name]` and logged.
        """
        data = _as_dataset(dataset, name)
        if isinstance(data, datasets.DatasetDict):
            return datasets.DatasetDict({split: self.prepare_dataset(ds, name=split) for split, ds in data.items()})
        prepared, report = prepare_split(
            data,
            self.tokenizer,
            name=name,
            max_length=self.config.max_length,
            max_prompt_length=self.config.max_prompt_length,
            num_proc=self.config.dataset_num_proc,
        )
        self.data_reports[name] = report
        logger.info("kto_plugin: prepared %s", report.summary())
        return prepared

    # --- attach / detach ---

    def attach(self, trainer: Any) -> Any:
        """Make `trainer` train with KTO. Idempotent; undone by `detach()`. Returns the trainer."""
        if self.trainer is trainer:
            return trainer
        if self.trainer is not None:
            raise RuntimeError("This KTOPlugin is attached to another Trainer; call detach() first.")
        if getattr(trainer, "compute_loss_func", None) is not None and not isinstance(
            trainer.compute_loss_func, KTOComputeLoss
        ):
            raise ValueError(
                "The trainer already has a compute_loss_func; KTO replaces the loss. Create the Trainer without "
                "compute_loss_func."
            )
        # plugins registered since construction (kto.plugins.register) count too
        self.plugins.check()
        self.needs_kl = self.loss_hook.needs_kl = self.collator.build_kl = self.plugins.needs_kl(self.config)
        self._validate(trainer)
        policy = trainer.accelerator.unwrap_model(trainer.model)

        saved = self._saved
        saved["compute_loss_func"] = trainer.compute_loss_func
        saved["loss_is_scaled_for_ga"] = trainer.__dict__.get("loss_is_scaled_for_ga", _MISSING)
        saved["remove_unused_columns"] = trainer.args.remove_unused_columns
        saved["label_names"] = trainer.label_names
        saved["data_collator"] = trainer.data_collator
        saved["collator_model_kwargs"] = self.collator.model_kwargs

        self.reference.setup(trainer, policy, disable_ref_dropout=self.config.disable_dropout)
        policy_path = choose_path(policy, sharded=self._sharded(trainer))
        reference_model = self.reference.ref_model
        reference_path = (
            choose_path(trainer.accelerator.unwrap_model(reference_model), sharded=self._sharded(trainer))
            if reference_model is not None
            else policy_path
        )
        self.loss_hook.bind(trainer, policy_path, reference_path)
        self.collator.model_kwargs = policy_path.model_kwargs()

        trainer.compute_loss_func = self.loss_hook
        # the loss is a per-micro-batch mean: let the Trainer divide by the accumulation steps
        trainer.loss_is_scaled_for_ga = False
        trainer.args.remove_unused_columns = False
        trainer.label_names = ["labels"]
        if not isinstance(trainer.data_collator, KTOCollator):
            trainer.data_collator = self.collator
        self._callback = KTOMetricsCallback(self.metrics, lambda: trainer.model.training)
        trainer.callback_handler.callbacks.insert(0, self._callback)
        if self.config.disable_dropout:
            self._restore_dropout = disable_dropout(policy)
        self.trainer = trainer
        logger.info(
            "kto_plugin: attached (loss=%s, reference=%s, KL pass=%s, log-probs from %s%s; plugins: %s)",
            self.config.loss_type,
            self.reference.describe(),
            "on" if self.needs_kl else "off",
            policy_path.name,
            f" because {policy_path.reason}" if policy_path.reason else "",
            ", ".join(f"{n} [{src}]" for n, src in self.plugins.describe()),
        )
        return trainer

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
        if self._callback in trainer.callback_handler.callbacks:
            trainer.callback_handler.callbacks.remove(self._callback)
        for module, p in self._restore_dropout:
            module.p = p
        self._restore_dropout = []
        self.reference.teardown()
        self._callback = None
        self._saved = {}
        self.trainer = None

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

    def _validate(self, trainer: Any) -> None:
        args = trainer.args
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
        unsupported = {
            "sync_ref_model": self.config.sync_ref_model,
            "precompute_ref_log_probs": self.config.precompute_ref_log_probs,
            "activation_offloading": self.config.activation_offloading,
            "router_aux_loss_coef": self.config.router_aux_loss_coef is not None,
            "kl_estimate='window'": self.config.kl_estimate == "window",
        }
        for name, is_set in unsupported.items():
            if is_set:
                raise NotImplementedError(f"KTOConfig.{name} is not supported in this version of kto_plugin.")
