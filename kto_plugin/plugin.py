"""`KTOPlugin`: KTO on a stock `transformers.Trainer` in four lines, with `attach()` and an exact `detach()`."""

from __future__ import annotations

import logging
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
from .plugin_manager import KTOPluginManager
from .adapters import AdapterHost
from .precompute import ReferencePrecomputer, default_cache_dir
from .reference import ReferenceManager, disable_dropout, preserved_state
from .sharding import sharding_of

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
        ref_model: a separate reference model. None: the initial policy: a frozen copy of a plain model; for a
            PEFT model the base model with the adapter off, or a frozen copy of an already-trained adapter
            (`KTOConfig.peft_reference`); with `precompute_ref_log_probs`, no reference model at all.
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
        self._generation: KTOGenerationCallback | None = None
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
        columns; returns a `datasets` object of the same kind with `prompt_ids`, `completion_ids` and `label`
        (other columns kept). Paired rows come out in `KTOConfig.paired_order`. What is dropped or truncated
        is counted in `self.data_reports[name]` and logged once.
        """
        data = as_dataset(dataset, name)
        if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            return type(data)({split: self.prepare_dataset(ds, name=split) for split, ds in data.items()})
        prepared, report = Preparer(self.tokenizer, self.config)(data, name)
        self.data_reports[name] = report
        noteworthy = report.dropped_prompt_too_long or report.truncated or report.prompt_truncated or report.balance
        logger.log(logging.WARNING if noteworthy else logging.INFO, "kto_plugin: prepared %s", report.summary())
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
        saved["train_dataset"] = trainer.train_dataset
        saved["eval_dataset"] = trainer.eval_dataset

        policy_path = self._bind_model(trainer, policy)

        trainer.compute_loss_func = self.loss_hook
        # the loss is a per-micro-batch mean: let the Trainer divide by the accumulation steps
        trainer.loss_is_scaled_for_ga = False
        trainer.args.remove_unused_columns = False
        trainer.label_names = ["labels"]
        if not isinstance(trainer.data_collator, KTOCollator):
            trainer.data_collator = self.collator
        self._callback = KTOMetricsCallback(self.metrics, lambda: trainer.model.training)
        trainer.callback_handler.callbacks.insert(0, self._callback)
        if self.config.generate_during_eval:
            self._generation = KTOGenerationCallback(
                trainer, self.reference, self.tokenizer, self.config.generate_num_prompts,
                self.config.generate_max_new_tokens,
            )
            trainer.callback_handler.callbacks.insert(1, self._generation)
        self._compat.install(trainer)
        self.trainer = trainer
        if self.config.precompute_ref_log_probs:
            try:
                self._precompute_attached_datasets(trainer)
            except BaseException:
                self.detach()
                raise
        counts = label_counts(trainer, self.data_reports)
        self._log_summary(policy_path, counts)
        if self.config.warn_guidance:
            is_adapter = AdapterHost.of(policy) is not None
            self.adviser.give(attach_advice(self.config, trainer, self.needs_kl, is_adapter, counts))
        return trainer

    def _bind_model(self, trainer: Any, policy: Any) -> LogpsPath:
        """Everything tied to the policy instance: the reference, the log-prob paths, dropout."""
        self.reference.setup(
            trainer,
            policy,
            disable_ref_dropout=self.config.disable_dropout,
            peft_reference=self.config.peft_reference,
            precompute=self.config.precompute_ref_log_probs,
        )
        policy_path = choose_path(policy, sharded=self._sharded(trainer))
        reference_model = self.reference.ref_model
        reference_path = (
            choose_path(trainer.accelerator.unwrap_model(reference_model), sharded=self._sharded(trainer))
            if reference_model is not None
            else policy_path
        )
        self.loss_hook.bind(trainer, policy_path, reference_path)
        self.collator.model_kwargs = policy_path.model_kwargs()
        if self.config.disable_dropout:
            self._restore_dropout = disable_dropout(policy)
        return policy_path

    def _unbind_model(self) -> None:
        for module, p in self._restore_dropout:
            module.p = p
        self._restore_dropout = []
        self.reference.teardown()

    def rebind(self, trainer: Any, policy: Any) -> None:
        """Re-bind to a new policy instance (`Trainer.train()` re-creates the model when `model_init` is set).

        The frozen-copy reference is taken from `policy`, which is the model as `model_init` returned it.
        """
        self._unbind_model()
        policy_path = self._bind_model(trainer, policy)
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
        trainer.train_dataset = saved["train_dataset"]
        trainer.eval_dataset = saved["eval_dataset"]
        for callback in (self._callback, self._generation):
            if callback in trainer.callback_handler.callbacks:
                trainer.callback_handler.callbacks.remove(callback)
        self._compat.uninstall(trainer)
        self._unbind_model()
        self._callback = None
        self._generation = None
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
        if self.config.generate_during_eval and AdapterHost.of(trainer.accelerator.unwrap_model(trainer.model)) is None:
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
        if self.config.generate_during_eval and getattr(trainer, "is_fsdp_enabled", False):
            raise NotImplementedError(
                "KTOConfig.generate_during_eval is not supported under FSDP (generation would need the full "
                "parameters gathered on every rank). Turn it off, or generate from a saved checkpoint after training."
            )
        check_liger(args)  # raises before anything is changed
        unsupported = {
            "sync_ref_model": self.config.sync_ref_model,
            "activation_offloading": self.config.activation_offloading,
            "router_aux_loss_coef": self.config.router_aux_loss_coef is not None,
            "kl_estimate='window'": self.config.kl_estimate == "window",
        }
        for name, is_set in unsupported.items():
            if is_set:
                raise NotImplementedError(f"KTOConfig.{name} is not supported in this version of kto_plugin.")
