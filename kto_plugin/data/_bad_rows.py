"""Malformed input rows (`KTOConfig.on_bad_row`): stop with the row named, or skip and count them.

A malformed row is one that `prepare_batch` refuses with a `ValueError` naming it (a None or empty text, a label
that is not a bool, plain and conversational rows mixed, a completion with no token after the prompt, an
implicit-prompt pair with nothing shared). A streamed dataset is prepared as the Trainer reads it, so such a row
can be met hours into a run:

* ``"raise"`` (default): the error names the dataset and the row; for a stream it adds where the row was read
  and how to go on. The last checkpoint written before it is complete (the Trainer saves between steps, and the
  row is read while fetching the next batch), so the run can resume from it with ``on_bad_row="skip"``.
* ``"skip"``: the rows are left out and counted in the dataset's `DataReport` (``skipped_bad_rows``, the first 10
  row indices in ``bad_rows``, the first reason in ``first_bad_row``) and logged; nothing else changes: the other
  rows of the batch are prepared as without the bad ones.

Finding the bad rows costs one `prepare_batch` per row, only in a batch that holds one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ._report import DataReport
from ._tokenize import prepare_batch

logger = logging.getLogger("kto_plugin")

BAD_ROWS_KEPT = 10  # row indices kept in the report


def prepare_skipping(batch: Mapping[str, list], indices: list[int], **kwargs: Any) -> tuple[dict[str, list], list]:
    """`prepare_batch` over the batch's well-formed rows, and ``(row index, error message)`` of each malformed
    one. ``_src`` in the result indexes `batch` (as from `prepare_batch` over the whole batch)."""
    try:
        return prepare_batch(batch, indices, **kwargs), []
    except ValueError:
        pass  # at least one bad row: find them one by one
    good, bad = [], []
    for j, row in enumerate(indices):
        try:
            prepare_batch({c: v[j : j + 1] for c, v in batch.items()}, [row], **kwargs)
        except ValueError as err:
            bad.append((row, str(err)))
        else:
            good.append(j)
    # a batch-level error no single row has is raised here again, not taken for a bad row
    out = prepare_batch({c: [v[j] for j in good] for c, v in batch.items()}, [indices[j] for j in good], **kwargs)
    out["_src"] = [good[s] for s in out["_src"]]
    return out, bad


def count_skipped(report: DataReport, rows: Sequence[int], reason: str) -> None:
    """Add the skipped `rows` (input row indices) to `report` and log them; `reason`: why the first was refused."""
    if not rows:
        return
    report.skipped_bad_rows += len(rows)
    report.bad_rows = (report.bad_rows + [int(r) for r in rows])[:BAD_ROWS_KEPT]
    if report.first_bad_row is None:
        report.first_bad_row = reason
    logger.warning(
        "kto_plugin: %s dataset: skipped %d malformed row(s) (on_bad_row='skip'), e.g. %s; totals in "
        "kto.data_reports[%r]", report.name, len(rows), reason, report.name,
    )


def stream_hint(name: str) -> str:
    """What to add to a malformed row's error when the row came from a stream, read during training."""
    return (
        f"(This row was read from the streamed {name} dataset while training: rows are numbered from the start of "
        "the stream. Checkpoints saved before it are complete. To leave such rows out and count them in "
        f"kto.data_reports[{name!r}], set KTOConfig(on_bad_row='skip') and resume from the last checkpoint.)"
    )
