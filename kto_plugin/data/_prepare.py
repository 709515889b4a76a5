"""Dataset preparation: every preference format (see `kto_plugin.data._formats`) to KTO token ids.

The ids are exactly those TRL 1.16's `KTOTrainer` puts in its `train_dataset` for the same tokenizer:

* paired rows become two unpaired rows (chosen -> True, rejected -> False); an implicit prompt is the shared
  start of chosen and rejected (TRL's `extract_prompt`);
* plain text: the tokenizer's EOS is appended to the completion text unless it already ends with it; prompt and
  prompt+completion are tokenized with the tokenizer's special tokens (so a BOS is added where the tokenizer adds
  one), and the completion is what follows the longest common prefix of the two;
* conversational (lists of ``{"role", "content"}`` messages): the prompt is rendered with the chat template and
  ``add_generation_prompt=True``, prompt+completion without, both tokenized without extra special tokens; a
  ``tools`` column (list or JSON string) and a ``chat_template_kwargs`` column are passed to the template;
* with ``truncation_mode="keep_start"`` (TRL's) rows whose prompt alone reaches `max_length` are dropped (they
  would keep no completion token); the collator cuts the rest. ``keep_end`` drops nothing.

Validation, unpairing and tokenization are one batched `datasets.map` over the input: a fast tokenizer encodes a
thousand rows per call, each pair's prompt is tokenized once (and, for byte-level BPE tokenizers, not again
with its completions: `kto_plugin.data._encoding`), and the result is cached by the input's
fingerprint (when the input lives in Arrow files), so preparing the same data again does no work.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc

from ..errors import KTOPluginWarning
from ._bad_rows import count_skipped, prepare_skipping, stream_hint
from ._encoding import can_splice
from ._formats import CONSUMED, TEXT_COLUMNS, UNPAIRED, check_rows, detect_format, is_conversational
from ._tokenize import prepare_batch, prepare_table
from ._report import DataReport, balance_advice
from ._truncation import fate
from ._vision import check_images, count_cut_rows

logger = logging.getLogger("kto_plugin")

TOKEN_COLUMNS = ("prompt_ids", "completion_ids", "label")

# TRL unpairs with `datasets.map(batched=True)` at its default batch of 1000 pairs: the chosen rows of each
# block of 1000 pairs, then their rejected rows.
TRL_UNPAIR_BLOCK = 1000
_MAP_BATCH = 1000
_STATS = ("_mismatch", "_prompt_cut", "_completion_cut", "_row")
# the input row's position (a pair's, for paired rows), kept through drops: names rows in non-finite reports
# (`kto_plugin.step._nonfinite`); a `row_index` column of the user's own is kept instead
ROW_INDEX = "row_index"


def _trl_order(n_rows: int) -> np.ndarray:
    """Positions of TRL's unpaired order in our (chosen, rejected)-per-pair output of `n_rows` rows."""
    pairs = n_rows // 2
    parts = []
    for start in range(0, pairs, TRL_UNPAIR_BLOCK):
        block = np.arange(start, min(start + TRL_UNPAIR_BLOCK, pairs))
        parts += [2 * block, 2 * block + 1]
    return np.concatenate(parts) if parts else np.arange(0)


class Preparer:
    """Prepares splits for one tokenizer and `KTOConfig`; `__call__` takes one split (map-style or streamed)."""

    def __init__(self, tokenizer: Any, config: Any, processor: Any = None) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.processor = processor  # a vision-language model's processor (`kto_plugin.data._vision`), or None

    def _check(self, fmt: str, conversational: bool, name: str) -> None:
        tok = self.tokenizer
        if conversational and getattr(tok, "chat_template", None) is None:
            raise ValueError(
                f"{name} dataset is conversational (lists of {{'role', 'content'}} messages) but the tokenizer has "
                "no chat template to render them. Set one before preparing: tokenizer.chat_template = "
                "AutoTokenizer.from_pretrained('<the instruct model you start from>').chat_template, or a Jinja "
                "string of your own (see transformers' chat templating docs); or pass plain-text rows."
            )
        if not conversational and tok.eos_token is None:
            raise ValueError(
                f"{name} dataset is plain text and the tokenizer has no eos_token: KTO appends EOS to plain-text "
                "completions so the model learns to stop. Set one: tokenizer.eos_token = '</s>' (the token your "
                "model ends sequences with)."
            )

    def _fn_kwargs(self, fmt: str, conversational: bool, name: str, chosen_first: bool) -> dict[str, Any]:
        return {
            "tokenizer": self.tokenizer,
            "fmt": fmt,
            "conversational": conversational,
            "name": name,
            "max_prompt_length": self.config.max_prompt_length,
            "chosen_first": chosen_first,
            "splice": can_splice(self.tokenizer),
            "max_completion_length": self.config.max_completion_length,
            "separate": bool(self.config.is_encoder_decoder),
        }

    def __call__(self, dataset: Any, name: str) -> tuple[Any, DataReport]:
        if isinstance(dataset, datasets.IterableDataset):
            return self._stream(dataset, name)
        if check_images(dataset.column_names, name, self.processor, self.config):
            return self._vision(dataset, name)
        fmt = detect_format(dataset.column_names, name)
        if len(dataset) == 0:
            raise ValueError(f"{name} dataset is empty: there are no rows to train on.")
        conversational = is_conversational(dataset[0][TEXT_COLUMNS[fmt][0]])
        self._check(fmt, conversational, name)
        paired = fmt != UNPAIRED
        report = DataReport(name=name, format=fmt, conversational=conversational, rows_in=len(dataset),
                            order=self.config.paired_order if paired else None)
        fn_kwargs = self._fn_kwargs(fmt, conversational, name, chosen_first=False)
        skip_bad_rows = {"prepare": prepare_skipping} if self.config.on_bad_row == "skip" else {}
        tokenized = dataset.with_format("arrow").map(
            prepare_table,
            batched=True,
            batch_size=_MAP_BATCH,
            with_indices=True,
            num_proc=self.config.dataset_num_proc,
            fn_kwargs={**fn_kwargs, **skip_bad_rows},
            remove_columns=[c for c in dataset.column_names if c in CONSUMED or c == "label"],
            desc=f"Preparing {name} dataset",
        ).with_format(None)
        table = tokenized.data
        prompt_len = pc.list_value_length(table.column("prompt_ids")).to_numpy(zero_copy_only=False)
        completion_len = pc.list_value_length(table.column("completion_ids")).to_numpy(zero_copy_only=False)
        labels = table.column("label").to_numpy(zero_copy_only=False).astype(bool)
        report.prompt_boundary_mismatch = int(pc.sum(table.column("_mismatch")).as_py() or 0)
        report.prompt_truncated = int(pc.sum(table.column("_prompt_cut")).as_py() or 0)
        report.completion_limited = int(pc.sum(table.column("_completion_cut")).as_py() or 0)
        source_rows = table.column("_row").to_numpy()
        if skip_bad_rows:
            self._count_skipped_rows(report, dataset, source_rows, fn_kwargs)
        if ROW_INDEX in tokenized.column_names:
            tokenized = tokenized.remove_columns(list(_STATS))
        else:
            tokenized = tokenized.remove_columns([c for c in _STATS if c != "_row"]).rename_column("_row", ROW_INDEX)
        dropped, truncated, completion_cut = fate(
            prompt_len, completion_len, self.config.max_length, self.config.truncation_mode
        )
        order = _trl_order(len(labels)) if paired and self.config.paired_order == "trl" else np.arange(len(labels))
        keep = order[~dropped[order]]
        if len(keep) == 0:
            raise ValueError(
                f"{name} dataset: every row's prompt is at least max_length={self.config.max_length} tokens, so no "
                "row is left. Raise max_length, or set max_prompt_length, or truncation_mode='keep_end' (keeps the "
                "end of the prompt and the completion)."
            )
        if len(keep) != len(labels) or not np.array_equal(keep, np.arange(len(labels))):
            tokenized = tokenized.select(keep)
        report.dropped_prompt_too_long = int(dropped.sum())
        report.dropped_rows = [int(i) for i in np.unique(source_rows[dropped])[:10]]
        report.truncated = int(truncated.sum())
        report.completion_truncated = int(completion_cut.sum())
        report.rows_out = len(keep)
        report.n_desirable = int(labels[keep].sum())
        report.n_undesirable = report.rows_out - report.n_desirable
        self._judge_balance(report)
        return tokenized, report

    def _count_skipped_rows(self, report: DataReport, dataset: datasets.Dataset, source_rows: np.ndarray,
                            fn_kwargs: dict[str, Any]) -> None:
        """on_bad_row="skip", map-style: the input rows missing from the prepared ones were skipped (the map may
        run in other processes, or come from the cache); the first is prepared again for its reason."""
        present = np.zeros(len(dataset), dtype=bool)
        present[source_rows] = True
        skipped = np.flatnonzero(~present)
        if not skipped.size:
            return
        first = int(skipped[0])
        _, bad = prepare_skipping(dataset.with_format(None)[first : first + 1], [first], **fn_kwargs)
        count_skipped(report, skipped.tolist(), bad[0][1] if bad else "(not reproduced)")
        if skipped.size == len(dataset):
            raise ValueError(
                f"{report.name} dataset: every one of its {len(dataset)} rows is malformed, so on_bad_row='skip' left "
                f"none; the first: {report.first_bad_row}"
            )

    def _judge_balance(self, report: DataReport) -> None:
        for count, kind, other in ((report.n_desirable, "desirable", "undesirable"),
                                   (report.n_undesirable, "undesirable", "desirable")):
            if count == report.rows_out and self.config.warn_guidance:
                warnings.warn(
                    f"kto_plugin: the {report.name} dataset has only {kind} rows ({count}). KTO still runs (each "
                    f"example is judged against the reference point z0), but with no {other} examples it only "
                    f"pushes one way; the paper's results use both. Add {other} examples if you have them.",
                    KTOPluginWarning,
                    stacklevel=4,
                )
        advice = balance_advice(report.n_desirable, report.n_undesirable, self.config.desirable_weight,
                                self.config.undesirable_weight)
        report.balance = advice.message if advice is not None else None

    def _vision(self, dataset: datasets.Dataset, name: str) -> tuple[Any, DataReport]:
        """Rows with images stay raw (the collator processes them per batch); checked and counted here."""
        if len(dataset) == 0:
            raise ValueError(f"{name} dataset is empty: there are no rows to train on.")
        conversational = is_conversational(dataset[0]["prompt"])
        text = dataset.select_columns(["prompt", "completion", "label"])[:]  # the images are not decoded
        check_rows(text, range(len(dataset)), UNPAIRED, conversational, name)
        n_desirable = int(sum(dataset["label"]))
        report = DataReport(name=name, conversational=conversational, rows_in=len(dataset), rows_out=len(dataset),
                            n_desirable=n_desirable, n_undesirable=len(dataset) - n_desirable)
        report.truncated = report.completion_truncated = count_cut_rows(
            dataset, self.processor, self.config.max_length, name
        )
        return dataset, report

    def _stream(self, dataset: datasets.IterableDataset, name: str) -> tuple[Any, DataReport]:
        first = next(iter(dataset), None)  # reads one row; the rest is prepared as it is read
        if first is None:
            raise ValueError(f"{name} dataset is an empty stream: there are no rows to train on.")
        columns = list(dataset.column_names or first)
        if check_images(columns, name, self.processor, self.config):
            report = DataReport(name=name, streaming=True, conversational=is_conversational(first["prompt"]))
            counter = _VisionStreamCounter(report)
            return dataset.map(counter, batched=True, batch_size=TRL_UNPAIR_BLOCK, with_indices=True), report
        fmt = detect_format(columns, name)
        conversational = is_conversational(first[TEXT_COLUMNS[fmt][0]])
        self._check(fmt, conversational, name)
        paired = fmt != UNPAIRED
        order = self.config.paired_order if paired else None
        report = DataReport(name=name, format=fmt, conversational=conversational, order=order, streaming=True)
        counter = _StreamCounter(report, self._fn_kwargs(fmt, conversational, name, chosen_first=order == "trl"),
                                 self.config.max_length, self.config.truncation_mode, self.config.on_bad_row)
        # batches of 1000 pairs from the start of the stream, so "trl" order is TRL's on a stream too
        prepared = dataset.map(counter, batched=True, batch_size=TRL_UNPAIR_BLOCK, with_indices=True,
                               remove_columns=[c for c in columns if c in CONSUMED or c == "label"])
        return prepared, report


class _StreamCounter:
    """Prepares a streamed batch, drops what `_fate` drops and counts everything in the report."""

    def __init__(self, report: DataReport, fn_kwargs: dict[str, Any], max_length: int | None, mode: str,
                 on_bad_row: str = "raise") -> None:
        self.report, self.fn_kwargs, self.max_length, self.mode = report, fn_kwargs, max_length, mode
        self.on_bad_row = on_bad_row

    def __call__(self, batch: Mapping[str, list], indices: list[int]) -> dict[str, list]:
        out = self._prepare(batch, indices)
        src = out.pop("_src")
        out.update({c: [batch[c][i] for i in src] for c in batch if c not in CONSUMED and c != "label"})
        prompt_len = np.array([len(p) for p in out["prompt_ids"]], dtype=np.int64)
        completion_len = np.array([len(c) for c in out["completion_ids"]], dtype=np.int64)
        dropped, truncated, completion_cut = fate(prompt_len, completion_len, self.max_length, self.mode)
        r = self.report
        if dropped.any() and len(r.dropped_rows) < 10:
            rows = sorted({out["_row"][j] for j in np.flatnonzero(dropped)})
            r.dropped_rows = (r.dropped_rows + rows)[:10]
            logger.warning("kto_plugin: %s stream: %d rows dropped in this batch (prompt alone >= max_length=%s); "
                           "totals in kto.data_reports[%r]", r.name, int(dropped.sum()), self.max_length, r.name)
        r.rows_in += len(indices)
        r.dropped_prompt_too_long += int(dropped.sum())
        r.truncated += int(truncated.sum())
        r.completion_truncated += int(completion_cut.sum())
        r.prompt_boundary_mismatch += sum(out["_mismatch"])
        r.prompt_truncated += sum(out["_prompt_cut"])
        r.completion_limited += sum(out["_completion_cut"])
        keep = np.flatnonzero(~dropped)
        desirable = sum(1 for j in keep if out["label"][j])
        r.n_desirable += desirable
        r.n_undesirable += len(keep) - desirable
        r.rows_out += len(keep)
        if ROW_INDEX not in out:
            out[ROW_INDEX] = out["_row"]
        return {k: [v[j] for j in keep] for k, v in out.items() if k not in _STATS}

    def _prepare(self, batch: Mapping[str, list], indices: list[int]) -> dict[str, list]:
        """`prepare_batch`, with `KTOConfig.on_bad_row` applied (`kto_plugin.data._bad_rows`)."""
        if self.on_bad_row == "skip":
            out, bad = prepare_skipping(batch, indices, **self.fn_kwargs)
            count_skipped(self.report, [row for row, _ in bad], bad[0][1] if bad else "")
            return out
        try:
            return prepare_batch(batch, indices, **self.fn_kwargs)
        except ValueError as err:  # read during training: say where the row came from and how to go on
            raise ValueError(f"{err} {stream_hint(self.report.name)}") from None


class _VisionStreamCounter:
    """Checks streamed image rows as `Preparer._vision` checks map-style ones, and counts them as they are read;
    the rows pass unchanged (the collator processes their images)."""

    def __init__(self, report: DataReport) -> None:
        self.report = report

    def __call__(self, batch: Mapping[str, list], indices: list[int]) -> dict[str, list]:
        r = self.report
        check_rows(batch, indices, UNPAIRED, r.conversational, r.name)
        desirable = sum(1 for label in batch["label"] if label)
        r.rows_in += len(indices)
        r.rows_out += len(indices)
        r.n_desirable += desirable
        r.n_undesirable += len(indices) - desirable
        return {}
