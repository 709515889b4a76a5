"""An ordinary `transformers.Trainer` script that gains KTO with four lines (marked "KTO").

Runs offline on the embedded default (a tiny Llama built from a config and the shipped HH-RLHF sample);
swap in your own model, tokenizer and {prompt, completion, label} rows.

    python examples/add_kto_to_existing_trainer.py [--max_steps N] [--output_dir DIR]
"""

import argparse

from transformers import Trainer, TrainingArguments

from kto_plugin import KTOConfig, KTOPlugin
from kto_plugin.demo import build_tiny_model, build_tokenizer, hh_unpaired_rows


def main() -> None:
    cli = argparse.ArgumentParser()
    cli.add_argument("--max_steps", type=int, default=40)
    cli.add_argument("--output_dir", default="outputs/existing_trainer")
    opts = cli.parse_args()

    # --- your existing setup ---
    rows = hh_unpaired_rows(200)  # [{"prompt": str, "completion": str, "label": bool}, ...]
    tokenizer = build_tokenizer([r["prompt"] + r["completion"] for r in rows])
    model = build_tiny_model(len(tokenizer))
    args = TrainingArguments(
        output_dir=opts.output_dir,
        per_device_train_batch_size=8,
        learning_rate=1e-4,
        max_steps=opts.max_steps,
        logging_steps=max(1, opts.max_steps // 4),
        report_to="none",
        save_strategy="no",
    )

    kto = KTOPlugin(KTOConfig(beta=0.1, max_length=256), tokenizer=tokenizer)  # KTO 1/4
    train_dataset = kto.prepare_dataset(rows)  # KTO 2/4
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset,
                      data_collator=kto.collator)  # KTO 3/4: the collator
    kto.attach(trainer)  # KTO 4/4
    trainer.train()

    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    print(f"step {last['step']}: loss {last['loss']:.4f}, rewards/margins {last['rewards/margins']:.4f}, kl {last['kl']:.4f}")


if __name__ == "__main__":
    main()
