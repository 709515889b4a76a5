"""Preparing a separate reference model for the Trainer's distributed set-up (case: `ref_model=` or a frozen
copy).

What each set-up gets (the facts follow TRL 1.16's `prepare_deepspeed` / `prepare_fsdp` and accelerate 1.15):

* no sharding (one device, DDP): ``accelerator.prepare_model(model, evaluation_mode=True)``: moved to the
  device and, under mixed precision, given the same autocast forward as the policy; never wrapped in DDP (it
  has no gradients to synchronise).
* DeepSpeed ZeRO-0/1/2: a full copy on every device, cast to DeepSpeed's compute dtype (bf16/fp16 when the
  DeepSpeed config enables it), as TRL's stage-0 inference engine does; no engine is needed for a module
  without optimizer state.
* DeepSpeed ZeRO-3: a DeepSpeed inference engine over the reference (the DeepSpeed config without optimizer,
  scheduler and optimizer offload; ``"auto"`` bucket sizes resolved from the hidden size), so the reference is
  sharded like the policy and gathered layer by layer in its forward.
* FSDP2: accelerate's ``fsdp2_prepare_model`` (the plugin's auto-wrap policy, mixed precision, CPU offload
  and mesh), FSDP1: ``FullyShardedDataParallel`` with the plugin's settings; eval mode.

The FSDP2 branch is tested on CPU with two gloo processes (`tests/scripts/fsdp_reference.py`: sharded,
frozen, eval mode, logits equal to the unsharded model's); accelerate 1.15 enables FSDP in the Trainer only on
accelerator devices, so the end-to-end FSDP run needs GPUs. The ZeRO-3 and FSDP1 branches need GPUs (and
DeepSpeed) and are not exercised by this repository's tests. Where the parameters are sharded (FSDP, ZeRO-3:
`shards_parameters`) log-probs come from the model's own logits, since a sharded LM head cannot be applied
outside the model's forward; ZeRO-1/2 keep full weights on every process and use the hidden-state path.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("kto_plugin")


def sharding_of(trainer: Any) -> str:
    """``"fsdp"``, ``"deepspeed3"``, ``"deepspeed"`` (ZeRO-0/1/2) or ``"none"``."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return "fsdp"
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = trainer.accelerator.state.deepspeed_plugin
        return "deepspeed3" if int(getattr(plugin, "zero_stage", 0) or 0) == 3 else "deepspeed"
    return "none"


def shards_parameters(trainer: Any) -> bool:
    """True where each process holds only a shard of the parameters (FSDP, DeepSpeed ZeRO-3): the LM head cannot be
    applied outside the model's forward, and a hash of the local weights would not identify the model. ZeRO-1/2
    shard optimizer state and gradients only, so every process has the full weights there."""
    return sharding_of(trainer) in ("fsdp", "deepspeed3")


def describe_sharding(trainer: Any) -> str:
    """The set-up's name for messages: "FSDP", "DeepSpeed ZeRO-3", "DeepSpeed ZeRO-1/2" or "no sharding"."""
    return {"fsdp": "FSDP", "deepspeed3": "DeepSpeed ZeRO-3", "deepspeed": "DeepSpeed ZeRO-1/2"}.get(
        sharding_of(trainer), "no sharding"
    )


def prepare_reference(trainer: Any, model: nn.Module) -> nn.Module:
    """Place (and where the policy is sharded, shard) a frozen reference model; returns the module to call."""
    accelerator = trainer.accelerator
    kind = sharding_of(trainer)
    if kind == "none":
        return accelerator.prepare_model(model, evaluation_mode=True)
    logger.info("kto_plugin: preparing the reference model for %s", kind)
    if kind == "deepspeed":
        dtype = _deepspeed_dtype(accelerator.state.deepspeed_plugin.deepspeed_config)
        if dtype is not None:
            model = model.to(dtype)
        return model.to(accelerator.device).eval()
    if kind == "deepspeed3":  # pragma: no cover - needs deepspeed and GPUs
        return _deepspeed_inference_engine(model, accelerator)
    return _fsdp(model, accelerator)


def _deepspeed_dtype(config: dict[str, Any]) -> torch.dtype | None:
    if (config.get("bf16") or {}).get("enabled") in (True, "true"):
        return torch.bfloat16
    if (config.get("fp16") or {}).get("enabled") in (True, "true"):
        return torch.float16
    return None


def _deepspeed_inference_engine(model: nn.Module, accelerator: Any) -> nn.Module:  # pragma: no cover
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden is not None:
        for key, value in (
            ("reduce_bucket_size", hidden * hidden),
            ("stage3_param_persistence_threshold", 10 * hidden),
            ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
        ):
            if zero.get(key) == "auto":
                zero[key] = value
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def _fsdp(model: nn.Module, accelerator: Any) -> nn.Module:
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version == 2:
        from accelerate.utils import fsdp2_prepare_model

        model = fsdp2_prepare_model(accelerator, model)
    else:  # pragma: no cover - FSDP1 needs GPUs
        from torch.distributed.fsdp import FullyShardedDataParallel

        plugin.set_auto_wrap_policy(model)
        model = FullyShardedDataParallel(
            model,
            sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
            cpu_offload=plugin.cpu_offload,
            auto_wrap_policy=plugin.auto_wrap_policy,
            mixed_precision=plugin.mixed_precision_policy,
            sync_module_states=plugin.sync_module_states,
            backward_prefetch=plugin.backward_prefetch,
            forward_prefetch=plugin.forward_prefetch,
            use_orig_params=plugin.use_orig_params,
            limit_all_gathers=plugin.limit_all_gathers,
            device_id=accelerator.device,
        )
    model.eval()
    return model
