"""Run under torchrun (2 processes, gloo, CPU): `kto_plugin.reference._sharding.prepare_reference` under FSDP2.

accelerate 1.15 enables FSDP only for accelerator devices (on CPU it falls back to DDP), so the Trainer cannot
run FSDP here; this script gives `prepare_reference` what the Trainer would (an accelerator with accelerate's
own `FullyShardedDataParallelPlugin`) and checks the prepared reference: sharded (DTensor parameters), frozen,
in eval mode, and its logits equal those of the unsharded model. Prints "FSDP-REFERENCE-OK" on rank 0.
"""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor

from kto_plugin.demo import build_tiny_model
from kto_plugin.reference._sharding import prepare_reference


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build_tiny_model(128, hidden_size=32, seed=0)
    expected_model = copy.deepcopy(model).eval()
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        reshard_after_forward=True,
    )
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin), device=torch.device("cpu"), mixed_precision="no",
        is_main_process=rank == 0, torch_device_mesh=None, parallelism_config=None,
    )
    trainer = SimpleNamespace(is_fsdp_enabled=True, is_deepspeed_enabled=False, accelerator=accelerator)
    reference = prepare_reference(trainer, model.requires_grad_(False).eval())

    assert not reference.training
    assert all(isinstance(p, DTensor) for p in reference.parameters()), "reference parameters are not sharded"
    assert not any(p.requires_grad for p in reference.parameters())
    local = sum(p.to_local().numel() for p in reference.parameters())
    full = sum(p.numel() for p in expected_model.parameters())
    assert local < full, (local, full)  # each rank holds a shard, not the whole model

    torch.manual_seed(1)
    ids = torch.randint(3, 128, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        got = reference(input_ids=ids, attention_mask=mask).logits
        want = expected_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    dist.barrier()
    if rank == 0:
        print(f"FSDP-REFERENCE-OK local {local} of {full} parameters on rank 0")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("KTO_PLUGIN_DISABLE_AUTOLOAD", "1")
    main()
