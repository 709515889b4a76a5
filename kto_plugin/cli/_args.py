"""`kto-plugin train`'s flags: the model and data arguments, and parsing them with `KTOConfig` and
`TrainingArguments` (a YAML `--config` too)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any

from ._errors import check_flags, did_you_mean, usage_error

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
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local path of the tokenizer. None: the model's own "
                                "(--model_name_or_path must then hold one)."}
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

    from ..config import KTOConfig

    parser = HfArgumentParser(
        (ModelArguments, DataArguments, KTOConfig, TrainingArguments),
        prog="kto-plugin train",
        description="KTO training on the stock Hugging Face Trainer. With no --model_name_or_path and no "
        "--dataset_name it trains the embedded tiny default offline. Every KTOConfig and TrainingArguments "
        "field is a flag.",
    )
    parser.error = usage_error  # one line, not the usage of every flag
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
            hints = "".join(did_you_mean(key, sorted(known), repr) for key in unknown)
            raise SystemExit(f"kto-plugin train: unknown keys in {path}: {unknown}.{hints} Use the flag names of "
                             "--help.")
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
    check_flags(parser, argv)
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
