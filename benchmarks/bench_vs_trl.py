"""Step time and peak RSS: kto_plugin vs TRL 1.16's KTOTrainer vs a plain fine-tuning step, side by side.

Each side runs in its own process (so peak RSS is its own), the sides alternate, the whole round is
repeated, and the table reports the median seconds per step after warm-up and the peak RSS, with ratios.

    python benchmarks/bench_vs_trl.py [--shape head|layers] [--repeats 3] [--steps 8] [--warmup 2] [--threads 2]

Shapes (`common.SHAPES`): ``head`` (hidden 256, 4 layers: the LM head holds most of the arithmetic) and
``layers`` (hidden 512, 8 layers, intermediate 1408: the transformer layers do); the table's title gives the
LM head's share.

Sides (same model init, tokenizer, rows, order, batch, fp32, no gradient checkpointing):
  kto_plugin     stock Trainer + KTOPlugin (reference = frozen copy of the initial policy)
  kto_precomp    the same with precompute_ref_log_probs=True (the precompute pass is not timed)
  kto_full_rows  kto_plugin with reuse_prompt_cache=False, length_buckets="off": every pass runs full rows,
                 padded to the batch's longest (the step before prompts were computed once)
  trl            TRL 1.16 KTOTrainer with an explicit reference copy
  plain          stock Trainer, causal-LM loss on the completion tokens of the same sequences
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def _training_args(out: str, steps: int, **extra):
    return dict(
        output_dir=out,
        per_device_train_batch_size=common.BATCH,
        max_steps=steps,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        train_sampling_strategy="sequential",
        learning_rate=1e-6,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
        **extra,
    )


def side_kto_plugin(rows, tok, model, out, steps, **config):
    from transformers import Trainer, TrainingArguments

    from kto_plugin import KTOConfig, KTOPlugin

    kto = KTOPlugin(KTOConfig(max_length=common.MAX_LENGTH, precompute_cache=False, **config), tokenizer=tok)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**_training_args(out, steps)),
        train_dataset=kto.prepare_dataset(rows),
        data_collator=kto.collator,
    )
    kto.attach(trainer)
    return trainer


def side_trl(rows, tok, model, out, steps):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    args = KTOConfig(**_training_args(out, steps), max_length=common.MAX_LENGTH, bf16=False,
                     gradient_checkpointing=False)
    return KTOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                      train_dataset=Dataset.from_list(rows), processing_class=tok)


def side_plain(rows, tok, model, out, steps):
    """Supervised fine-tuning on the same prompt+completion sequences (loss on completion tokens)."""
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    def tokenize(row):
        prompt = tok(row["prompt"])["input_ids"]
        full = tok(row["prompt"] + row["completion"] + tok.eos_token)["input_ids"][: common.MAX_LENGTH]
        return {"input_ids": full, "labels": [-100] * len(prompt) + full[len(prompt):]}

    ds = Dataset.from_list(rows).map(tokenize, remove_columns=["prompt", "completion", "label"])

    def collate(batch):
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return Trainer(model=model, args=TrainingArguments(**_training_args(out, steps)), train_dataset=ds,
                   data_collator=collate)


SIDES = {
    "kto_plugin": side_kto_plugin,
    "kto_precomp": lambda *a: side_kto_plugin(*a, precompute_ref_log_probs=True),
    "kto_full_rows": lambda *a: side_kto_plugin(*a, reuse_prompt_cache=False, length_buckets="off"),
    "trl": side_trl,
    "plain": side_plain,
}


def worker(side: str, steps: int, warmup: int, threads: int, vocab: int, shape: str) -> None:
    common.set_threads(threads)
    rows = common.dialogue_rows(common.BATCH * (steps + warmup))
    tok = common.tokenizer()
    model = common.model(vocab_size=vocab, shape=shape)
    with tempfile.TemporaryDirectory() as out:
        trainer = SIDES[side](rows, tok, model, out, steps + warmup)
        timer = common.StepTimer()
        trainer.add_callback(timer)
        rss_before = common.peak_rss_mb()
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(json.dumps({
        "side": side,
        "s_per_step": common.median_after_warmup(timer.times, warmup),
        "cpu_s_per_step": common.median_after_warmup(timer.cpu_times, warmup),
        "peak_rss_mb": common.peak_rss_mb(),
        "rss_before_train_mb": rss_before,
        "losses": losses,
        "load_average": os.getloadavg()[0],
    }))


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--side", choices=list(SIDES))
    cli.add_argument("--sides", default="kto_plugin,trl,plain")
    cli.add_argument("--repeats", type=int, default=3)
    cli.add_argument("--steps", type=int, default=8)
    cli.add_argument("--warmup", type=int, default=2)
    cli.add_argument("--threads", type=int, default=2)
    cli.add_argument("--vocab", type=int, default=common.VOCAB)
    cli.add_argument("--shape", choices=list(common.SHAPES), default="head")
    opts = cli.parse_args()
    passthrough = ["--steps", str(opts.steps), "--warmup", str(opts.warmup), "--threads", str(opts.threads),
                   "--vocab", str(opts.vocab), "--shape", opts.shape]
    if opts.side:
        worker(opts.side, opts.steps, opts.warmup, opts.threads, opts.vocab, opts.shape)
        return

    sides = opts.sides.split(",")
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for rep in range(opts.repeats):
        order = sides if rep % 2 == 0 else sides[::-1]  # alternate, so drift does not favour one side
        for side in order:
            results[side].append(common.run_side(__file__, side, passthrough))
            r = results[side][-1]
            print(f"  round {rep + 1} {side:14s} {r['s_per_step']:.3f} s/step  {r['cpu_s_per_step']:.3f} CPU s/step  "
                  f"{r['peak_rss_mb']:.0f} MB  load {r['load_average']:.1f}", flush=True)

    summary = {
        s: {
            "s_per_step": statistics.median(r["s_per_step"] for r in rs),
            "cpu_s_per_step": statistics.median(r["cpu_s_per_step"] for r in rs),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
            "losses": rs[0]["losses"],
        }
        for s, rs in results.items()
    }
    shape = common.SHAPES[opts.shape]
    print(f"\nshape {opts.shape}: Llama from config (hidden {shape['hidden_size']}, {shape['num_hidden_layers']} "
          f"layers, intermediate {shape['intermediate_size']}, vocab {opts.vocab}; LM head "
          f"{common.head_share(opts.shape, opts.vocab):.0%} of a forward's multiply-adds per token), batch "
          f"{common.BATCH}, ~300-token dialogues, {opts.threads} threads, median of {opts.repeats} runs x "
          f"{opts.steps} steps after {opts.warmup} warm-up steps\n")
    print("| side | s/step | CPU s/step | peak RSS (MB) | time vs plain | CPU time vs plain | RSS vs plain | "
          "time vs TRL | CPU time vs TRL | RSS vs TRL |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s, v in summary.items():
        def ratio(key, base):
            return f"{v[key] / summary[base][key]:.2f}x" if base in summary else "-"
        print(f"| {s} | {v['s_per_step']:.3f} | {v['cpu_s_per_step']:.3f} | {v['peak_rss_mb']:.0f} | "
              f"{ratio('s_per_step', 'plain')} | {ratio('cpu_s_per_step', 'plain')} | {ratio('peak_rss_mb', 'plain')} | "
              f"{ratio('s_per_step', 'trl')} | {ratio('cpu_s_per_step', 'trl')} | {ratio('peak_rss_mb', 'trl')} |")
    loads = [r["load_average"] for rs in results.values() for r in rs]
    print(f"\n1-minute load average during the runs (2 cores): {min(loads):.1f} to {max(loads):.1f}")
    if "kto_full_rows" in summary and "kto_plugin" in summary:
        full, ours = summary["kto_full_rows"], summary["kto_plugin"]
        print(f"kto_plugin vs kto_full_rows (prompts once, length groups vs full rows): "
              f"{ours['s_per_step'] / full['s_per_step']:.2f}x the time, "
              f"{ours['cpu_s_per_step'] / full['cpu_s_per_step']:.2f}x the CPU time")
    if "trl" in summary and "kto_plugin" in summary:
        diffs = [abs(a - b) for a, b in zip(summary["trl"]["losses"], summary["kto_plugin"]["losses"])]
        print(f"\nlogged losses, kto_plugin vs TRL: max abs difference {max(diffs):.2e} over {len(diffs)} steps")


if __name__ == "__main__":
    main()
