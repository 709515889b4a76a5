"""The generation tables of `generate_during_eval`, logged to every `report_to` tracker that holds tables.

The scalar metrics reach the trackers through the Trainer's own reporting callbacks (the plugin's metrics
callback runs first and adds the KTO keys to the logs they receive). A table is the plugin's own extra, logged
here into the run the Trainer's callback for that tracker opened (nothing is logged when none is open):

* ``wandb``: a ``wandb.Table`` under ``<split>/generations`` with ``train/global_step``;
* ``trackio``: a ``trackio.Table`` under ``<split>/generations`` with ``train/global_step``;
* ``mlflow``: rows appended to the artifact ``kto_generations/<split>.json`` (``mlflow.log_table``);
* ``tensorboard``: a Markdown table, text summary ``<split>/generations`` at the global step (TEXT tab).

Every row has the columns ``step``, ``prompt``, ``policy``, ``reference``. Only the main process calls these.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger("kto_plugin")

TABLE_COLUMNS = ("step", "prompt", "policy", "reference")


def table_key(split: str) -> str:
    """Tracker key for `split` ("eval", "eval_<name>", "test"), named as the Trainer's reporters name
    metrics."""
    head, _, tail = split.partition("_")
    return f"{head}/{tail + '_' if tail else ''}generations"


def generation_table(rows: Sequence[dict[str, Any]], module: Any) -> Any:
    """`module.Table` (wandb's or trackio's: the same signature) with the columns step / prompt / policy /
    reference, one row per prompt."""
    return module.Table(columns=list(TABLE_COLUMNS), data=[[r[c] for c in TABLE_COLUMNS] for r in rows])


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table (TensorBoard renders text summaries as Markdown)."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(cell(r[c]) for c in TABLE_COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def _table_entry(rows: Sequence[dict[str, Any]], split: str, step: int, module: Any) -> dict[str, Any]:
    """What W&B and trackio log: the table, and the step their Trainer callbacks plot every key against."""
    return {table_key(split): generation_table(rows, module), "train/global_step": step}


def _reports_to(args: Any, name: str) -> bool:
    return name in (args.report_to or []) and importlib.util.find_spec(name) is not None


def log_to_wandb(rows: Sequence[dict[str, Any]], split: str, args: Any, step: int) -> bool:
    """A W&B table in the active run; True when logged."""
    if not _reports_to(args, "wandb"):
        return False
    import wandb

    run = getattr(wandb, "run", None)
    if run is None:
        logger.info("kto_plugin: generate_during_eval: no active W&B run; generations are in the JSONL file "
                    "only.")
        return False
    run.log(_table_entry(rows, split, step, wandb))
    return True


def log_to_trackio(rows: Sequence[dict[str, Any]], split: str, args: Any, step: int) -> bool:
    """A trackio table in the current run (the Trainer's callback opened it); True when logged."""
    if not _reports_to(args, "trackio"):
        return False
    import trackio

    if trackio.context_vars.current_run.get() is None:
        return False
    trackio.log(_table_entry(rows, split, step, trackio))
    return True


def log_to_mlflow(rows: Sequence[dict[str, Any]], split: str, args: Any, step: int) -> bool:
    """Rows appended to the JSON table artifact ``kto_generations/<split>.json`` of the active MLflow run."""
    if not _reports_to(args, "mlflow"):
        return False
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return False
    data = {c: [r[c] for r in rows] for c in TABLE_COLUMNS}
    mlflow.log_table(data=data, artifact_file=f"kto_generations/{split}.json", run_id=run.info.run_id)
    return True


def log_to_tensorboard(
    rows: Sequence[dict[str, Any]], split: str, callbacks: Sequence[Any], step: int
) -> bool:
    """A Markdown text summary through the writer of the Trainer's `TensorBoardCallback`."""
    from transformers.integrations import TensorBoardCallback

    writer = next((c.tb_writer for c in callbacks if isinstance(c, TensorBoardCallback)), None)
    if writer is None:
        return False
    writer.add_text(table_key(split), markdown_table(rows), step)
    writer.flush()
    return True


def log_tables(
    rows: Sequence[dict[str, Any]], split: str, args: Any, step: int, callbacks: Sequence[Any]
) -> list[str]:
    """Log `rows` to every tracker of `args.report_to` that holds tables; returns the trackers logged to."""
    logged = {
        "wandb": log_to_wandb(rows, split, args, step),
        "trackio": log_to_trackio(rows, split, args, step),
        "mlflow": log_to_mlflow(rows, split, args, step),
        "tensorboard": log_to_tensorboard(rows, split, callbacks, step),
    }
    return [name for name, done in logged.items() if done]
