"""`kto-plugin train`: KTO training from the command line, shaped like TRL's `examples/scripts/kto.py`."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from transformers import TrainerCallback

from ._args import (
    DEMO_DEFAULTS,
    _apply_demo_defaults,
    _load_model,
    _tokenizer_source,
    _wrap_peft,
    load_data,
    parse_train_args,
)
from ._errors import CLIError, check_local_path, check_tokenizer, data_source, named_source

logger = logging.getLogger("kto_plugin")


def train(argv: list[str]) -> int:
    """Train with KTO; returns a process exit code."""
    from transformers import AutoTokenizer, Trainer

    from .. import demo
    from ..plugin import KTOPlugin
    from . import _model_card as model_card

    model_args, data_args, kto_config, training_args, given = parse_train_args(argv)
    logging.basicConfig(level=_log_level(), format="%(message)s")
    from transformers import set_seed

    set_seed(training_args.seed)  # before the LoRA adapter is initialised: the same flags give the same run
    if (model_args.model_name_or_path is None) != (data_args.dataset_name is None):
        raise SystemExit(
            "kto-plugin train: name both --model_name_or_path and --dataset_name, or neither (the embedded default)."
        )
    check_sources(model_args, data_args)
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
        with named_source("--model_name_or_path", model_args.model_name_or_path):
            model = _load_model(model_args, kto_config, model_args.model_name_or_path)
        explicit = model_args.tokenizer_name_or_path
        tokenizer_name = explicit or _tokenizer_source(model_args.model_name_or_path)
        with named_source("--tokenizer_name_or_path" if explicit else "--model_name_or_path", tokenizer_name):
            tokenizer = AutoTokenizer.from_pretrained(
                tokenizer_name,
                revision=model_args.model_revision if tokenizer_name == model_args.model_name_or_path else None,
                trust_remote_code=kto_config.trust_remote_code,
            )
        with named_source("--ref_model_name_or_path", model_args.ref_model_name_or_path):
            ref_model = (
                _load_model(model_args, kto_config, model_args.ref_model_name_or_path, argument="ref_model")
                if model_args.ref_model_name_or_path else None
            )
        with named_source("--dataset_name", data_args.dataset_name):
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
    adapter = hasattr(model, "peft_config")  # --use_peft, or a model loaded from an adapter folder
    if adapter and training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = False  # PeftModel is not a PreTrainedModel (DESIGN 3.12)

    kto = KTOPlugin(kto_config, tokenizer=tokenizer, ref_model=ref_model)
    with data_source(data_args.dataset_name or "the shipped HH-RLHF sample"):
        train_ds = kto.prepare_dataset(train_rows, name="train")
        eval_ds = kto.prepare_dataset(eval_rows, name="eval") if eval_rows is not None else None
    if eval_ds is None:
        from transformers.trainer_utils import IntervalStrategy

        training_args.eval_strategy = IntervalStrategy.NO
    trainer = Trainer(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=kto.collator, processing_class=tokenizer,
                      callbacks=[EvaluateAtTheEnd()] if eval_ds is not None else None)
    kto.attach(trainer)
    trainer.train()
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
              f"{' adapter' if adapter else ''} and tokenizer, README.md (model card with the final "
              "metrics), kto_config.json, training_args.json, kto_run.yaml, log_history.json. "
              + _plot_advice(out, embedded))
    return 0


def _log_level() -> int:
    """INFO on the main process; under torchrun the other processes log warnings only, so that each phase's
    line (data, preparation, precompute, generation) appears once."""
    return logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING


class EvaluateAtTheEnd(TrainerCallback):
    """Evaluates after the last step, inside `train()`: the final eval metrics then reach the `report_to`
    trackers in the run they opened (an `evaluate()` after `train()` comes after MLflow's run was ended, and starts
    another)."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # "epoch" evaluates at the end of the last epoch already
        if state.global_step >= state.max_steps and args.eval_strategy != "epoch":
            control.should_evaluate = True


def _plot_advice(out: str, embedded: bool) -> str:
    """The closing message's last sentence: the embedded demo draws its reward curves itself when matplotlib
    is there; otherwise, say how to get the figure."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return f"Plot the run: pip install 'kto_plugin[plot]' (matplotlib), then kto-plugin plot {out}"
    if not embedded:
        return f"Plot the run: kto-plugin plot {out}"
    from ._plot import plot_run

    return f"Reward curves: {plot_run(out)} (redraw: kto-plugin plot {out})"


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
    absolute_paths(resolved)
    header = "# kto-plugin train --config kto_run.yaml reruns this run (flags given after it override it)\n"
    return header + yaml.safe_dump(resolved, sort_keys=False)


# flags naming a path to write (made absolute) and flags naming a path or a Hub id (absolute when the path exists)
WRITTEN_PATHS = ("output_dir", "logging_dir", "precompute_cache_dir")
READ_PATHS = ("model_name_or_path", "tokenizer_name_or_path", "ref_model_name_or_path", "dataset_name",
              "resume_from_checkpoint", "deepspeed", "fsdp_config")


def absolute_paths(resolved: dict[str, Any]) -> None:
    """Local paths in `resolved` made absolute, so that the run's YAML reruns it from any directory."""
    for key in WRITTEN_PATHS + READ_PATHS:
        value = resolved.get(key)
        if isinstance(value, str) and value and (key in WRITTEN_PATHS or os.path.exists(value)):
            resolved[key] = os.path.abspath(os.path.expanduser(value))


def check_sources(model_args: Any, data_args: Any) -> None:
    """Before anything loads: local paths that do not exist, a tokenizer flag without a model, a model folder
    without a tokenizer."""
    for flag, name in (("--model_name_or_path", model_args.model_name_or_path),
                       ("--tokenizer_name_or_path", model_args.tokenizer_name_or_path),
                       ("--ref_model_name_or_path", model_args.ref_model_name_or_path),
                       ("--dataset_name", data_args.dataset_name)):
        check_local_path(flag, name)
    if model_args.tokenizer_name_or_path and model_args.model_name_or_path is None:
        raise CLIError("--tokenizer_name_or_path needs --model_name_or_path (the embedded default builds its own "
                       "tokenizer).")
    check_tokenizer(model_args.model_name_or_path, model_args.tokenizer_name_or_path)
