"""Run under torchrun (2 processes, gloo, CPU): rank 1 dies (SIGKILL) or hangs in the middle of step 2.

`python -m torch.distributed.run --nproc_per_node 2 rank_fault_two_process.py die|hang OUTPUT_DIR TIMEOUT`.
TIMEOUT bounds every collective: `TrainingArguments(ddp_timeout=TIMEOUT)`, which transformers 5.25 hands to the
process group on accelerators but not with ``use_cpu=True``; so on CPU the script creates the gloo group itself
first, with that timeout (the Trainer then uses it), as docs/faults.md tells CPU users to. A checkpoint is written at step 1. In step 2, rank 1 meets the fault inside its policy forward, before the step's
first collective; rank 0 goes on into that collective. Rank 0 prints "RANK0 STEP n" after each step and, when
training raises, "RANK0 ERROR <type>: <message>" (then re-raises), so the test sees what the survivor met.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import timedelta

import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments

from kto_plugin import KTOConfig, KTOPlugin
from kto_plugin.demo import build_tiny_model, build_tokenizer, hh_unpaired_rows


class Progress(TrainerCallback):
    def __init__(self, rank):
        self.rank = rank

    def on_step_end(self, args, state, control, **kwargs):
        if self.rank == 0:
            print(f"RANK0 STEP {state.global_step}", flush=True)


def main() -> None:
    mode, output_dir, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
    rows = hh_unpaired_rows(32)
    tokenizer = build_tokenizer([r["prompt"] + r["completion"] for r in rows], vocab_size=1024)
    model = build_tiny_model(len(tokenizer), hidden_size=32)
    kto = KTOPlugin(KTOConfig(max_length=64, max_prompt_length=32, warn_guidance=False), tokenizer=tokenizer)
    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=4, max_steps=4, logging_steps=1, report_to="none",
        save_strategy="steps", save_steps=1, use_cpu=True, seed=0, disable_tqdm=True,
        ddp_find_unused_parameters=False, ddp_timeout=timeout,
    )
    rank = args.process_index
    trainer = Trainer(model=model, args=args, train_dataset=kto.prepare_dataset(rows), data_collator=kto.collator,
                      callbacks=[Progress(rank)])
    kto.attach(trainer)

    def fault(module, inputs, output):
        if rank == 1 and trainer.state.global_step == 1:  # inside step 2
            if mode == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)  # "hang": a process stuck (a deadlock, a stalled file system)
        return output

    model.get_input_embeddings().register_forward_hook(fault)
    try:
        trainer.train()
    except BaseException as err:
        if rank == 0:
            print(f"RANK0 ERROR {type(err).__name__}: {str(err)[:300]}", flush=True)
        raise
    print(f"RANK{rank} FINISHED (not expected)", flush=True)


if __name__ == "__main__":
    main()
