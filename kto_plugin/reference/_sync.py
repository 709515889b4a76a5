"""TR-DPO reference updates (`KTOConfig.sync_ref_model`): the reference follows the policy slowly.

Every `ref_model_sync_steps` optimizer steps (tau), after the optimizer step, every reference parameter becomes
``alpha * policy + (1 - alpha) * reference`` with ``alpha = ref_model_mixup_alpha`` (TR-DPO, Gorbatovski et
al. 2024, "soft update"; TRL 1.16's `SyncRefModelCallback` does the same at `on_step_end` when
``global_step % tau == 0``).

What is mixed depends on the reference (`ReferenceManager.mode`):

* ``model`` (a separate `ref_model`, or the frozen copy of a plain policy): every parameter, matched by name with
  the policy's (same architecture required). A given `ref_model` is updated in place.
* ``named_adapter`` (an adapter named ``"ref"``, `ref_adapter_name`, or the frozen copy of a trained adapter):
  the reference adapter's parameters, matched with the trained adapter's (same adapter config required). TRL
  1.16 refuses every PEFT policy here.
* ``null_adapter`` (the base model with the adapter off) cannot follow the policy: the base weights are the
  policy's own. Refused at `attach()`.

A checkpoint holds the synced reference's tensors (`save_reference`, ``kto_ref_model.safetensors``), which a
resumed run loads back (`kto_plugin.trainer._resume`); TRL 1.16 resumes against the reference it rebuilt.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ._adapters import AdapterHost, _rename
from ._cache import write_atomically
from ._manager import ReferenceManager
from ._sharding import describe_sharding, shards_parameters

logger = logging.getLogger("kto_plugin")


def mix_into(pairs: list[tuple[torch.Tensor, torch.Tensor]], alpha: float) -> None:
    """In place, for each ``(target, source)``: ``target <- alpha * source + (1 - alpha) * target``."""
    with torch.no_grad():
        for target, source in pairs:
            target.mul_(1.0 - alpha).add_(source.detach().to(device=target.device, dtype=target.dtype), alpha=alpha)


def _model_pairs(policy: nn.Module, reference: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ours = dict(policy.named_parameters())
    theirs = dict(reference.named_parameters())
    if AdapterHost.of(policy) is not None:
        raise ValueError(
            "sync_ref_model=True with a PEFT policy and a separate ref_model: the policy's weights are the base "
            "model plus an adapter, which do not map one to one onto the reference's. Drop ref_model= and use an "
            "adapter reference instead (an adapter named 'ref', ref_adapter_name=, or "
            "peft_reference='initial_adapter'), which is synced adapter to adapter."
        )
    missing = sorted(set(theirs) - set(ours))
    if missing or len(ours) != len(theirs):
        example = missing[0] if missing else sorted(set(ours) - set(theirs))[0]
        raise ValueError(
            f"sync_ref_model=True mixes the policy into the reference parameter by parameter, but their "
            f"parameters differ (e.g. {example!r}). Use a reference of the same architecture as the policy "
            "(ref_model=None takes a frozen copy), or sync_ref_model=False."
        )
    pairs = []
    for name, target in theirs.items():
        source = ours[name]
        if source.shape != target.shape:
            raise ValueError(
                f"sync_ref_model=True: parameter {name!r} has shape {tuple(source.shape)} in the policy and "
                f"{tuple(target.shape)} in the reference. Use a reference of the same architecture, or "
                "sync_ref_model=False."
            )
        pairs.append((target, source))
    return pairs


def _adapter_pairs(host: AdapterHost, reference_name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    active = [name for name in host.active if name != reference_name]
    if len(active) != 1:
        raise ValueError(
            f"sync_ref_model=True mixes the trained adapter into reference adapter {reference_name!r}, which "
            f"needs exactly one trained (active) adapter; the model has {host.active}."
        )
    source_name = active[0]
    sources = host.parameters_of(source_name)
    targets = host.parameters_of(reference_name)
    renamed = {_rename(n, source_name, reference_name): p for n, p in sources.items()}
    if set(renamed) != set(targets) or any(renamed[n].shape != t.shape for n, t in targets.items()):
        raise ValueError(
            f"sync_ref_model=True: reference adapter {reference_name!r} and trained adapter {source_name!r} "
            "have different parameters (another adapter type, rank or target modules), so one cannot be mixed "
            "into the other. Use a reference adapter with the same config (peft_reference='initial_adapter' "
            "copies the trained one), or sync_ref_model=False."
        )
    return [(target, renamed[name]) for name, target in targets.items()]


def sync_pairs(trainer: Any, reference: ReferenceManager) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(reference parameter, policy parameter)`` pairs to mix, for the reference as it is now.

    Raises a ValueError (NotImplementedError for sharded set-ups) naming the problem and the fix when the
    reference cannot follow the policy.
    """
    if shards_parameters(trainer):
        raise NotImplementedError(
            f"sync_ref_model=True under {describe_sharding(trainer)} is not supported in "
            "this version: the policy's and the reference's parameters are sharded and would have to be gathered "
            "for every update. Use DDP or DeepSpeed ZeRO-1/2, or sync_ref_model=False."
        )
    policy = trainer.accelerator.unwrap_model(trainer.model)
    if reference.mode == "model":
        return _model_pairs(policy, trainer.accelerator.unwrap_model(reference.ref_model))
    if reference.mode == "named_adapter":
        host = reference.host if reference.host is not None else AdapterHost.of(policy)
        return _adapter_pairs(host, reference.ref_adapter_name)
    if reference.mode == "null_adapter":
        raise ValueError(
            "sync_ref_model=True, but the reference is the base model with the adapter off "
            f"({reference.why}). The base weights are also the policy's, so that reference cannot move towards "
            "the policy without moving the policy. Set KTOConfig(peft_reference='initial_adapter') to use a "
            "frozen copy of the adapter (named 'ref') as the reference, which is then synced; or pass "
            "ref_adapter_name= / ref_model=; or sync_ref_model=False."
        )
    raise ValueError(
        f"sync_ref_model=True needs a reference model or adapter in memory; the reference is {reference.describe()}."
    )


class ReferenceSyncCallback(TrainerCallback):
    """Mixes the policy into the reference every `steps` optimizer steps (see the module docstring).

    The pairs are looked up at each update, so a policy re-built by `model_init` is followed too.
    """

    def __init__(self, trainer: Any, reference: ReferenceManager, alpha: float, steps: int) -> None:
        self.trainer = trainer
        self.reference = reference
        self.alpha = alpha
        self.steps = steps
        self.updates = 0  # how many times the reference was updated

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.steps != 0:
            return
        mix_into(sync_pairs(self.trainer, self.reference), self.alpha)
        self.updates += 1
        logger.debug("kto_plugin: reference synced at step %d (alpha=%s)", state.global_step, self.alpha)


# --- the synced reference in checkpoints ---

REFERENCE_WEIGHTS_NAME = "kto_ref_model.safetensors"


def reference_tensors(trainer: Any, reference: ReferenceManager) -> dict[str, torch.Tensor]:
    """The tensors a sync changes, live, by state-dict name: the reference model's whole state dict (mode
    ``model``), or the reference adapter's tensors in the policy's state dict (mode ``named_adapter``)."""
    if reference.mode == "model":
        return trainer.accelerator.unwrap_model(reference.ref_model).state_dict()
    policy = trainer.accelerator.unwrap_model(trainer.model)
    marker = f".{reference.ref_adapter_name}."
    return {name: t for name, t in policy.state_dict().items() if marker in name}  # as the resume fingerprint


def save_reference(trainer: Any, reference: ReferenceManager, directory: str) -> str:
    """Write the synced reference's tensors to ``directory/kto_ref_model.safetensors``, atomically (a process
    killed while writing leaves no file under that name); returns the path.

    Each tensor is copied to the CPU on its own: safetensors refuses tensors that share storage (tied
    embeddings), and the file must not alias the live weights."""
    from safetensors.torch import save

    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in
               reference_tensors(trainer, reference).items()}
    path = os.path.join(directory, REFERENCE_WEIGHTS_NAME)
    data = save(tensors, metadata={"format": "kto_plugin.sync_ref_model"})
    write_atomically(path, lambda f: f.write(data))
    return path


def read_reference(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def load_reference(trainer: Any, reference: ReferenceManager, tensors: dict[str, torch.Tensor], path: str) -> None:
    """Copy `tensors` (from `read_reference`) into the reference in place. The names must match exactly."""
    live = reference_tensors(trainer, reference)
    missing, extra = sorted(set(live) - set(tensors)), sorted(set(tensors) - set(live))
    if missing or extra:
        raise ValueError(
            f"Resuming with sync_ref_model=True: {path} holds another reference's tensors than this run's "
            f"({'missing ' + repr(missing[0]) if missing else 'unexpected ' + repr(extra[0])}). Build the model, "
            "ref_model and adapters as for the first run, with the same KTOConfig."
        )
    with torch.no_grad():
        for name, target in live.items():
            source = tensors[name]
            if source.shape != target.shape:
                raise ValueError(
                    f"Resuming with sync_ref_model=True: tensor {name!r} has shape {tuple(source.shape)} in "
                    f"{path} and {tuple(target.shape)} in this run's reference. Build the model as for the first run."
                )
            target.copy_(source.to(device=target.device, dtype=target.dtype))
