"""The preference formats `prepare_dataset` accepts, how each is recognised, and row-level validation.

Formats (TRL 1.16's KTO documentation lists the same ones):

* unpaired ``{prompt, completion, label}``: one row per judged completion, ``label`` a bool;
* paired ``{prompt, chosen, rejected}``: becomes two unpaired rows (chosen -> True, rejected -> False);
* implicit prompt ``{chosen, rejected}``: the shared start of the two is the prompt (as TRL's
  `extract_prompt`), then as paired.

Each value is a string, or (conversational) a list of ``{"role", "content"}`` messages; all rows of a dataset
use one of the two. Errors name the column, the row index and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import datasets
import numpy as np

from ..errors import DataError
from ._encoding import common_prefix_length
from ._hints import closest_column, label_fix
from ._sources import load_preference_data

UNPAIRED, PAIRED, IMPLICIT = "unpaired", "paired", "implicit_prompt"
COLUMNS = {
    UNPAIRED: ("prompt", "completion", "label"),
    PAIRED: ("prompt", "chosen", "rejected"),
    IMPLICIT: ("chosen", "rejected"),
}
TEXT_COLUMNS = {UNPAIRED: ("prompt", "completion"), PAIRED: ("prompt", "chosen", "rejected"),
                IMPLICIT: ("chosen", "rejected")}
# columns read by preparation and not carried into the prepared dataset
CONSUMED = ("prompt", "completion", "chosen", "rejected", "tools", "chat_template_kwargs")
_SHAPES = (
    "KTO rows are {'prompt', 'completion', 'label': bool} (unpaired), {'prompt', 'chosen', 'rejected'} "
    "(paired) or {'chosen', 'rejected'} (implicit prompt)"
)


def is_conversational(value: Any) -> bool:
    """True for a non-empty list of ``{"role": ..., ...}`` messages."""
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], Mapping) and "role" in value[0]


def detect_format(column_names: Sequence[str], name: str, list_input: bool = False) -> str:
    """The format of a dataset with these columns; a clear error (with the closest column) when none fits.

    `list_input`: the rows came as a list of dicts (the suggested rename is written for a list)."""
    cols = list(column_names)
    has = set(cols)
    if {"chosen", "rejected"} <= has:
        return PAIRED if "prompt" in has else IMPLICIT
    if set(COLUMNS[UNPAIRED]) <= has:
        return UNPAIRED
    near = lambda c: closest_column(c, cols) is not None  # noqa: E731
    paired_intent = ("chosen" in has or "rejected" in has) or (
        "completion" not in has and "label" not in has and (near("chosen") or near("rejected"))
    )
    wanted = ("chosen", "rejected") if paired_intent else COLUMNS[UNPAIRED]
    missing = next(c for c in wanted if c not in has)
    match = closest_column(missing, cols)
    renamed = (f"rows = [{{({missing!r} if k == {match!r} else k): v for k, v in r.items()}} for r in rows]"
               if list_input else f"dataset = dataset.rename_column({match!r}, {missing!r})")
    rename = f" Did you mean {match!r}? Rename it: {renamed}." if match else ""
    file_rename = f" Did you mean {match!r}? Rename that column (key) to {missing!r} in the data file." if match else ""
    raise DataError(
        f"{name} dataset has no {missing!r} column (columns: {cols}).",
        f"{rename.strip()} {_SHAPES}.".strip(),
        f"{file_rename.strip()} {_SHAPES}.".strip(),
    )


def check_rows(batch: Mapping[str, list], indices: Sequence[int], fmt: str, conversational: bool, name: str,
               list_input: bool = False) -> None:
    """Raise for the first bad row of a batch: wrong label type, None/empty text, mixed plain/conversational.

    `list_input`: the rows came as a list of dicts (the suggested fixes are written for a list, not a dataset).
    """
    kind = "conversational (lists of {'role', 'content'} messages)" if conversational else "plain text (strings)"
    if fmt == UNPAIRED:
        for row, label in zip(indices, batch["label"]):
            if not isinstance(label, (bool, np.bool_)):
                raise _label_error(name, row, label, batch["label"], list_input)
    for column in TEXT_COLUMNS[fmt]:
        for row, value in zip(indices, batch[column]):
            if value is None or (isinstance(value, (str, list)) and len(value) == 0):
                keep = (f"rows = [r for r in rows if r[{column!r}]]" if list_input
                        else f"dataset = dataset.filter(lambda r: bool(r[{column!r}]))")
                raise DataError(
                    f"{name} dataset, row {row}: {column!r} is {value!r}. Every row needs a non-empty "
                    f"{' and '.join(repr(c) for c in TEXT_COLUMNS[fmt])}.",
                    f"Filter such rows out first: {keep}",
                    f"Fill in its {column!r} in the data file, or delete that row.",
                )
            if isinstance(value, list) and not is_conversational(value):
                got = type(value[0]).__name__
                raise DataError(
                    f"{name} dataset, row {row}: {column!r} is a list of {got}, not a string or a list of "
                    "{'role', 'content'} messages.",
                    "Join it into one string, or write it as messages, e.g. [{'role': 'assistant', 'content': ...}].",
                )
            if not isinstance(value, (str, list)) or is_conversational(value) != conversational:
                got = "conversational" if is_conversational(value) else type(value).__name__
                raise DataError(
                    f"{name} dataset, row {row}: {column!r} is {got} but row 0 is {kind}.",
                    "Use one format for all rows and columns: strings everywhere, or lists of {'role', 'content'} "
                    "messages everywhere.",
                )


def _label_error(name: str, row: int, label: Any, labels: Sequence[Any], list_input: bool) -> DataError:
    """The error for a label that is not a bool, with a fix built from every label of the batch."""
    problem = (f"{name} dataset, row {row}: 'label' is {label!r} ({type(label).__name__}); it must be a bool "
               "(True = desirable, False = undesirable).")
    if label is None:
        keep = "rows = [r for r in rows if r['label'] is not None]" if list_input else (
            "dataset = dataset.filter(lambda r: r['label'] is not None)")
        return DataError(problem, f"Give every row a label, or drop the rows without one: {keep}",
                         "Give every row a label in the data file: true (desirable) or false (undesirable).")
    if not isinstance(label, Hashable) or isinstance(label, tuple):
        return DataError(problem, f"It holds {len(label)} values: a row takes one label (a dict of lists is a batch, "
                         "not a row: pass datasets.Dataset.from_dict(columns) or a list of row dicts).",
                         "Write one label per row in the data file: true (desirable) or false (undesirable).")
    values = [v for v in labels if isinstance(v, Hashable) and not isinstance(v, (bool, np.bool_, tuple, type(None)))]
    fix, file_fix = label_fix(values, list_input)
    return DataError(problem, fix, file_fix)


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) from an implicit-prompt pair, as TRL 1.16's `extract_prompt`.

    The prompt is the longest common prefix (characters of strings, whole messages of conversations); a
    space right before the divergence goes to the completions. When one is a prefix of the other (or they
    are equal) TRL's loop ends one element early, leaving the last shared element in both completions; we
    reproduce that. (TRL also moves a trailing space of `chosen` when nothing is shared; we leave the prompt
    empty instead, which validation refuses.)
    """
    shortest = min(len(chosen), len(rejected))
    idx = common_prefix_length(chosen, rejected)
    if idx >= shortest:
        idx = shortest - 1
    elif idx > 0 and chosen[idx - 1] == " ":
        idx -= 1
    return chosen[:idx], chosen[idx:], rejected[idx:]


def check_columns_of_rows(rows: Sequence[Mapping[str, Any]], fmt: str, name: str) -> None:
    """Every row of a list has the columns of row 0's format."""
    for i, row in enumerate(rows):
        missing = [c for c in COLUMNS[fmt] if c not in row]
        if missing:
            raise ValueError(
                f"{name} dataset, row {i}: missing {missing} (row 0 has them; columns of row {i}: {sorted(row)}). "
                "Give every row the same columns."
            )


def columns_from_dict(data: Mapping[str, Any], name: str) -> None:
    """A dict of columns must hold equally long lists; names the column whose length differs."""
    if not data:
        raise ValueError(f"{name} dataset is an empty dict: no columns, no rows to train on. {_SHAPES}.")
    lengths = {}
    for column, values in data.items():
        if not isinstance(values, (list, tuple)):
            raise TypeError(
                f"{name} dataset: a dict of columns needs a list per column, but {column!r} is "
                f"{type(values).__name__}. Pass {{column: [value per row]}}, or a list of row dicts."
            )
        lengths[column] = len(values)
    reference = next(iter(lengths))
    for column, n in lengths.items():
        if n != lengths[reference]:
            raise ValueError(
                f"{name} dataset: column {column!r} has {n} values but {reference!r} has {lengths[reference]}; "
                "every column of a dict of columns needs one value per row. Fix the lists, or pass a list of "
                "row dicts."
            )


def as_dataset(data: Any, name: str = "train") -> Any:
    """A `datasets` object from what users pass: datasets objects as they are, a list of row dicts, a dict of
    columns, or a path or Hub name (`kto_plugin.data._sources`). Lists are checked in Python first: Arrow's own
    conversion errors name neither the row nor the fix."""
    if isinstance(data, (str, os.PathLike)):
        return load_preference_data(data)
    if isinstance(data, (datasets.Dataset, datasets.DatasetDict, datasets.IterableDataset,
                         datasets.IterableDatasetDict)):
        return data
    if isinstance(data, Mapping):
        columns_from_dict(data, name)
        keys = list(data)
        data = [dict(zip(keys, values)) for values in zip(*(data[k] for k in keys))]
    if isinstance(data, (list, tuple)):
        if not data:
            raise ValueError(f"prepare_dataset: the {name} dataset is an empty list: there are no rows to train on.")
        bad = next((i for i, row in enumerate(data) if not isinstance(row, Mapping)), None)
        if bad is not None:
            raise TypeError(
                f"prepare_dataset: row {bad} of the {name} list is a {type(data[bad]).__name__}, not a dict. Pass "
                "a list of row dicts, e.g. [{'prompt': ..., 'completion': ..., 'label': True}, ...]."
            )
        fmt = detect_format(list(data[0]), name, list_input=True)
        check_columns_of_rows(data, fmt, name)
        first = data[0][TEXT_COLUMNS[fmt][0]]
        check_rows({c: [row[c] for row in data] for c in COLUMNS[fmt]}, range(len(data)), fmt,
                   is_conversational(first), name, list_input=True)
        return datasets.Dataset.from_list([dict(row) for row in data])
    raise TypeError(
        f"prepare_dataset takes a datasets.Dataset, IterableDataset, DatasetDict, a list of row dicts, a dict of "
        f"columns, or a path (.jsonl/.json/.csv/.parquet file, save_to_disk folder) or Hub dataset name, got "
        f"{type(data).__name__}."
    )
