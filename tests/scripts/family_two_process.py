"""The KTO family on two processes (torchrun, gloo, CPU), several set-ups in one launch.

    torchrun --standalone --nproc_per_node 2 tests/scripts/family_two_process.py OUT_DIR

Each set-up trains 3 SGD steps (SGD: Adam would turn float32 noise in near-zero gradients into full-size updates,
and the one-process comparison could not be close) on the two-style task (tests/family_task.py, desirable rows first, in order)
with batch 4 per process and 2 micro-batches per step; each rank writes ``OUT_DIR/<set-up>.rank<r>.pt``: its plugin
state, the logged values, its weights, and what a recording plugin saw on that rank (the training rows' log-ratios;
every z0 estimate's pairs). `run` also serves the one-process comparison in tests/test_multi_process_family.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for family_task

from family_task import build_task_tokenizer, kto_rows  # noqa: E402
from kto_plugin import KTOConfig, KTOPlugin, hookimpl  # noqa: E402
from kto_plugin.demo import build_tiny_model  # noqa: E402

SETUPS = {
    "bco": {"loss_type": "bco"},
    "ema_batch": {"reference_point": "ema", "reference_point_ema_decay": 0.5},
    "ema_window": {"reference_point": "ema", "reference_point_ema_decay": 0.5, "kl_estimate": "window"},
    "positive_mean": {"reference_point": "positive_mean"},
    "humanline_length_normalized_sft": {"loss_type": "humanline", "length_normalize": True, "sft_weight": 0.2},
}
LOGGED = ("loss", "kl", "bco/delta", "sft_loss", "rewards/accuracy", "rewards/chosen", "grad_norm")


class Recorder:
    """Records, on its process, each training micro-batch's log-ratios and each training z0 estimate's pairs."""

    def __init__(self) -> None:
        self.log_ratios: list[torch.Tensor] = []
        self.kl_log_ratios: list[torch.Tensor] = []

    @hookimpl
    def kto_metrics(self, log_ratios, training):
        if training:
            self.log_ratios.append(log_ratios.detach().cpu().clone())

    @hookimpl
    def kto_reference_point(self, kl_log_ratios, training):
        if training:
            self.kl_log_ratios.append(kl_log_ratios.detach().cpu().clone())
        return None  # the built-in estimate answers


def run(name: str, output_dir: str, batch: int = 4, accumulation: int = 2) -> dict[str, Any]:
    tokenizer = build_task_tokenizer()
    model = build_tiny_model(len(tokenizer), hidden_size=32, seed=11)
    rows = sorted(kto_rows(), key=lambda r: not r["label"])  # desirable rows first: z0 leaves its clamp at 0
    recorder = Recorder()
    kto = KTOPlugin(KTOConfig(max_length=64, warn_guidance=False, **SETUPS[name]), tokenizer=tokenizer,
                    plugins=[recorder])
    args = TrainingArguments(
        output_dir=os.path.join(output_dir, name), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=3, learning_rate=1.0, optim="sgd", logging_steps=1,
        report_to="none", save_strategy="no", use_cpu=True, seed=0, train_sampling_strategy="sequential",
        dataloader_drop_last=True, disable_tqdm=True, ddp_find_unused_parameters=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=kto.prepare_dataset(rows), data_collator=kto.collator)
    kto.attach(trainer)
    trainer.train()
    return {
        "state": kto.plugins.state_dict(),
        "logs": [{k: h[k] for k in LOGGED if k in h} for h in trainer.state.log_history if "loss" in h],
        "weights": {n: p.detach().cpu().clone() for n, p in model.named_parameters()},
        "log_ratios": recorder.log_ratios,
        "kl_log_ratios": recorder.kl_log_ratios,
        "beta": kto.config.beta,
    }


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name in SETUPS:
        result = run(name, str(out / "runs"))
        torch.save(result, out / f"{name}.rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
