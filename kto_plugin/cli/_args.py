"""`kto-plugin train`'s flags: the model and data arguments, and parsing them with `KTOConfig` and
`TrainingArguments` (a YAML `--config` too)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from ._errors import check_flags, did_you_mean, usage_error

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
        default=None,
        metadata={"help": "Hub id or local folder of the policy (save_pretrained output, or a PEFT adapter folder: its "
                          "base model with the adapter, which trains further). None: the embedded tiny model."},
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
        metadata={"help": "A local .jsonl/.json/.csv/.parquet file, a save_to_disk folder, a folder of such files "
                          "(one per split), or a Hub dataset id (offline: read from the local datasets cache)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Split to evaluate on (optional)."})
    demo_pairs: int = field(
        default=DEMO_PAIRS, metadata={"help": "Embedded default only: how many shipped HH-RLHF pairs to use."}
    )


def load_data(data_args: DataArguments) -> Any:
    """The splits of --dataset_name (`kto_plugin.data.load_preference_data`: a file, a save_to_disk folder, a folder
    of files or a Hub dataset), with one log line saying what was read and how long it took."""
    from ..data import load_preference_data
    from ..data._report import duration
    from ..data._sources import describe_source

    name = data_args.dataset_name
    started = time.perf_counter()
    try:
        data = load_preference_data(name, data_args.dataset_config)
    except ValueError as err:
        raise SystemExit(f"kto-plugin train: {err}") from None
    splits = ", ".join(f"{split} {len(rows)} rows" for split, rows in data.items())
    logger.info("kto-plugin: loaded %s (%s): %s in %s", name, describe_source(name), splits,
                duration(time.perf_counter() - started))
    return data


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
    _group_help(parser, KTOConfig, TrainingArguments)
    _several_trackers(parser)
    return parser


def _several_trackers(parser: Any) -> None:
    """`--report_to tensorboard wandb`: one or more trackers, as `TrainingArguments.report_to` takes a list
    (HfArgumentParser reads its `str | list[str]` type as one string)."""
    action = next(a for a in parser._actions if a.dest == "report_to")
    action.nargs = "+"
    action.help = (action.help or "") + " Several: --report_to tensorboard wandb."


LORA_FLAGS = ("use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save",
              "use_rslora")


def _group_help(parser: Any, kto_config: type, training_arguments: type) -> None:
    """`--help` in sections, as TRL's scripts show theirs: model, LoRA, data, KTO, Trainer (parsing is unchanged).

    HfArgumentParser puts every field in the parser's one "options" section; each flag's action moves to its
    section here (argparse has no public way to move one: `_group_actions` is what `add_argument_group` fills).
    """
    model = [f.name for f in dataclasses.fields(ModelArguments) if f.name not in LORA_FLAGS]
    sections = (
        ("model", "The policy and, optionally, a separate reference.", model),
        ("LoRA", "Train a LoRA adapter instead of the full model (reference: the base model).", LORA_FLAGS),
        ("data", "Preference data: a Hub dataset, a file, a folder; none: the shipped HH-RLHF sample.",
         [f.name for f in dataclasses.fields(DataArguments)]),
        ("KTO (KTOConfig)", "The KTO loss, data preparation and reference.",
         [f.name for f in dataclasses.fields(kto_config)]),
        ("Trainer (TrainingArguments)", "The stock Trainer's own flags.",
         [f.name for f in dataclasses.fields(training_arguments)]),
    )
    options = parser._optionals._group_actions
    for title, description, names in sections:
        group = parser.add_argument_group(title, description)
        wanted = set(names)
        moved = [action for action in options if action.dest in wanted]
        for action in moved:
            options.remove(action)
            group._group_actions.append(action)


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


def _load_model(model_args: ModelArguments, kto_config: Any, name: str, argument: str = "model") -> Any:
    """A model folder (`save_pretrained`, or a PEFT adapter folder: its base model with the adapter) or a Hub id,
    with one log line (parameters, time)."""
    from ..data._report import duration
    from ..trainer._models import load_pretrained

    init = dict(kto_config.model_init_kwargs or {})
    if model_args.dtype:
        init["dtype"] = model_args.dtype
    if model_args.attn_implementation:
        init["attn_implementation"] = model_args.attn_implementation
    if model_args.model_revision:
        init["revision"] = model_args.model_revision
    started = time.perf_counter()
    model = load_pretrained(name, init, trust_remote_code=kto_config.trust_remote_code, argument=argument)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("kto-plugin: loaded %s %s: %.1fM parameters (%.1fM trainable%s) in %s", argument, name, total / 1e6,
                trainable / 1e6, ", with its adapter" if hasattr(model, "peft_config") else "",
                duration(time.perf_counter() - started))
    return model


def _tokenizer_source(name: str) -> str:
    """Where the tokenizer of model `name` is: the folder itself, or for an adapter folder saved without one (as
    `PeftModel.save_pretrained` does), the base model the adapter names."""
    from ..trainer._models import is_adapter_folder

    if not is_adapter_folder(name) or os.path.isfile(os.path.join(name, "tokenizer_config.json")):
        return name
    from peft import PeftConfig

    return PeftConfig.from_pretrained(name).base_model_name_or_path


def _wrap_peft(model: Any, model_args: ModelArguments) -> Any:
    """A new LoRA adapter from the --lora_* flags; a model loaded from an adapter folder trains that adapter."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        logger.info("kto-plugin: --use_peft: the model was loaded with its adapter, which trains further; the "
                    "--lora_* flags apply to new adapters only")
        return model

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
