"""What `KTOPlugin.attach` does to a Trainer, in order, every change through the plugin's ledgers.

Two ledgers (`kto_plugin.trainer._ledger`):

* ``plugin.binding``: what is tied to the policy instance (the reference, the log-prob paths, dropout, the trained
  adapter, the collator's model settings). `model_init` makes a new policy in `train()`, so this one is undone
  and made again by `KTOPlugin.rebind`.
* ``plugin.ledger``: everything else on the Trainer (loss hook, arguments, collator, callbacks, wrapped methods,
  datasets with precomputed columns).

`detach()` undoes the second, then the first.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from ..config import KTOConfig
from ..data import KTOCollator
from ..integrations._eval_predictions import install_eval_predictions
from ..integrations._generation import KTOGenerationCallback
from ..integrations._hpo import install_model_init
from ..integrations._liger import install_liger
from ..integrations._offload import ActivationOffloader, OffloadingTrainingStep
from ..integrations._router import router_aux_coef
from ..reference._adapters import AdapterHost, activate_trained_adapter
from ..reference._sharding import shards_parameters
from ..reference._sync import ReferenceSyncCallback, sync_pairs
from ..step._buckets import use_buckets
from ..step._logprobs import LogpsPath, choose_path
from ..step._shared_prompt import choose_sharing
from ..step._reference_point import WindowBatchSamples
from ._callbacks import KTOMetricsCallback, NonFiniteSkipCallback
from ._guidance import attach_advice, label_counts
from ._models import check_architecture, decoder_start_token_id
from ._resume import RecordCheckpointTrain, ResumeCallback

if TYPE_CHECKING:
    from transformers import Trainer

    from ..plugin import KTOPlugin

logger = logging.getLogger("kto_plugin")
# the KTO family's options, named in the attach summary when not at their defaults (docs/losses.md)
FAMILY_OPTIONS = ("length_normalize", "reference_point", "reference_point_ema_decay", "sft_weight",
                  "humanline_min_log_ratio", "humanline_max_log_ratio")


def bind_model(plugin: KTOPlugin, trainer: Trainer, policy: torch.nn.Module) -> LogpsPath:
    """Everything tied to the policy instance (the unwrapped model), recorded in ``plugin.binding``: the
    architecture, the trained adapter, the reference, the log-prob paths, dropout. Returns the policy's path."""
    binding, config, collator = plugin.binding, plugin.config, plugin.collator
    encoder_decoder = check_architecture(policy, plugin.reference.given_ref_model, config.is_encoder_decoder)
    binding.setattr(collator, "encoder_decoder", encoder_decoder)
    binding.setattr(collator, "decoder_start_token_id", decoder_start_token_id(policy) if encoder_decoder else None)
    if plugin.model_adapter_name is not None:
        activate_trained_adapter(policy, plugin.model_adapter_name, binding)
    aux_coef = router_aux_coef(config, policy)  # may refuse: before the reference is set up
    binding.on_undo(plugin.reference, "teardown")
    plugin.reference.setup(
        trainer,
        policy,
        disable_ref_dropout=config.disable_dropout,
        peft_reference=plugin.peft_reference_of(policy),
        precompute=config.precompute_ref_log_probs,
    )
    if config.sync_ref_model:
        sync_pairs(trainer, plugin.reference)  # refuses a reference that cannot follow the policy
    sharded = shards_parameters(trainer)
    policy_path = choose_path(policy, sharded=sharded)
    reference_model = plugin.reference.ref_model
    reference_path = (
        choose_path(trainer.accelerator.unwrap_model(reference_model), sharded=sharded)
        if reference_model is not None
        else policy_path
    )
    policy_path.ignore_index = reference_path.ignore_index = config.label_pad_token_id
    hook = plugin.loss_hook
    binding.on_undo(hook, "bind", None)
    hook.bind(trainer, policy_path, reference_path)
    binding.setattr(hook, "router_aux_loss_coef", aux_coef)
    checkpointing = activation_checkpointing(trainer.args, policy)
    policy_sharing = choose_sharing(
        policy, policy_path, config.reuse_prompt_cache, plugin.needs_kl and config.kl_estimate != "window",
        checkpointing,
    )
    binding.setattr(hook.passes, "policy_sharing", policy_sharing)
    # a separate reference model runs in eval mode; an adapter reference runs through the policy's module
    binding.setattr(hook.passes, "reference_sharing", choose_sharing(
        trainer.accelerator.unwrap_model(reference_model) if reference_model is not None else policy,
        reference_path, config.reuse_prompt_cache, plugin.needs_kl, checkpointing and reference_model is None,
        role="reference",
    ))
    binding.setattr(hook.passes, "bucketed", use_buckets(config.length_buckets, trainer.accelerator.device))
    model_kwargs = policy_path.model_kwargs()
    if policy_sharing.on:
        model_kwargs["use_cache"] = True  # the Trainer's forward keeps the prompts' keys and values for the KL pass
    if aux_coef is not None:
        # the Trainer's policy forward (not the reference or KL passes) returns the model's own aux_loss
        model_kwargs["output_router_logits"] = True
    binding.setattr(collator, "model_kwargs", model_kwargs)
    if config.disable_dropout:
        for module in policy.modules():
            if isinstance(module, torch.nn.Dropout) and module.p != 0:
                binding.setattr(module, "p", 0.0)
    return policy_path


def activation_checkpointing(args: Any, policy: torch.nn.Module) -> bool:
    """Whether the policy trains with activation (gradient) checkpointing: asked for in the arguments (the Trainer
    turns it on in `train()`, after attach) or already on. transformers 5.25 renamed `gradient_checkpointing` to
    `activation_checkpointing` (the old names warn), older releases have the old names only."""
    asked = getattr(args, "activation_checkpointing", None)
    if asked is None:
        asked = getattr(args, "gradient_checkpointing", False)
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    name = next((n for n in ("is_activation_checkpointing", "is_gradient_checkpointing") if hasattr(type(base), n)), None)
    return bool(asked) or (name is not None and bool(getattr(base, name)))


def install(plugin: KTOPlugin, trainer: Trainer, policy_path: LogpsPath) -> None:
    """Every change to the Trainer, in ``plugin.ledger``; the caller undoes it all if this raises."""
    ledger, config, hook = plugin.ledger, plugin.config, plugin.loss_hook
    ledger.setattr(trainer, "compute_loss_func", hook)
    # the loss is a per-micro-batch mean: let the Trainer divide by the accumulation steps
    ledger.setattr(trainer, "loss_is_scaled_for_ga", False)
    ledger.setattr(trainer.args, "remove_unused_columns", False)
    ledger.setattr(trainer, "label_names", ["labels"])
    if trainer.data_collator is not plugin.collator:
        # also another KTOCollator (e.g. an earlier KTOPlugin's): the batch must be built as this plugin set its
        # collator up (KL batch or not, model kwargs, encoder-decoder layout)
        if isinstance(trainer.data_collator, KTOCollator):
            logger.info("kto_plugin: the Trainer's KTOCollator is not this plugin's; using kto.collator")
        ledger.setattr(trainer, "data_collator", plugin.collator)
    plugin.metrics_callback = KTOMetricsCallback(plugin.metrics, trainer, hook.evaluation_metrics)
    ledger.add_callback(trainer, plugin.metrics_callback, index=0)  # before the reporters
    if config.generate_during_eval:
        generation = KTOGenerationCallback(
            trainer, plugin.reference, plugin.tokenizer, config.generate_num_prompts, config.generate_max_new_tokens
        )
        ledger.add_callback(trainer, generation, index=1)
    if config.sync_ref_model:
        sync = ReferenceSyncCallback(
            trainer, plugin.reference, config.ref_model_mixup_alpha, config.ref_model_sync_steps
        )
        ledger.add_callback(trainer, sync)  # after the optimizer step, as TRL's
    # last: its on_log stores the accumulator after the metrics callback has taken the interval's values, and its
    # on_step_end saves the synced reference after the sync callback's update
    resume = ResumeCallback(plugin)
    ledger.add_callback(trainer, resume)
    # resolves resume_from_checkpoint to a complete checkpoint, and tells the callback which one it is
    ledger.wrap(trainer, "train", RecordCheckpointTrain, trainer, resume)
    if config.on_nonfinite == "skip":
        ledger.add_callback(trainer, NonFiniteSkipCallback(plugin.nonfinite), index=0)
    if config.kl_estimate == "window" and plugin.needs_kl:
        ledger.wrap(trainer, "get_batch_samples", WindowBatchSamples, trainer, hook)
    if config.activation_offloading:
        plugin.activation_offloader = ActivationOffloader()
        ledger.wrap(trainer, "training_step", OffloadingTrainingStep, trainer, plugin.activation_offloader)
    install_liger(plugin, trainer)
    install_eval_predictions(plugin, trainer)
    install_model_init(plugin, trainer)
    if config.precompute_ref_log_probs:
        plugin.precompute_attached_datasets(trainer)
    counts = label_counts(trainer)
    log_summary(plugin, policy_path, counts)
    if config.warn_guidance:
        is_adapter = AdapterHost.of(trainer.accelerator.unwrap_model(trainer.model)) is not None
        plugin.adviser.give(attach_advice(config, trainer, plugin.needs_kl, is_adapter, counts))


def log_summary(plugin: KTOPlugin, policy_path: Any, counts: tuple[int, int] | None) -> None:
    c = plugin.config
    data = (
        f"{counts[0]} desirable (weight {c.desirable_weight}) / {counts[1]} undesirable (weight "
        f"{c.undesirable_weight})" if counts is not None else "label counts unknown"
    )
    third_party = [(n, src) for n, src in plugin.plugins.describe() if src != "built-in"]
    family = [f"{name}={getattr(c, name)!r}" for name in FAMILY_OPTIONS
              if getattr(c, name) != KTOConfig.__dataclass_fields__[name].default]
    passes = plugin.loss_hook.passes
    logger.info(
        "kto_plugin: attached: loss=%s%s beta=%s | reference: %s | KL pass: %s | %s | log-probs from %s%s | "
        "prompts computed once: policy %s, reference %s | %d third-party plugin(s)%s",
        c.loss_type,
        f" ({', '.join(family)})" if family else "",
        c.beta,
        plugin.reference.describe(),
        "on" if plugin.needs_kl else "off",
        data,
        policy_path.name,
        f" ({policy_path.reason})" if policy_path.reason else "",
        passes.policy_sharing.describe(),
        passes.reference_sharing.describe(),
        len(third_party),
        (": " + ", ".join(f"{n} [{src}]" for n, src in third_party)) if third_party else "",
    )
