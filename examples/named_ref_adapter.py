"""A named reference adapter: continue from an SFT LoRA adapter, with that adapter's initial state as reference.

The trainable adapter and a frozen copy named "ref" are both loaded from the same saved adapter;
`KTOPlugin(ref_adapter_name="ref")` switches to "ref" for reference passes (an adapter named "ref" is
also picked up by convention). Runs offline: the "SFT adapter" is a randomly initialised one saved first.

    python examples/named_ref_adapter.py [--max_steps N] [--output_dir DIR]
"""

import argparse
import os
import tempfile

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from kto_plugin import KTOConfig, KTOPlugin
from kto_plugin.demo import build_tiny_model, build_tokenizer, hh_unpaired_rows


def main() -> None:
    cli = argparse.ArgumentParser()
    cli.add_argument("--max_steps", type=int, default=40)
    cli.add_argument("--output_dir", default="outputs/named_ref_adapter")
    opts = cli.parse_args()

    rows = hh_unpaired_rows(200)
    tokenizer = build_tokenizer([r["prompt"] + r["completion"] for r in rows])
    with tempfile.TemporaryDirectory() as sft_dir:
        # stand-in for an adapter from supervised fine-tuning (non-zero weights, unlike a fresh LoRA)
        sft = get_peft_model(build_tiny_model(len(tokenizer)),
                             LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        sft.save_pretrained(sft_dir)

        model = PeftModel.from_pretrained(build_tiny_model(len(tokenizer)), sft_dir, is_trainable=True)
        model.load_adapter(sft_dir, adapter_name="ref")  # frozen, inactive copy: the reference
        model.set_adapter("default")

    kto = KTOPlugin(KTOConfig(max_length=256), tokenizer=tokenizer, ref_adapter_name="ref")
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
    first = [h for h in trainer.state.log_history if "loss" in h][0]
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    # policy == reference at the start, so the first step's rewards are 0 and its loss is 0.5
    print(f"first loss {first['loss']:.4f}; step {last['step']}: loss {last['loss']:.4f}, "
          f"rewards/margins {last['rewards/margins']:.4f}")
    os.makedirs(opts.output_dir, exist_ok=True)


if __name__ == "__main__":
    main()
