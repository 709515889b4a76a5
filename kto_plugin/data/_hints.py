"""The fixes validation errors suggest, built from the values the check saw, so that following one works.

`tests/data/test_hints.py` applies each suggested fix literally (to a `datasets.Dataset`, a list of dicts and a
data file) and prepares the result.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

# columns preparation reads under their own names: renaming one to another would break the first
READ_COLUMNS = ("prompt", "completion", "label", "chosen", "rejected", "tools", "chat_template_kwargs", "images",
                "image", "row_index")
# other names data sets give the columns preparation reads
ALIASES = {
    "prompt": ("question", "instruction", "input", "query", "context"),
    "completion": ("response", "answer", "output", "reply", "generation"),
    "label": ("labels", "desirable", "is_desirable", "feedback", "thumbs_up", "rating"),
    "chosen": ("preferred", "accepted", "positive", "good"),
    "rejected": ("dispreferred", "negative", "bad"),
}
# label spellings whose meaning is clear, compared after str(value).strip().lower()
DESIRABLE = ("true", "yes", "y", "1", "1.0", "+1", "good", "desirable", "positive", "pos", "chosen", "accept",
             "accepted", "thumbs_up", "thumbsup", "up", "like", "helpful")
UNDESIRABLE = ("false", "no", "n", "0", "0.0", "-1", "-1.0", "bad", "undesirable", "negative", "neg", "rejected",
               "reject", "thumbs_down", "thumbsdown", "down", "dislike", "unhelpful")
_MAX_LISTED = 8
_FILE_SYNTAX = "(JSON: \"label\": true, without quotes; CSV: True or False)"


def closest_column(missing: str, columns: Sequence[str]) -> str | None:
    """The column most likely meant as `missing` (a close spelling, else a usual other name for it): never one
    that preparation reads under its own name."""
    candidates = [c for c in columns if c not in READ_COLUMNS]
    match = difflib.get_close_matches(missing, candidates, n=1, cutoff=0.5)
    if match:
        return match[0]
    return next((c for c in candidates if c.lower() in ALIASES.get(missing, ())), None)


def _key(value: Any) -> str:
    return str(value).strip().lower()


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def label_fix(values: Iterable[Any], list_input: bool) -> tuple[str, str]:
    """(Python fix, data-file fix) that turn the non-bool labels `values` (hashable, not None) into bools.

    Known spellings (``'True'``, ``'no'``, ``1.0``, ``0``, ...) get a lookup that raises a KeyError on any value
    it does not list, so a later row spelled otherwise fails rather than silently becoming False; two other
    numbers map the higher one to True; more numbers get a threshold at their midpoint.
    """
    seen = sorted(set(values), key=str)
    keys = sorted({_key(v) for v in seen})
    if all(k in DESIRABLE or k in UNDESIRABLE for k in keys):
        mapping = {k: k in DESIRABLE for k in keys}
        note = "a value it does not list raises a KeyError"
    elif all(_is_number(v) for v in seen) and len(keys) == 2:
        low, high = sorted(seen)
        mapping = {_key(low): False, _key(high): True}
        note = f"{high!r} as desirable; a value it does not list raises a KeyError"
    elif all(_is_number(v) for v in seen):
        threshold = (min(seen) + max(seen)) / 2
        expr = f"r['label'] >= {threshold:g}"
        file_fix = (f"In the data file write each label as true (desirable) or false (undesirable), e.g. true "
                    f"where it is >= {threshold:g} {_FILE_SYNTAX}.")
        return _python_fix(expr, list_input, f"desirable from {threshold:g} up: choose your own threshold"), file_fix
    else:
        listed = keys[:_MAX_LISTED]
        mapping = {k: k not in UNDESIRABLE for k in listed}
        note = "set True for the values that mean desirable; a value it does not list raises a KeyError"
    # bools pass through unchanged ('true'/'false'): a list may mix them with the values seen
    mapping = {**mapping, "true": True, "false": False}
    expr = "{" + ", ".join(f"{k!r}: {v}" for k, v in mapping.items()) + "}[str(r['label']).strip().lower()]"
    arrows = ", ".join(f"{v!r} -> {str(mapping[_key(v)]).lower()}" for v in seen[:_MAX_LISTED] if _key(v) in mapping)
    file_fix = f"In the data file write each label as true (desirable) or false (undesirable): {arrows} {_FILE_SYNTAX}."
    return _python_fix(expr, list_input, note), file_fix


def _python_fix(expr: str, list_input: bool, note: str) -> str:
    if list_input:
        return f"Convert the labels ({note}): rows = [{{**r, 'label': {expr}}} for r in rows]"
    # a new column, not {'label': ...}: `map` keeps a numeric column's type and would turn the bools back into numbers
    return (f"Convert the labels ({note}): dataset = dataset.map(lambda r: {{'_label': {expr}}}, "
            "remove_columns='label').rename_column('_label', 'label')")
