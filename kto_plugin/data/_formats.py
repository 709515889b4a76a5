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

import difflib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import datasets

from ._encoding import common_prefix_length
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


def _closest(name: str, options: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""


def detect_format(column_names: Sequence[str], name: str) -> str:
    """The format of a dataset with these columns; a clear error (with the closest column) when none fits."""
    cols = list(column_names)
    has = set(cols)
    if {"chosen", "rejected"} <= has:
        return PAIRED if "prompt" in has else IMPLICIT
    if set(COLUMNS[UNPAIRED]) <= has:
        return UNPAIRED
    near = lambda c: bool(difflib.get_close_matches(c, cols, n=1, cutoff=0.5))  # noqa: E731
    paired_intent = ("chosen" in has or "rejected" in has) or (
        "completion" not in has and "label" not in has and (near("chosen") or near("rejected"))
    )
    wanted = ("chosen", "rejected") if paired_intent else COLUMNS[UNPAIRED]
    missing = next(c for c in wanted if c not in has)
    rename = ""
    match = difflib.get_close_matches(missing, cols, n=1, cutoff=0.5)
    if match:
        rename = f" Rename it: dataset.rename_column({match[0]!r}, {missing!r})."
    raise ValueError(
        f"{name} dataset has no {missing!r} column (columns: {cols}).{_closest(missing, cols)}{rename} "
        f"{_SHAPES}."
    )


def check_rows(batch: Mapping[str, list], indices: Sequence[int], fmt: str, conversational: bool, name: str) -> None:
    """Raise for the first bad row of a batch: wrong label type, None/empty text, mixed plain/conversational."""
    kind = "conversational (lists of {'role', 'content'} messages)" if conversational else "plain text (strings)"
    if fmt == UNPAIRED:
        for row, label in zip(indices, batch["label"]):
            if isinstance(label, bool):
                continue
            hint = ""
            if isinstance(label, (list, tuple)):
                hint = (f" It holds {len(label)} values: a row takes one label (a dict of lists is a batch, "
                        "not a row: pass datasets.Dataset.from_dict(columns) or a list of row dicts).")
            raise ValueError(
                f"{name} dataset, row {row}: 'label' is {label!r} ({type(label).__name__}); it must be a bool "
                f"(True = desirable, False = undesirable).{hint} Convert it, e.g. "
                "dataset.map(lambda r: {'label': r['label'] in ('yes', 'true', 1)})."
            )
    for column in TEXT_COLUMNS[fmt]:
        for row, value in zip(indices, batch[column]):
            if value is None or (isinstance(value, (str, list)) and len(value) == 0):
                raise ValueError(
                    f"{name} dataset, row {row}: {column!r} is {value!r}. Every row needs a non-empty "
                    f"{' and '.join(repr(c) for c in TEXT_COLUMNS[fmt])}: filter such rows out first, e.g. "
                    f"dataset.filter(lambda r: bool(r[{column!r}]))."
                )
            if isinstance(value, list) and not is_conversational(value):
                got = type(value[0]).__name__
                raise ValueError(
                    f"{name} dataset, row {row}: {column!r} is a list of {got}, not a string or a list of "
                    "{'role', 'content'} messages. Join it into one string, or write it as messages, e.g. "
                    "[{'role': 'assistant', 'content': ...}]."
                )
            if not isinstance(value, (str, list)) or is_conversational(value) != conversational:
                got = "conversational" if is_conversational(value) else type(value).__name__
                raise ValueError(
                    f"{name} dataset, row {row}: {column!r} is {got} but row 0 is {kind}. Use one format for all "
                    "rows and columns: strings everywhere, or lists of {'role', 'content'} messages everywhere."
                )


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
        fmt = detect_format(list(data[0]), name)
        check_columns_of_rows(data, fmt, name)
        first = data[0][TEXT_COLUMNS[fmt][0]]
        check_rows({c: [row[c] for row in data] for c in COLUMNS[fmt]}, range(len(data)), fmt,
                   is_conversational(first), name)
        return datasets.Dataset.from_list([dict(row) for row in data])
    raise TypeError(
        f"prepare_dataset takes a datasets.Dataset, IterableDataset, DatasetDict, a list of row dicts, a dict of "
        f"columns, or a path (.jsonl/.json/.csv/.parquet file, save_to_disk folder) or Hub dataset name, got "
        f"{type(data).__name__}."
    )
