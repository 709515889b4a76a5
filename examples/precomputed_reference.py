"""Precomputed reference log-probs: one pass at `attach()`, then no reference model in memory.

With `precompute_ref_log_probs=True`, `kto.attach(trainer)` runs the reference (here: the initial policy)
once over the train and eval datasets, stores each row's reference log-probs (and those of its fixed KL
partner) as dataset columns, caches them on disk and frees the reference model. A second run with the same
data, reference weights and settings loads them from the cache instead of recomputing.
Runs offline on the embedded default (a tiny Llama built from a config and the shipped HH-RLHF sample).

    python examples/precomputed_reference.py [--max_steps N] [--output_dir DIR] [--cache_dir DIR]
"""

import argparse
import logging
import sys

from transformers import Trainer, TrainingArguments, set_seed

from kto_plugin import KTOConfig, KTOPlugin
from kto_plugin.demo import build_tiny_model, build_tokenizer, hh_unpaired_rows


def main() -> None:
    cli = argparse.ArgumentParser()
    cli.add_argument("--max_steps", type=int, default=10)
    cli.add_argument("--output_dir", default="outputs/precomputed_reference")
    cli.add_argument("--cache_dir", default=None,
                     help="cache of reference log-probs (default ~/.cache/kto_plugin/ref_logps)")
    opts = cli.parse_args()
    # kto_plugin reports the pass ("computed in ... s and cached at ..." or "loaded from cache ...") at INFO
    logging.basicConfig(stream=sys.stdout, format="%(message)s")
    logging.getLogger("kto_plugin").setLevel(logging.INFO)

    set_seed(0)  # the same initial weights each run, so the second run finds the first run's cache
    rows = hh_unpaired_rows(32)  # 64 rows: 32 prompts, each with a desirable and an undesirable completion
    tokenizer = build_tokenizer([r["prompt"] + r["completion"] for r in rows])
    model = build_tiny_model(len(tokenizer))

    kto = KTOPlugin(
        KTOConfig(max_length=128, precompute_ref_log_probs=True, precompute_ref_batch_size=16,
                  precompute_cache_dir=opts.cache_dir),
        tokenizer=tokenizer,
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=opts.output_dir, per_device_train_batch_size=8,
                               per_device_eval_batch_size=8, learning_rate=1e-4, max_steps=opts.max_steps,
                               logging_steps=max(1, opts.max_steps // 4), report_to="none",
                               save_strategy="no"),
        train_dataset=kto.prepare_dataset(rows[:48]),
        # every dataset the Trainer holds at attach() is precomputed, eval included
        eval_dataset=kto.prepare_dataset(rows[48:], name="eval"),
        data_collator=kto.collator,
    )
    kto.attach(trainer)  # the precompute pass happens here
    print("reference:", kto.reference.describe())
    print("reference model kept in memory:", kto.reference.holds_model)
    added = [c for c in trainer.train_dataset.column_names if c.startswith(("ref_", "kl_"))]
    print("precomputed columns:", added)
    trainer.train()
    metrics = trainer.evaluate()
    first = [h for h in trainer.state.log_history if "loss" in h][0]
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    # policy == reference at step 0, so the first loss is 0.5 (rewards 0, z0 0)
    print(f"first loss {first['loss']:.4f}; step {last['step']}: loss {last['loss']:.4f}, "
          f"rewards/margins {last['rewards/margins']:.4f}; eval_loss {metrics['eval_loss']:.4f}")


if __name__ == "__main__":
    main()
