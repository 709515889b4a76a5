"""The model card (`README.md` in the output directory) that `kto-plugin train` writes."""

from __future__ import annotations

from typing import Any

from .._version import __version__

_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
            "kl")

CITATION = """@article{ethayarajh2024kto,
  title   = {{KTO: Model Alignment as Prospect Theoretic Optimization}},
  author  = {Kawin Ethayarajh and Winnie Xu and Niklas Muennighoff and Dan Jurafsky and Douwe Kiela},
  year    = 2024,
  eprint  = {arXiv:2402.01306},
}"""


def _last(history: list[dict[str, Any]], key: str) -> Any:
    for entry in reversed(history):
        if key in entry:
            return entry[key]
    return None


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render(
    base_model: str,
    dataset: str,
    kto_config: dict[str, Any],
    training: dict[str, Any],
    history: list[dict[str, Any]],
    reference: str,
) -> str:
    """Markdown: what was trained, on what, with which settings, and the final train/eval metrics."""
    rows = []
    for key in _METRICS:
        train, evaluation = _last(history, key), _last(history, "eval_" + key)
        if train is not None or evaluation is not None:
            rows.append(f"| {key} | {_fmt(train) if train is not None else '-'} | "
                        f"{_fmt(evaluation) if evaluation is not None else '-'} |")
    settings = {k: kto_config[k] for k in ("loss_type", "beta", "desirable_weight", "undesirable_weight",
                                           "max_length") if k in kto_config}
    settings.update({k: training[k] for k in ("learning_rate", "per_device_train_batch_size",
                                              "gradient_accumulation_steps", "num_train_epochs", "max_steps",
                                              "seed") if k in training})
    lines = [
        "---",
        "library_name: transformers",
        "tags: [kto, kto_plugin, preference-optimization]",
        "---",
        "",
        f"# {base_model} + KTO",
        "",
        f"Trained with KTO (Kahneman-Tversky Optimization) by kto_plugin {__version__} on the stock",
        "Hugging Face Trainer.",
        "",
        f"- base model: {base_model}",
        f"- data: {dataset}",
        f"- reference: {reference}",
        f"- steps: {_last(history, 'step')}",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in settings.items()],
        "",
        "## Final metrics",
        "",
        "| metric | train (last log) | eval (last) |",
        "|---|---|---|",
        *rows,
        "",
        "The full configuration is in `kto_config.json` and `training_args.json`; every log in",
        "`log_history.json`. `kto-plugin plot <this directory>` draws the curves.",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)
