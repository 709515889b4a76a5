"""LoRA with a null reference: the reference is the base model with the adapter switched off.

No second model is kept in memory: reference passes run the same weights under `disable_adapter()`.
Runs offline on the embedded default.

    python examples/lora_null_reference.py [--max_steps N] [--output_dir DIR]
"""

import argparse

from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from kto_plugin import KTOConfig, KTOPlugin
from kto_plugin.demo import build_tiny_model, build_tokenizer, hh_unpaired_rows


def main() -> None:
    cli = argparse.ArgumentParser()
    cli.add_argument("--max_steps", type=int, default=40)
    cli.add_argument("--output_dir", default="outputs/lora_null_reference")
    opts = cli.parse_args()

    rows = hh_unpaired_rows(200)
    tokenizer = build_tokenizer([r["prompt"] + r["completion"] for r in rows])
    model = get_peft_model(build_tiny_model(len(tokenizer)),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.print_trainable_parameters()

    kto = KTOPlugin(KTOConfig(max_length=256), tokenizer=tokenizer)  # ref_model=None + PEFT: null reference
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=opts.output_dir, per_device_train_batch_size=8, learning_rate=1e-3,
                               max_steps=opts.max_steps, logging_steps=max(1, opts.max_steps // 4), report_to="none",
                               save_strategy="no", ddp_find_unused_parameters=False),
        train_dataset=kto.prepare_dataset(rows),
        data_collator=kto.collator,
    )
    kto.attach(trainer)
    print("reference:", kto.reference.describe())
    trainer.train()
    trainer.save_model(opts.output_dir)  # saves the adapter only
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    print(f"step {last['step']}: loss {last['loss']:.4f}, rewards/margins {last['rewards/margins']:.4f}")


if __name__ == "__main__":
    main()
