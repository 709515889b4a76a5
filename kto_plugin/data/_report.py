"""`DataReport`: what preparation did to one dataset (nothing is dropped or cut without being counted)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from ..errors import KTOPluginWarning
from ._formats import UNPAIRED

# the KTO paper's eq. 8: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3]
BALANCE_RANGE = (1.0, 4 / 3)


def duration(seconds: float) -> str:
    """``"42 s"``, ``"3.5 min"``, ``"1.2 h"``: a duration as a person reads it in a log line."""
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class DataReport:
    """What preparation did to one dataset: nothing is dropped or cut without being counted here.

    For a streamed (`IterableDataset`) input the counts grow as rows are read (in the reading process).
    """

    name: str
    format: str = UNPAIRED
    conversational: bool = False
    order: str | None = None  # paired formats: "trl" or "interleaved"
    streaming: bool = False
    rows_in: int = 0  # input rows (pairs for a paired format)
    rows_out: int = 0
    n_desirable: int = 0
    n_undesirable: int = 0
    dropped_prompt_too_long: int = 0  # keep_start: prompt alone >= max_length (no completion token would be left)
    dropped_rows: list[int] = field(default_factory=list)  # input row indices (pairs for paired) of drops, first 10
    truncated: int = 0  # rows the collator cuts to max_length
    completion_truncated: int = 0  # of those, rows that lose completion tokens
    prompt_truncated: int = 0  # prompts cut to max_prompt_length at preparation
    completion_limited: int = 0  # completions cut to max_completion_length at preparation
    prompt_boundary_mismatch: int = 0  # tokenized prompt not a prefix of prompt+completion
    balance: str | None = None  # the paper's eq. 8 advice when desirable/undesirable are out of balance
    # on_bad_row="skip" (`kto_plugin.data._bad_rows`): malformed input rows left out
    skipped_bad_rows: int = 0
    bad_rows: list[int] = field(default_factory=list)  # their input row indices (pairs for paired), first 10
    first_bad_row: str | None = None  # why the first one was refused
    # how long preparation took (None for a stream, prepared as it is read); a measurement, not what was done,
    # so two reports of the same preparation compare equal
    seconds: float | None = field(default=None, compare=False)

    def summary(self) -> str:
        kind = f"{'conversational ' if self.conversational else ''}{self.format}"
        if self.order:
            kind += f", {self.order} order"
        parts = [
            f"{self.name} ({kind}{', streaming: counts so far' if self.streaming else ''}): "
            f"{self.rows_out} rows from {self.rows_in} input rows",
            f"{self.n_desirable} desirable / {self.n_undesirable} undesirable",
        ]
        if self.dropped_prompt_too_long:
            parts.append(
                f"{self.dropped_prompt_too_long} dropped: prompt alone >= max_length, no completion token would "
                "remain (raise max_length, or set max_prompt_length or truncation_mode='keep_end')"
            )
        if self.prompt_truncated:
            parts.append(f"{self.prompt_truncated} prompts cut to max_prompt_length (their last tokens kept)")
        if self.completion_limited:
            parts.append(f"{self.completion_limited} completions cut to max_completion_length (their first tokens kept)")
        if self.truncated:
            parts.append(
                f"{self.truncated} cut to max_length by the collator ({self.completion_truncated} lose completion "
                "tokens)"
            )
        if self.prompt_boundary_mismatch:
            parts.append(
                f"{self.prompt_boundary_mismatch} with a prompt/completion token boundary that merges "
                "(completion starts where the tokenizations diverge)"
            )
        if self.balance:
            parts.append(self.balance)
        if self.skipped_bad_rows:
            parts.append(
                f"{self.skipped_bad_rows} malformed input rows skipped (on_bad_row='skip'; rows {self.bad_rows}"
                f"{', ...' if self.skipped_bad_rows > len(self.bad_rows) else ''}), the first: {self.first_bad_row}"
            )
        if self.seconds is not None:
            parts.append(f"prepared in {duration(self.seconds)}")
        return "; ".join(parts)


def store_report(reports: dict[str, DataReport], report: DataReport) -> None:
    """Keep `report` under its name. Another dataset's report already there is replaced with a warning: an eval
    set prepared under the default name "train" would otherwise pass for the training data. Preparing the same
    data again (a notebook cell run twice) gives an equal report and replaces it quietly."""
    old = reports.get(report.name)
    if old is not None and (old != report or old.streaming):
        warnings.warn(
            f"kto_plugin: prepare_dataset(name={report.name!r}) was called before with other data ({old.rows_in} "
            f"input rows, {old.n_desirable} desirable / {old.n_undesirable} undesirable; now {report.rows_in} "
            f"input rows): kto.data_reports[{report.name!r}] now describes the new one. Name each dataset, e.g. "
            "kto.prepare_dataset(eval_rows, name='eval') for an evaluation set.",
            KTOPluginWarning,
            stacklevel=3,
        )
    reports[report.name] = report


@dataclass(frozen=True)
class Advice:
    """One piece of advice: `key` identifies it (each is given once), `message` says what to change."""

    key: str
    message: str


def balance_advice(
    n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float
) -> Advice | None:
    """Eq. 8: lambda_D n_D / (lambda_U n_U) should lie in [1, 4/3]; suggests a desirable_weight if not."""
    if n_desirable == 0 or n_undesirable == 0 or undesirable_weight == 0:
        return None
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    low, high = BALANCE_RANGE
    if low <= ratio <= high:
        return None
    base = undesirable_weight * n_undesirable / n_desirable
    return Advice(
        "balance",
        f"desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = {desirable_weight} * "
        f"{n_desirable} / ({undesirable_weight} * {n_undesirable}) = {ratio:.2f}, outside the paper's [1, 4/3] "
        f"(eq. 8). Set desirable_weight in [{base * low:.2f}, {base * high:.2f}] (keeping "
        f"undesirable_weight={undesirable_weight}).",
    )
