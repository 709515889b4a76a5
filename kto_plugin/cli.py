"""`kto-plugin`: the command line, shaped like TRL's `examples/scripts/kto.py`.

    kto-plugin train                      # the embedded tiny default: offline, about 30 s on 2 CPU cores
    kto-plugin train --model_name_or_path M --dataset_name D [--use_peft] [KTOConfig/TrainingArguments flags]
    kto-plugin train --config run.yaml [--any_flag value]   # flags on the command line override the file
    kto-plugin plot OUTPUT_DIR [--out file.png]
    kto-plugin --version

`train` works unchanged under `accelerate launch` and `torchrun`.
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
# The embedded default trains a tiny randomly initialised model, for which the paper's learning rates (made
# for pretrained models) move nothing visible in a minute; these apply only when the flag is not given.
DEMO_DEFAULTS = {
    "learning_rate": 2e-4,
    "num_train_epochs": 2.0,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "logging_steps": 5,
    "eval_steps": 20,
    "max_length": 384,
}


@dataclass
class ModelArguments:
    """The policy (and optionally a separate reference). No model named: a tiny Llama built in code."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local path of the policy. None: the embedded tiny model."}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Model revision (branch, tag, commit)."})
    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "A separate reference model. None: the initial policy."}
    )
    dtype: str | None = field(
        default=None, metadata={"help": "Weights dtype: auto, float32, bfloat16 or float16.",
                                "choices": ["auto", "float32", "bfloat16", "float16"]}
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, eager, flash_attention_2."})
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter (reference: the base model)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt, e.g. q_proj v_proj, or all-linear. None: PEFT's default.",
                                "nargs": "+"}
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full besides the adapter.", "nargs": "+"}
    )
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA scaling."})


@dataclass
class DataArguments:
    """The data. No dataset named: the shipped HH-RLHF sample."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id, a local .json/.jsonl/.csv/.parquet file, or a directory of them."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Split to evaluate on (optional)."})
    demo_pairs: int = field(
        default=DEMO_PAIRS, metadata={"help": "Embedded default only: how many shipped HH-RLHF pairs to use."}
    )


_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_data(data_args: DataArguments) -> Any:
    """A DatasetDict from a local file or directory, or from the Hub."""
    import datasets

    name = data_args.dataset_name
    ext = os.path.splitext(name)[1].lower()
    if os.path.isfile(name):
        if ext not in _LOCAL_FORMATS:
            raise SystemExit(f"kto-plugin train: {name!r} is not a .json, .jsonl, .csv or .parquet file.")
        return datasets.load_dataset(_LOCAL_FORMATS[ext], data_files=name, **_csv_kwargs([name]))
    if os.path.isdir(name):
        files = [f for f in os.listdir(name) if os.path.splitext(f)[1].lower() in _LOCAL_FORMATS]
        return datasets.load_dataset(name, data_args.dataset_config, **_csv_kwargs(files))
    return datasets.load_dataset(name, data_args.dataset_config)


def _csv_kwargs(files: list[str]) -> dict[str, Any]:
    """CSV text columns stay strings: pandas would read a completion " 4" as the float 4.0."""
    if not files or any(os.path.splitext(f)[1].lower() != ".csv" for f in files):
        return {}
    return {"converters": dict.fromkeys(("prompt", "completion", "chosen", "rejected"), str)}


def _parser() -> Any:
    from transformers import HfArgumentParser, TrainingArguments

    from .config import KTOConfig

    parser = HfArgumentParser(
        (ModelArguments, DataArguments, KTOConfig, TrainingArguments),
        prog="kto-plugin train",
        description="KTO training on the stock Hugging Face Trainer. With no --model_name_or_path and no "
        "--dataset_name it trains the embedded tiny default offline. Every KTOConfig and TrainingArguments "
        "field is a flag.",
    )
    # Read by parse_train_args before argparse sees the command line; declared here so that --help lists it.
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE.yaml",
                        help="A YAML mapping of flag names to values; flags on the command line override it.")
    return parser


def parse_train_args(argv: list[str]) -> tuple[Any, Any, Any, Any, set[str]]:
    """Parse flags (and a YAML --config); returns the four dataclasses and the names set explicitly."""
    parser = _parser()
    argv = list(argv)
    given: set[str] = set()
    for i, arg in enumerate(argv):  # "--config=FILE" is "--config FILE", as argparse reads every other flag
        if arg.startswith("--config="):
            argv[i : i + 1] = ["--config", arg.split("=", 1)[1]]
            break
    if "--config" in argv:
        i = argv.index("--config")
        path = argv[i + 1] if i + 1 < len(argv) else None
        if not path or not os.path.isfile(path):
            raise SystemExit(f"kto-plugin train: --config needs a YAML file, got {path!r}.")
        import yaml

        with open(path) as f:
            from_file = yaml.safe_load(f) or {}
        if not isinstance(from_file, dict):
            raise SystemExit(f"kto-plugin train: {path} must be a mapping of flag names to values.")
        known = {a.dest for a in parser._actions} - {"config", "help"}
        unknown = sorted(set(from_file) - known)
        if unknown:
            raise SystemExit(f"kto-plugin train: unknown keys in {path}: {unknown}. Use the flag names of --help.")
        parser.set_defaults(**from_file)
        given |= set(from_file)
        argv = argv[:i] + argv[i + 2 :]
    given |= {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    if "output_dir" not in given:
        argv += ["--output_dir", "kto_output"]
    if "use_cpu" not in given and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator():
        # Under torchrun on a CPU-only machine, TrainingArguments without use_cpu leaves accelerate's state
        # non-distributed: every process would train its own copy and write the same output_dir.
        argv += ["--use_cpu", "true"]
    model_args, data_args, kto_config, training_args = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, kto_config, training_args, given


def _has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def _apply_demo_defaults(given: set[str], kto_config: Any, training_args: Any) -> None:
    for name, value in DEMO_DEFAULTS.items():
        if name in given:
            continue
        target = kto_config if hasattr(kto_config, name) else training_args
        setattr(target, name, value)
    if "eval_strategy" not in given:
        from transformers.trainer_utils import IntervalStrategy

        training_args.eval_strategy = IntervalStrategy.STEPS
    if "save_strategy" not in given:
        from transformers.trainer_utils import SaveStrategy

        training_args.save_strategy = SaveStrategy.NO
    if "report_to" not in given:
        training_args.report_to = []
    kto_config.warn_guidance = "warn_guidance" in given and kto_config.warn_guidance


def _load_model(model_args: ModelArguments, kto_config: Any, name: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    init = dict(kto_config.model_init_kwargs or {})
    if model_args.dtype:
        init["dtype"] = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    if model_args.attn_implementation:
        init["attn_implementation"] = model_args.attn_implementation
    if model_args.model_revision:
        init["revision"] = model_args.model_revision
    init.setdefault("trust_remote_code", kto_config.trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(name, **init)


def _wrap_peft(model: Any, model_args: ModelArguments) -> Any:
    from peft import LoraConfig, get_peft_model

    target = model_args.lora_target_modules
    if target == ["all-linear"]:
        target = "all-linear"
    config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=target,
        modules_to_save=model_args.lora_modules_to_save,
        use_rslora=model_args.use_rslora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def train(argv: list[str]) -> int:
    """Train with KTO; returns a process exit code."""
    from transformers import AutoTokenizer, Trainer

    from . import demo, model_card
    from .plugin import KTOPlugin

    model_args, data_args, kto_config, training_args, given = parse_train_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers import set_seed

    set_seed(training_args.seed)  # before the LoRA adapter is initialised: the same flags give the same run
    if (model_args.model_name_or_path is None) != (data_args.dataset_name is None):
        raise SystemExit(
            "kto-plugin train: name both --model_name_or_path and --dataset_name, or neither (the embedded default)."
        )
    embedded = model_args.model_name_or_path is None
    if embedded:
        _apply_demo_defaults(given, kto_config, training_args)
        rows = demo.hh_unpaired_rows(data_args.demo_pairs)
        tokenizer = demo.build_tokenizer([r["prompt"] + r["completion"] for r in rows])
        model = demo.build_tiny_model(len(tokenizer), seed=training_args.seed)
        split = int(len(rows) * 0.9) // 2 * 2
        train_rows, eval_rows = rows[:split], rows[split:]
        ref_model = None
        base_name = "embedded tiny Llama (hidden 64, 2 layers, built from a config)"
        data_name = f"HH-RLHF harmless-base test, first {data_args.demo_pairs} pairs (shipped)"
        print(f"kto-plugin: embedded default: {base_name}, {data_name}; demo learning rate "
              f"{training_args.learning_rate:g} (a random tiny model needs a far higher rate than the paper's "
              "guidance for pretrained models).")
    else:
        model = _load_model(model_args, kto_config, model_args.model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.model_name_or_path, revision=model_args.model_revision,
            trust_remote_code=kto_config.trust_remote_code,
        )
        ref_model = (
            _load_model(model_args, kto_config, model_args.ref_model_name_or_path)
            if model_args.ref_model_name_or_path else None
        )
        raw = load_data(data_args)
        if data_args.dataset_train_split not in raw:
            raise SystemExit(f"kto-plugin train: no split {data_args.dataset_train_split!r} in {data_args.dataset_name}"
                             f" (it has {list(raw)}). Set --dataset_train_split.")
        if data_args.dataset_test_split and data_args.dataset_test_split not in raw:
            raise SystemExit(f"kto-plugin train: no split {data_args.dataset_test_split!r} in {data_args.dataset_name}"
                             f" (it has {list(raw)}). Set --dataset_test_split to one of them, or give a directory "
                             "holding one file per split (train.jsonl, test.jsonl), or leave it unset.")
        train_rows = raw[data_args.dataset_train_split]
        eval_rows = raw[data_args.dataset_test_split] if data_args.dataset_test_split else None
        base_name, data_name = model_args.model_name_or_path, data_args.dataset_name
    if model_args.use_peft:
        model = _wrap_peft(model, model_args)
        if training_args.ddp_find_unused_parameters is None:
            training_args.ddp_find_unused_parameters = False  # PeftModel is not a PreTrainedModel (DESIGN 3.12)

    kto = KTOPlugin(kto_config, tokenizer=tokenizer, ref_model=ref_model)
    train_ds = kto.prepare_dataset(train_rows, name="train")
    eval_ds = kto.prepare_dataset(eval_rows, name="eval") if eval_rows is not None else None
    if eval_ds is None:
        from transformers.trainer_utils import IntervalStrategy

        training_args.eval_strategy = IntervalStrategy.NO
    trainer = Trainer(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=kto.collator, processing_class=tokenizer)
    kto.attach(trainer)
    trainer.train()
    if eval_ds is not None:
        trainer.evaluate()
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        out = training_args.output_dir
        trainer.save_state()
        history = trainer.state.log_history
        with open(os.path.join(out, "kto_config.json"), "w") as f:
            json.dump(kto_config.to_dict(), f, indent=2)
        with open(os.path.join(out, "training_args.json"), "w") as f:
            f.write(training_args.to_json_string())
        with open(os.path.join(out, "kto_run.yaml"), "w") as f:
            f.write(_run_yaml(model_args, data_args, kto_config, training_args, given, embedded))
        with open(os.path.join(out, "log_history.json"), "w") as f:
            json.dump(history, f, indent=2)
        with open(os.path.join(out, "README.md"), "w") as f:
            f.write(model_card.render(base_name, data_name, kto_config.to_dict(), training_args.to_dict(), history,
                                      kto.reference.describe() if kto.trainer else "initial policy"))
        print(f"\nkto-plugin: done. Outputs in {os.path.abspath(out)}: the model"
              f"{' adapter' if model_args.use_peft else ''} and tokenizer, README.md (model card with the final "
              "metrics), kto_config.json, training_args.json, kto_run.yaml, log_history.json. Plot the run: "
              f"kto-plugin plot {out}")
    return 0


def _run_yaml(model_args: Any, data_args: Any, kto_config: Any, training_args: Any, given: set[str],
              embedded: bool) -> str:
    """The run's resolved flags as a YAML that `kto-plugin train --config` reads back: every model, data and
    KTOConfig field, and the TrainingArguments fields that were set (by flag, file or the demo's defaults)."""
    import dataclasses

    import yaml

    set_here = set(given) | ({*DEMO_DEFAULTS, "eval_strategy", "save_strategy", "report_to"} if embedded else set())
    resolved_training = training_args.to_dict()
    resolved = {**dataclasses.asdict(model_args), **dataclasses.asdict(data_args), **kto_config.to_dict(),
                **{k: resolved_training[k] for k in sorted(set_here) if k in resolved_training}}
    resolved.pop("config", None)
    header = "# kto-plugin train --config kto_run.yaml reruns this run (flags given after it override it)\n"
    return header + yaml.safe_dump(resolved, sort_keys=False)


def plot(argv: list[str]) -> int:
    from .plot import plot_run

    parser = argparse.ArgumentParser(prog="kto-plugin plot", description="Plot a KTO run's rewards, KL and loss.")
    parser.add_argument("output_dir", help="a run's output directory (log_history.json or trainer_state.json)")
    parser.add_argument("--out", default=None, help="PNG path (default: OUTPUT_DIR/kto_metrics.png)")
    opts = parser.parse_args(argv)
    try:
        path = plot_run(opts.output_dir, opts.out)
    except FileNotFoundError as err:
        raise SystemExit(f"kto-plugin plot: {err}") from None
    print(f"kto-plugin: wrote {path}")
    return 0


COMMANDS = {"train": train, "plot": plot}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(
        prog="kto-plugin",
        description="KTO preference training on the stock Hugging Face Trainer.",
        epilog="kto-plugin train --help lists every training flag (KTOConfig, TrainingArguments, model, data, "
        "LoRA). With no flags, 'kto-plugin train' trains the embedded tiny default offline.",
    )
    top.add_argument("--version", action="version", version=f"kto-plugin {__version__}")
    top.add_argument("command", choices=sorted(COMMANDS), help="train: KTO training; plot: curves of a run")
    if not argv:
        top.print_help()
        return 2
    if argv[0] not in COMMANDS:
        top.parse_args(argv)  # --help, --version, or an error naming the valid commands
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
