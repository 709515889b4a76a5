"""The truncation rule: what of a (prompt, completion) row is kept under `KTOConfig.max_length`.

One function, `kept_spans`, used by the collator (which cuts each row) and by preparation (which counts, before
training, the rows the collator will cut and drops the rows that would keep no completion token):

* ``keep_start`` (TRL 1.16): the first `max_length` tokens of prompt + completion are kept;
* ``keep_end``: the completion and the end of the prompt are kept; a completion of `max_length` tokens or more
  keeps the prompt's first token and its own first `max_length - 1`.

A row whose kept completion is empty (``keep_start`` with a prompt of `max_length` tokens or more) is dropped at
preparation and counted in the data report.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def kept_spans(prompt_len: Any, completion_len: Any, max_length: int | None, mode: str) -> tuple[Any, Any, Any]:
    """``(prompt_start, prompt_stop, completion_stop)``: the row keeps ``prompt[prompt_start:prompt_stop]`` and
    ``completion[:completion_stop]``. Elementwise on integers or numpy arrays of lengths.

    >>> [int(x) for x in kept_spans(5, 4, 6, "keep_start")]
    [0, 5, 1]
    >>> [int(x) for x in kept_spans(5, 4, 6, "keep_end")]
    [3, 5, 4]
    """
    prompt_len, completion_len = np.asarray(prompt_len), np.asarray(completion_len)
    if max_length is None:
        return np.zeros_like(prompt_len), prompt_len, completion_len
    over = prompt_len + completion_len > max_length
    if mode == "keep_end":
        fits = completion_len < max_length
        start = np.where(over & fits, prompt_len + completion_len - max_length, 0)
        stop = np.where(over & ~fits, np.minimum(prompt_len, 1), prompt_len)
        return start, stop, np.where(over & ~fits, max_length - 1, completion_len)
    stop = np.where(over, np.minimum(prompt_len, max_length), prompt_len)
    return np.zeros_like(prompt_len), stop, np.where(over, np.maximum(0, max_length - prompt_len), completion_len)


def cut(prompt: list[int], completion: list[int], max_length: int | None, mode: str) -> tuple[list[int], list[int]]:
    """One row's kept prompt and completion tokens (`kept_spans` applied)."""
    if max_length is None or len(prompt) + len(completion) <= max_length:
        return prompt, completion
    start, stop, completion_stop = (int(x) for x in kept_spans(len(prompt), len(completion), max_length, mode))
    return prompt[start:stop], completion[:completion_stop]


def fate(prompt_len: np.ndarray, completion_len: np.ndarray, max_length: int | None, mode: str):
    """``(dropped, truncated, completion_truncated)`` boolean masks of rows, as the collator will cut them."""
    start, stop, completion_stop = kept_spans(prompt_len, completion_len, max_length, mode)
    dropped = completion_stop == 0
    truncated = ~dropped & ((stop - start) + completion_stop < prompt_len + completion_len)
    return dropped, truncated, ~dropped & (completion_stop < completion_len)
