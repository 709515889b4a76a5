"""Train with the example plugin's loss, `kto_logsigmoid`, without installing the package.

The plugin is an ordinary module (`kto_logsigmoid.py`, beside this script) passed to
`KTOPlugin(plugins=[...])`; once the package is installed (`pip install ./examples/custom_loss_plugin`),
`KTOConfig(loss_type="kto_logsigmoid")` alone finds it through its entry point.
Runs offline on the embedded default.

    python examples/custom_loss_plugin/train.py [--max_steps N] [--output_dir DIR]

At the first step the policy equals the reference, so every example's loss is -log sigmoid(0) = log 2 and the
plugin's metric `kto_logsigmoid/grad_weight` is sigmoid(0) = 0.5; both fall as examples are learnt.
"""

import argparse

from transformers import Trainer, TrainingArguments

import kto_logsigmoid  # this script's folder is on sys.path when it runs
from kto_plugin import KTOConfig, KTOPlugin
from kto_plugin.demo import build_tiny_model, build_tokenizer, hh_unpaired_rows

METRIC = "kto_logsigmoid/grad_weight"  # the plugin's own metric, logged next to KTO's


def main() -> None:
    cli = argparse.ArgumentParser()
    cli.add_argument("--max_steps", type=int, default=30)
    cli.add_argument("--output_dir", default="outputs/custom_loss_plugin")
    opts = cli.parse_args()

    rows = hh_unpaired_rows(100)
    tokenizer = build_tokenizer([r["prompt"] + r["completion"] for r in rows])
    model = build_tiny_model(len(tokenizer))

    kto = KTOPlugin(KTOConfig(loss_type="kto_logsigmoid", max_length=192), tokenizer=tokenizer,
                    plugins=[kto_logsigmoid])
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=opts.output_dir, per_device_train_batch_size=8, learning_rate=2e-4,
                               max_steps=opts.max_steps, logging_steps=1, report_to="none",
                               save_strategy="no"),
        train_dataset=kto.prepare_dataset(rows),
        data_collator=kto.collator,
    )
    kto.attach(trainer)
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    for h in (logs[0], logs[-1]):
        print(f"step {h['step']}: loss {h['loss']:.4f}, {METRIC} {h[METRIC]:.4f}, "
              f"rewards/margins {h['rewards/margins']:.4f}")


if __name__ == "__main__":
    main()
