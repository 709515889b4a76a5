"""Run under torchrun (2 processes, gloo, CPU): a NaN that only rank 1 meets, under two `on_nonfinite` policies.

A forward hook NaNs one row that only rank 1 trains on (step 2).

* ``"skip"``: both ranks must report it (rank 1's row index, gathered) and both must drop step 2's update, so
  the weights stay identical across ranks. Prints "NONFINITE-OK" on rank 0.
* ``"raise"``: both ranks must raise `NonFiniteLossError` in the same step (2, before its update), with the same
  message, and stay in step: a barrier after the error passes (a rank that raised alone would leave the other
  waiting in the step's collectives). Prints "NONFINITE-RAISE-OK" on rank 0.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments

from kto_plugin import KTOConfig, KTOPlugin, NonFiniteLossError
from kto_plugin.demo import build_tiny_model, build_tokenizer, hh_unpaired_rows

POSITION = 13  # sequential order, batches of 4 dealt alternately: batch 3 (rows 12..15) is rank 1's at step 2


class WeightsPerStep(TrainerCallback):
    def __init__(self, model):
        self.model = model
        self.steps = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.steps[state.global_step] = {n: p.detach().clone() for n, p in self.model.named_parameters()}


def setup(policy):
    """(plugin, trainer, dataset, weights per step, [micro-batch rows NaN'd on this rank])."""
    rows = hh_unpaired_rows(32)
    tokenizer = build_tokenizer([r["prompt"] + r["completion"] for r in rows], vocab_size=1024)
    model = build_tiny_model(len(tokenizer), hidden_size=32)
    kto = KTOPlugin(KTOConfig(max_length=64, max_prompt_length=32, on_nonfinite=policy, warn_guidance=False),
                    tokenizer=tokenizer)
    ds = kto.prepare_dataset(rows)
    weights = WeightsPerStep(model)
    args = TrainingArguments(
        output_dir=os.environ.get("OUT", "/tmp/nonfinite_two_process"), per_device_train_batch_size=4, max_steps=3,
        learning_rate=5e-2, optim="sgd", logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
        seed=0, train_sampling_strategy="sequential", dataloader_drop_last=True, disable_tqdm=True,
        ddp_find_unused_parameters=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=kto.collator, callbacks=[weights])
    kto.attach(trainer)
    target = torch.tensor((list(ds[POSITION]["prompt_ids"]) + list(ds[POSITION]["completion_ids"]))[:64])
    seen = []

    def hook(module, inputs, output):
        out = output.clone()
        for i, row in enumerate(inputs[0]):
            n = len(target)
            if n <= len(row) and torch.equal(row[:n], target) and (n == len(row) or row[n] == tokenizer.pad_token_id):
                out[i] = float("nan")
                seen.append(i)
        return out

    model.get_input_embeddings().register_forward_hook(hook)
    return kto, trainer, ds, weights, seen


def skip() -> None:
    kto, trainer, ds, weights, seen = setup("skip")
    model = trainer.model
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.train()
    rank = dist.get_rank()
    messages = [str(w.message) for w in record if "non-finite" in str(w.message)]
    assert bool(seen) == (rank == 1), (rank, seen)  # only rank 1 met the row
    row = ds[POSITION]["row_index"]
    # the policy's KL pass reuses row `row`'s prompt cache (NaN here), so z0 is reported non-finite too
    assert len(messages) == 1 and messages[0].startswith(f"kto_plugin: non-finite loss or log-probs of rows [{row}] ")
    assert "at training step 2" in messages[0] and "skipped" in messages[0], (rank, messages)
    assert kto.nonfinite.skipped_steps == [2], (rank, kto.nonfinite.skipped_steps)
    for name, value in weights.steps[2].items():
        assert torch.equal(value, weights.steps[1][name]), (rank, name)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.isfinite(flat).all()
    assert any(not torch.equal(weights.steps[3][n], weights.steps[2][n]) for n in weights.steps[2])
    gathered = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1])
    dist.barrier()
    if rank == 0:
        print("NONFINITE-OK", messages[0][:160])


def raise_on_both() -> None:
    _, trainer, ds, weights, seen = setup("raise")
    rank = dist.get_rank()
    try:
        trainer.train()
    except NonFiniteLossError as err:
        message = str(err)
    else:
        raise AssertionError(f"rank {rank} trained on without raising")
    assert bool(seen) == (rank == 1), (rank, seen)
    assert f"of rows [{ds[POSITION]['row_index']}] " in message and "at training step 2" in message, (rank, message)
    assert trainer.state.global_step == 1 and sorted(weights.steps) == [1], (rank, trainer.state.global_step)
    messages = [None, None]
    dist.all_gather_object(messages, message)  # both ranks reach this: neither is left in the step's collectives
    assert messages[0] == messages[1], messages
    dist.barrier()
    if rank == 0:
        print("NONFINITE-RAISE-OK", message[:160])


def main() -> None:
    skip()
    raise_on_both()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
