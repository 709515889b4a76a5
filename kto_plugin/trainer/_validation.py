"""What `attach()` refuses, before it changes anything: each check names the setting and says how to fix it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..config import KTOConfig
from ..integrations._liger import check_liger
from ..reference._adapters import AdapterHost
from ..reference._precompute import check_precomputable
from ..reference._sharding import describe_sharding, shards_parameters

if TYPE_CHECKING:
    from transformers import Trainer

    from ..plugin import KTOPlugin


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


def _check_padding_value(config: KTOConfig, policy: Any) -> None:
    value = config.padding_value
    embeddings = policy.get_input_embeddings() if hasattr(policy, "get_input_embeddings") else None
    size = getattr(embeddings, "num_embeddings", None)
    if value is not None and size is not None and value >= size:
        raise ValueError(
            f"KTOConfig.padding_value={value} is not a token id of the model (its input embedding has {size} "
            "rows): padded positions are still looked up in the embedding. Use an id below that, or None for "
            "the tokenizer's pad token."
        )


def _validate_precompute(plugin: KTOPlugin, trainer: Trainer) -> None:
    if shards_parameters(trainer):
        raise NotImplementedError(
            f"precompute_ref_log_probs=True under {describe_sharding(trainer)} "
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
    has_adapter = plugin.peft_config is not None or AdapterHost.of(trainer.accelerator.unwrap_model(trainer.model))
    if plugin.config.generate_during_eval and not has_adapter:
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
            check_precomputable(dataset, name)


def validate(plugin: KTOPlugin, trainer: Trainer) -> None:
    """Every refusal `attach()` makes before it changes anything, each naming the setting and the fix."""
    config = plugin.config
    args = trainer.args
    policy = trainer.accelerator.unwrap_model(trainer.model)
    _check_padding_value(config, policy)
    if plugin.needs_kl:
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            if getattr(args, name) < 2:
                raise ValueError(
                    f"TrainingArguments.{name}={getattr(args, name)}: loss_type={config.loss_type!r} estimates "
                    "its KL reference point from mismatched pairs within a per-device batch, which needs at "
                    f"least 2 rows. Set {name} >= 2 (the paper recommends >= 4)."
                )
        if trainer.accelerator.num_processes == 1:
            _check_last_batch(trainer.train_dataset, args.per_device_train_batch_size,
                                   args.dataloader_drop_last, "train")
            eval_sets = trainer.eval_dataset if isinstance(trainer.eval_dataset, dict) else {
                "eval": trainer.eval_dataset}
            for name, ds in eval_sets.items():
                _check_last_batch(ds, args.per_device_eval_batch_size, args.dataloader_drop_last, name)
    if config.precompute_ref_log_probs:
        _validate_precompute(plugin, trainer)
    if config.generate_during_eval and plugin.processor is not None:
        raise NotImplementedError(
            "KTOConfig.generate_during_eval is not supported with a processor (vision-language rows): the "
            "samples would be generated without the images. Turn it off."
        )
    if config.generate_during_eval and getattr(trainer, "is_fsdp_enabled", False):
        raise NotImplementedError(
            "KTOConfig.generate_during_eval is not supported under FSDP (generation would need the full "
            "parameters gathered on every rank). Turn it off, or generate from a saved checkpoint after training."
        )
    if config.on_nonfinite == "skip" and getattr(trainer, "is_deepspeed_enabled", False):
        raise NotImplementedError(
            "KTOConfig.on_nonfinite='skip' is not supported under DeepSpeed: its engine steps the optimizer "
            "inside backward, so the plugin cannot drop an update. Use on_nonfinite='warn' or 'raise' (DeepSpeed's "
            "fp16 loss scaler already skips overflowing steps)."
        )
    check_liger(args)  # raises before anything is changed
    if config.activation_offloading and shards_parameters(trainer):
        raise NotImplementedError(
            "KTOConfig.activation_offloading is not supported under FSDP or DeepSpeed ZeRO-3 in this version "
            "(gathered parameters would be taken for activations and copied). Use DDP or ZeRO-1/2, or turn it "
            "off (activation checkpointing, gradient_checkpointing=True, also saves activation memory)."
        )
