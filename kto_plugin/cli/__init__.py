"""`kto-plugin`: the command line, shaped like TRL's `examples/scripts/kto.py`.

    kto-plugin train                      # the embedded tiny default: offline, about 30 s on 2 CPU cores
    kto-plugin train --model_name_or_path M --dataset_name D [--use_peft] [KTOConfig/TrainingArguments flags]
    kto-plugin train --config run.yaml [--any_flag value]   # flags on the command line override the file
    kto-plugin plot OUTPUT_DIR [--out file.png]
    kto-plugin --version

`train` works unchanged under `accelerate launch` and `torchrun` (``python -m kto_plugin.cli train ...``).
``_args`` (flags), ``_train`` (the train command), ``_plot`` (the plot command), ``_model_card`` (the output
folder's README), ``_errors`` (a mistake as one line and an exit status; ``KTO_PLUGIN_TRACEBACK=1`` shows the
traceback).
"""

from __future__ import annotations

import argparse
import sys

from .._version import __version__
from ._args import DataArguments, ModelArguments, parse_train_args
from ._errors import did_you_mean, run
from ._train import train

__all__ = ["DataArguments", "ModelArguments", "main", "parse_train_args", "train"]


def plot(argv: list[str]) -> int:
    from ._plot import plot_run

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
        if not argv[0].startswith("-"):
            print(f"kto-plugin: error: unknown command {argv[0]!r}.{did_you_mean(argv[0], sorted(COMMANDS), repr)} "
                  f"Commands: {', '.join(sorted(COMMANDS))}.", file=sys.stderr)
            return 2
        top.parse_args(argv)  # --help, --version, or an error naming the valid commands
        return 2
    return run(COMMANDS[argv[0]], argv[1:], f"kto-plugin {argv[0]}")

