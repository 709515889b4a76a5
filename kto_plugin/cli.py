"""`kto-plugin`: the command line.

    kto-plugin train [--config file.yaml] [--model_name_or_path M] [--dataset_name D] [KTOConfig and
                     TrainingArguments flags]     # with no model and no data: the embedded tiny default
    kto-plugin --version
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from ._version import __version__

logger = logging.getLogger("kto_plugin")

DEMO_PAIRS = 300


@dataclass
class ModelArguments:
    """Which model to train. With no model named, a tiny Llama is built from a config (nothing downloaded)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local path of the policy. None: the embedded tiny model."}
    )
    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "A separate reference model. None: the initial policy."}
    )
    dtype: str | None = field(
        default=None, metadata={"help": "Weights dtype: float32, bfloat16, float16 or auto."}
    )


@dataclass
class DataArguments:
    """Which data to train on. With no dataset named, the shipped HH-RLHF sample."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id, or a local .json/.jsonl/.csv/.parquet file or directory."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Split to evaluate on."})
    demo_pairs: int = field(
        default=DEMO_PAIRS, metadata={"help": "Embedded default only: how many shipped HH-RLHF pairs to use."}
    )


_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _load_dataset(data_args: DataArguments) -> Any:
    import datasets

    name = data_args.dataset_name
    ext = os.path.splitext(name)[1].lower()
    if os.path.isfile(name) and ext in _LOCAL_FORMATS:
        return datasets.load_dataset(_LOCAL_FORMATS[ext], data_files=name)
    return datasets.load_dataset(name, data_args.dataset_config)


def _parser() -> Any:
    from transformers import HfArgumentParser, TrainingArguments

    from .config import KTOConfig

    return HfArgumentParser((ModelArguments, DataArguments, KTOConfig, TrainingArguments))


def _parse_train_args(argv: list[str]) -> tuple[Any, Any, Any, Any]:
    parser = _parser()
    if "--config" in argv:
        i = argv.index("--config")
        path = argv[i + 1] if i + 1 < len(argv) else None
        if not path or not os.path.isfile(path):
            raise SystemExit(f"kto-plugin train: --config needs a YAML file, got {path!r}.")
        import yaml

        with open(path) as f:
            from_file = yaml.safe_load(f) or {}
        rest = argv[:i] + argv[i + 2 :]
        flags = [x for k, v in from_file.items() for x in (f"--{k}", json.dumps(v) if isinstance(v, (dict, list)) else str(v))]
        argv = flags + rest  # command-line flags come last, so they override the file
    if "--output_dir" not in argv:
        argv = argv + ["--output_dir", "kto_output"]
    return parser.parse_args_into_dataclasses(args=argv)


def train(argv: list[str]) -> int:
    """Train with KTO; returns a process exit code."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    from . import demo
    from .plugin import KTOPlugin

    model_args, data_args, kto_config, training_args = _parse_train_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    embedded = model_args.model_name_or_path is None and data_args.dataset_name is None
    if (model_args.model_name_or_path is None) != (data_args.dataset_name is None):
        raise SystemExit(
            "kto-plugin train: name both --model_name_or_path and --dataset_name, or neither (the embedded default)."
        )
    if embedded:
        rows = demo.hh_unpaired_rows(data_args.demo_pairs)
        tokenizer = demo.build_tokenizer([r["prompt"] + r["completion"] for r in rows])
        model = demo.build_tiny_model(len(tokenizer), seed=training_args.seed)
        split = int(len(rows) * 0.9) // 2 * 2
        train_rows, eval_rows = rows[:split], rows[split:]
        ref_model = None
    else:
        init = dict(kto_config.model_init_kwargs or {})
        if model_args.dtype:
            init["dtype"] = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
        init.setdefault("trust_remote_code", kto_config.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **init)
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.model_name_or_path, trust_remote_code=kto_config.trust_remote_code
        )
        ref_model = (
            AutoModelForCausalLM.from_pretrained(model_args.ref_model_name_or_path, **init)
            if model_args.ref_model_name_or_path
            else None
        )
        raw = _load_dataset(data_args)
        train_rows = raw[data_args.dataset_train_split]
        eval_rows = raw[data_args.dataset_test_split] if data_args.dataset_test_split else None

    kto = KTOPlugin(kto_config, tokenizer=tokenizer, ref_model=ref_model)
    train_ds = kto.prepare_dataset(train_rows, name="train")
    eval_ds = kto.prepare_dataset(eval_rows, name="eval") if eval_rows is not None else None
    if eval_ds is not None and training_args.eval_strategy == "no":
        training_args.eval_strategy = "epoch"
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=kto.collator,
        processing_class=tokenizer,
    )
    kto.attach(trainer)
    trainer.train()
    trainer.save_model(training_args.output_dir)
    with open(os.path.join(training_args.output_dir, "kto_config.json"), "w") as f:
        json.dump(kto_config.to_dict(), f, indent=2)
    with open(os.path.join(training_args.output_dir, "log_history.json"), "w") as f:
        json.dump(trainer.state.log_history, f, indent=2)
    out = os.path.abspath(training_args.output_dir)
    print(f"\nkto-plugin: done. Model, tokenizer, kto_config.json and log_history.json are in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(
        prog="kto-plugin",
        description="KTO preference training on the stock Hugging Face Trainer.",
        epilog="Run 'kto-plugin train --help' for every training flag.",
    )
    top.add_argument("--version", action="version", version=f"kto-plugin {__version__}")
    top.add_argument("command", choices=["train"], help="train: KTO training (no flags: the embedded tiny default)")
    if not argv or argv[0] in ("-h", "--help", "--version"):
        top.parse_args(argv)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train(rest)
    top.parse_args(argv)  # reports the unknown command
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
