"""KTO on several processes: the same script as on one, launched with torchrun or accelerate.

Nothing in the training code changes for DDP: the plugin all-reduces z0 (as a weighted mean over every
process's mismatched pairs) and the metrics inside the loss call, so every rank logs the same values and
ends with the same weights. Runs offline on the embedded default (tiny Llama, shipped HH-RLHF sample), CPU:

    torchrun --standalone --nproc_per_node 2 examples/multi_process.py
    accelerate launch --num_processes 2 examples/multi_process.py          # on GPUs
    python examples/multi_process.py                                      # one process, for comparison

Several runs in one launch (used by the tests): ``--setup FINETUNE,LOSS,KL_ESTIMATE[,BATCH,ACCUMULATION]``,
repeatable, e.g. ``--setup full,kto,batch --setup lora,kto,window,4,2``. With ``--results_dir DIR`` each rank
writes ``DIR/<run>.rank<r>.pt``: its trainable weights and the logged loss and kl per step. ``--fsdp`` shards
the policy (and a separate reference) with FSDP2; it needs GPUs: accelerate 1.15 enables FSDP only on accelerator
devices and runs DDP on CPU (the printed ``sharding:`` line says which ran).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments

from kto_plugin import KTOConfig, KTOPlugin
from kto_plugin.demo import build_tiny_model, build_tokenizer, hh_unpaired_rows
from kto_plugin.reference import sharding_of


def parse_run(text: str) -> dict[str, Any]:
    """``"lora,kto,window,4,2"`` -> {finetune, loss_type, kl_estimate, batch, accumulation}."""
    parts = text.split(",")
    if len(parts) not in (3, 5) or parts[0] not in ("full", "lora"):
        raise SystemExit(
            f"--setup {text!r}: expected FINETUNE,LOSS,KL_ESTIMATE[,BATCH,ACCUMULATION] with FINETUNE full or lora"
        )
    spec = {"finetune": parts[0], "loss_type": parts[1], "kl_estimate": parts[2]}
    if len(parts) == 5:
        spec["batch"], spec["accumulation"] = int(parts[3]), int(parts[4])
    return spec


def run_name(spec: dict[str, Any]) -> str:
    return "-".join(str(spec[k]) for k in ("finetune", "loss_type", "kl_estimate", "batch", "accumulation"))


class FirstStepWeights(TrainerCallback):
    """Keeps the trainable weights after the first optimizer step."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.weights: dict[str, torch.Tensor] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 1:
            self.weights = {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}


def train_once(
    spec: dict[str, Any], output_dir: str, max_steps: int = 4, learning_rate: float = 5e-2, optim: str = "sgd",
    fsdp: bool = False, n_pairs: int = 32, desirable_only: bool = False,
) -> dict[str, Any]:
    """One KTO run on the embedded default; returns this rank's trainable weights and logged loss/kl per step.

    `desirable_only`: keep only the chosen completions (the policy then raises completion log-probs in general,
    so z0 becomes positive within a few steps, which makes a z0 comparison meaningful).
    """
    rows = hh_unpaired_rows(n_pairs * (2 if desirable_only else 1))
    if desirable_only:
        rows = [r for r in rows if r["label"]][: 2 * n_pairs]
    tokenizer = build_tokenizer([r["prompt"] + r["completion"] for r in rows], vocab_size=1024)
    model = build_tiny_model(len(tokenizer), hidden_size=32)  # seeded: identical on every rank
    if spec["finetune"] == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
    kto = KTOPlugin(KTOConfig(max_length=64, max_prompt_length=32, loss_type=spec["loss_type"],
                              kl_estimate=spec["kl_estimate"], warn_guidance=False), tokenizer=tokenizer)
    extra: dict[str, Any] = {}
    if fsdp:
        extra = {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True,
                                                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=spec.get("batch", 4), per_device_eval_batch_size=4,
        gradient_accumulation_steps=spec.get("accumulation", 2), max_steps=max_steps, learning_rate=learning_rate,
        optim=optim, lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=not torch.cuda.is_available(), seed=0, train_sampling_strategy="sequential",
        dataloader_drop_last=True, ddp_find_unused_parameters=False, disable_tqdm=True, **extra,
    )
    first_step = FirstStepWeights(model) if not fsdp else None
    train_ds = kto.prepare_dataset(rows)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=train_ds.select(range(16)),
                      data_collator=kto.collator, callbacks=[first_step] if first_step else None)
    kto.attach(trainer)
    trainer.train()
    evaluation = {k: v for k, v in trainer.evaluate().items() if not k.endswith(("runtime", "per_second"))}
    logs = [h for h in trainer.state.log_history if "loss" in h and "kl" in h]
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
        weights = {n: p.detach().cpu().clone() for n, p in state.items()}
    else:
        weights = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {
        "weights": weights,
        "first_step_weights": first_step.weights if first_step else None,
        "loss": [h["loss"] for h in logs],
        "kl": [h["kl"] for h in logs],
        "eval": evaluation,
        "reference": kto.reference.describe(),
        "sharding": sharding_of(trainer),
        "policy_sharded": is_sharded(trainer.model),
        "reference_sharded": is_sharded(kto.reference.ref_model) if kto.reference.ref_model is not None else None,
        "reference_training": kto.reference.ref_model.training if kto.reference.ref_model is not None else None,
    }


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether the module's parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def ranks_identical(weights: dict[str, torch.Tensor]) -> bool:
    """Whether every rank holds bit-identical weights (all-gather of the flattened parameters)."""
    flat = torch.cat([w.flatten().float() for _, w in sorted(weights.items())])
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_argument("--setup", action="append", type=parse_run, help="FINETUNE,LOSS,KL_ESTIMATE[,BATCH,ACCUMULATION]")
    cli.add_argument("--max_steps", type=int, default=4)
    cli.add_argument("--learning_rate", type=float, default=5e-2)
    cli.add_argument("--optim", default="sgd")
    cli.add_argument("--fsdp", action="store_true")
    cli.add_argument("--desirable_only", action="store_true", help="train on chosen completions only (z0 grows)")
    cli.add_argument("--output_dir", default="outputs/multi_process")
    cli.add_argument("--results_dir", default=None)
    opts = cli.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    for spec in opts.setup or [parse_run("full,kto,batch")]:
        spec.setdefault("batch", 4)
        spec.setdefault("accumulation", 2)
        name = run_name(spec)
        result = train_once(spec, os.path.join(opts.output_dir, name), opts.max_steps, opts.learning_rate,
                            opts.optim, opts.fsdp, desirable_only=opts.desirable_only)
        same = ranks_identical(result["weights"])
        if opts.results_dir:
            Path(opts.results_dir).mkdir(parents=True, exist_ok=True)
            torch.save(result, Path(opts.results_dir) / f"{name}.rank{rank}.pt")
        if rank == 0:
            world = dist.get_world_size() if dist.is_initialized() else 1
            print(f"{name}: {world} process(es), reference: {result['reference']}")
            print(f"  kl per step:   {[round(k, 6) for k in result['kl']]}")
            print(f"  loss per step: {[round(v, 6) for v in result['loss']]}")
            print(f"  eval: kl {result['eval']['eval_kl']:.6f}, loss {result['eval']['eval_loss']:.6f}")
            print(f"  sharding: {result['sharding']}, policy sharded: {result['policy_sharded']}, reference "
                  f"sharded: {result['reference_sharded']}")
            print(f"  weights identical on every rank: {same}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
