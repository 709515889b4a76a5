"""`kto-plugin plot OUTPUT_DIR`: reward curves, KL and loss of a run, train and eval, to one PNG.

Reads the log history a run leaves in its output directory (`trainer_state.json`, or the
`log_history.json` that `kto-plugin train` writes). matplotlib is the optional extra ``plot``.
"""

from __future__ import annotations

import json
import os
from typing import Any

PANELS = (
    ("rewards", ("rewards/chosen", "rewards/rejected", "rewards/margins")),
    ("KL reference point z0", ("kl",)),
    ("loss", ("loss",)),
    ("log-probs", ("logps/chosen", "logps/rejected")),
)


def load_log_history(output_dir: str) -> list[dict[str, Any]]:
    """The Trainer's log history from `output_dir` (or its newest checkpoint)."""
    if not os.path.isdir(output_dir):
        raise FileNotFoundError(f"{output_dir!r}: no such directory ({os.path.abspath(output_dir)}). Give the "
                                "--output_dir of a run.")
    candidates = [os.path.join(output_dir, "log_history.json"), os.path.join(output_dir, "trainer_state.json")]
    checkpoints = sorted(
        (d for d in os.listdir(output_dir) if d.startswith("checkpoint-")),
        key=lambda d: int(d.split("-")[-1]) if d.split("-")[-1].isdigit() else -1,
    )
    candidates += [os.path.join(output_dir, d, "trainer_state.json") for d in reversed(checkpoints)]
    for path in candidates:
        if os.path.isfile(path):
            with open(path) as f:
                data = json.load(f)
            return data["log_history"] if isinstance(data, dict) else data
    raise FileNotFoundError(
        f"No log history in {output_dir!r}: expected log_history.json (written by kto-plugin train) or "
        "trainer_state.json (written by trainer.save_state() and in every checkpoint-*/)."
    )


def series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for entry in history:
        if key in entry and "step" in entry:
            steps.append(entry["step"])
            values.append(entry[key])
    return steps, values


def _short(name: str) -> str:
    """A Hub id as it is; a local path by its last part (a title names the run, not where it happened to
    be)."""
    return os.path.basename(os.path.normpath(name)) if os.path.exists(name) else name


def run_title(output_dir: str) -> str:
    """The figure's title: the run's name (``run_name``, else the output folder's name) and, for a run of
    `kto-plugin train`, what it trained on what (from its ``training_args.json`` and ``kto_run.yaml``)."""
    name = None
    args_path = os.path.join(output_dir, "training_args.json")
    if os.path.isfile(args_path):
        with open(args_path) as f:
            name = json.load(f).get("run_name")
    title = f"KTO run '{_short(name or os.path.abspath(output_dir))}'"
    run_path = os.path.join(output_dir, "kto_run.yaml")
    if os.path.isfile(run_path):
        import yaml

        with open(run_path) as f:
            run = yaml.safe_load(f) or {}
        model, data = run.get("model_name_or_path"), run.get("dataset_name")
        model = _short(model) if model else "embedded tiny Llama"
        data = _short(data) if data else "shipped HH-RLHF sample"
        title += f": {model} on {data}"
    return title


def plot_run(output_dir: str, out_path: str | None = None) -> str:
    """Write the figure; returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "kto-plugin plot needs matplotlib, an optional extra: pip install 'kto_plugin[plot]' "
            "(or pip install matplotlib)."
        ) from None
    history = load_log_history(output_dir)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    drawn = 0
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for key in keys:
            for prefix, style in (("", "-"), ("eval_", "o--")):
                steps, values = series(history, prefix + key)
                if steps:
                    ax.plot(steps, values, style, label=prefix + key, markersize=4)
                    drawn += 1
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if drawn == 0:
        plt.close(fig)
        raise SystemExit(f"The log history in {output_dir!r} has no KTO metrics (rewards/*, kl, loss) to plot.")
    fig.suptitle(run_title(output_dir), fontsize=11)
    out_path = out_path or os.path.join(output_dir, "kto_metrics.png")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
