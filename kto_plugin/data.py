"""Dataset preparation: every preference format (see `kto_plugin.data_formats`) to KTO token ids.

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
with its completions: `kto_plugin.encoding`), and the result is cached by the input's
fingerprint (when the input lives in Arrow files), so preparing the same data again does no work.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .data_formats import (  # noqa: F401  (as_dataset, is_conversational: re-exported)
    CONSUMED,
    IMPLICIT,
    TEXT_COLUMNS,
    UNPAIRED,
    as_dataset,
    check_rows,
    detect_format,
    extract_prompt,
    is_conversational,
)
from .encoding import can_splice, common_prefix_length, encode
from .guidance import balance_advice
from .vision import image_column, layout
from .warnings import KTOPluginWarning

logger = logging.getLogger("kto_plugin")

TOKEN_COLUMNS = ("prompt_ids", "completion_ids", "label")

# TRL unpairs with `datasets.map(batched=True)` at its default batch of 1000 pairs: the chosen rows of each
# block of 1000 pairs, then their rejected rows.
TRL_UNPAIR_BLOCK = 1000
_MAP_BATCH = 1000
_STATS = ("_mismatch", "_prompt_cut", "_completion_cut", "_row")
# the input row's position (a pair's, for paired rows), kept through drops: names rows in non-finite reports
# (`kto_plugin.nonfinite`); a `row_index` column of the user's own is kept instead
ROW_INDEX = "row_index"


def check_images(column_names: Sequence[str], name: str, processor: Any, config: Any) -> bool:
    """Whether the rows carry images (``images`` or ``image``). Refuses them without a processor, in a paired
    format, with ``truncation_mode="keep_end"``, ``max_prompt_length``/``max_completion_length`` and with
    precomputed reference log-probs (what TRL 1.16 refuses, or what cannot apply to raw image rows)."""
    column = image_column(column_names)
    if column is None:
        return False
    if processor is None:
        raise ValueError(
            f"{name} dataset has an image column {column!r}, but KTOPlugin was given a tokenizer, not a processor: "
            "pass the vision-language model's processor, KTOPlugin(config, tokenizer=processor). To train on the "
            f"text alone, drop the column first: dataset.remove_columns({column!r})."
        )
    if detect_format(column_names, name) != UNPAIRED:
        raise ValueError(
            f"{name} dataset has images in a paired format: vision rows must be unpaired ({{prompt, completion, "
            "label}} with images), as in TRL 1.16. Unpair first, e.g. trl.data_utils.unpair_preference_dataset."
        )
    limits = [f for f in ("max_prompt_length", "max_completion_length") if getattr(config, f) is not None]
    if limits:
        raise ValueError(
            f"{name} dataset has images: KTOConfig.{limits[0]} cuts tokenized rows at prepare_dataset, but vision "
            "rows are tokenized with their images batch by batch in the collator. Bound the rows with max_length."
        )
    if config.truncation_mode == "keep_end":
        raise ValueError(
            f"{name} dataset has images: KTOConfig(truncation_mode='keep_end') would cut the start of long prompts, "
            "where the image tokens are. Use truncation_mode='keep_start' (as TRL 1.16 does for vision rows)."
        )
    if config.precompute_ref_log_probs:
        raise ValueError(
            f"{name} dataset has images: KTOConfig(precompute_ref_log_probs=True) is not supported for vision rows "
            "(images are processed batch by batch, as in TRL 1.16). Set precompute_ref_log_probs=False."
        )
    return True


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
        return "; ".join(parts)


def _render(tokenizer: Any, messages: list, tools: Any, extra: Mapping | None, generation: bool) -> str:
    kwargs = {"tools": tools, "tokenize": False, **(extra or {})}
    if generation:
        kwargs["add_generation_prompt"] = True
    return tokenizer.apply_chat_template(messages, **kwargs)


def _prepare_batch(
    batch: Mapping[str, list],
    indices: list[int],
    *,
    tokenizer: Any,
    fmt: str,
    conversational: bool,
    name: str,
    max_prompt_length: int | None,
    chosen_first: bool,
    splice: bool = False,
    max_completion_length: int | None = None,
    separate: bool = False,
) -> dict[str, list]:
    """Validate, unpair and tokenize a batch of input rows; one output row per completion, with `_src`, the
    position in `batch` of the row it came from (other columns are carried by the caller).

    Paired rows come out as (chosen, rejected) per pair, or with `chosen_first` all chosen rows of the batch
    first (TRL's order for a batch of 1000 aligned pairs). `max_completion_length` keeps a completion's first
    tokens (the documented KTOTrainer meaning). `separate` (encoder-decoder models): prompt and completion are
    tokenized as separate sequences, each with the tokenizer's special tokens.
    """
    check_rows(batch, indices, fmt, conversational, name)
    if fmt == UNPAIRED:
        prompts = list(batch["prompt"])
        completions = [[c] for c in batch["completion"]]
        labels = [[bool(x)] for x in batch["label"]]
    else:
        if fmt == IMPLICIT:
            prompts, completions = [], []
            for row, chosen, rejected in zip(indices, batch["chosen"], batch["rejected"]):
                prompt, good, bad = extract_prompt(chosen, rejected)
                if len(prompt) == 0:
                    raise ValueError(
                        f"{name} dataset, row {row}: 'chosen' and 'rejected' share no common start, so the implicit "
                        "prompt is empty. Give these rows a 'prompt' column ({'prompt', 'chosen', 'rejected'}), or "
                        "filter them out."
                    )
                prompts.append(prompt)
                completions.append([good, bad])
        else:
            prompts = list(batch["prompt"])
            completions = [[c, r] for c, r in zip(batch["chosen"], batch["rejected"])]
        labels = [[True, False] for _ in prompts]

    if conversational:
        tools_column = batch.get("tools")
        kwargs_column = batch.get("chat_template_kwargs")
        prompt_texts, full_texts = [], []
        for i, (prompt, comps) in enumerate(zip(prompts, completions)):
            tools = tools_column[i] if tools_column is not None else None
            if isinstance(tools, str):
                import json

                tools = json.loads(tools)
            extra = kwargs_column[i] if kwargs_column is not None else None
            prompt_texts.append(_render(tokenizer, prompt, tools, extra, generation=True))
            full_texts.append([_render(tokenizer, prompt + c, tools, extra, generation=False) for c in comps])
        special = False
    else:
        eos = tokenizer.eos_token
        prompt_texts = prompts
        full_texts = [[p + (c if c.endswith(eos) else c + eos) for c in comps] for p, comps in zip(prompts, completions)]
        special = True
    if separate and special:
        prompt_ids, full_ids, prefixes = _encode_separately(tokenizer, prompt_texts, completions)
    else:
        prompt_ids, full_ids, prefixes = encode(tokenizer, prompt_texts, full_texts, special, splice)
    full_ids, prefixes = iter(full_ids), iter(prefixes)

    bos = tokenizer.bos_token_id
    out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "label": [], "_mismatch": [], "_prompt_cut": [],
                            "_completion_cut": [], "_src": [], "_row": []}
    for i, (p_ids, row_labels) in enumerate(zip(prompt_ids, labels)):
        for label in row_labels:
            f_ids = next(full_ids)
            n = next(prefixes)
            if n is None:
                n = common_prefix_length(p_ids, f_ids)
            completion = f_ids[n:]
            if not completion:
                column = "completion" if fmt == UNPAIRED else ("chosen" if label else "rejected")
                raise ValueError(
                    f"{name} dataset, row {indices[i]}: {column!r} has no tokens after the prompt (the chat template "
                    "renders nothing for it, or its text merges into the prompt's last token). Give it content, "
                    "or filter the row out."
                )
            completion_cut = max_completion_length is not None and len(completion) > max_completion_length
            if completion_cut:
                completion = completion[:max_completion_length]
            prompt = f_ids[:n]
            cut = max_prompt_length is not None and len(prompt) > max_prompt_length
            if cut:
                # keep the end of the prompt (the turns nearest the completion), and a leading BOS if there is one
                head = prompt[:1] if prompt[0] == bos else []
                prompt = head + prompt[len(prompt) - max_prompt_length + len(head) :]
            out["prompt_ids"].append(prompt)
            out["completion_ids"].append(completion)
            out["label"].append(label)
            out["_mismatch"].append(n < len(p_ids))
            out["_prompt_cut"].append(cut)
            out["_completion_cut"].append(completion_cut)
            out["_src"].append(i)
            out["_row"].append(indices[i])
    if chosen_first and fmt != UNPAIRED:
        order = list(range(0, len(out["label"]), 2)) + list(range(1, len(out["label"]), 2))
        out = {k: [v[j] for j in order] for k, v in out.items()}
    return out


_IDS = pa.list_(pa.int64())


def _encode_separately(
    tokenizer: Any, prompt_texts: list[str], completions: list[list[str]]
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Encoder-decoder: prompt and each completion tokenized apart, with special tokens (a T5 tokenizer appends
    EOS to both); each completion keeps exactly one EOS at its end. Returns `encode`'s triple, with the
    prompt+completion ids and the prompt length as prefix."""
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    prompt_ids = tokenizer(list(prompt_texts))["input_ids"]
    flat = [c.removesuffix(eos) for comps in completions for c in comps]
    completion_ids = iter(tokenizer(flat)["input_ids"] if flat else [])
    full_ids, prefixes = [], []
    for p_ids, comps in zip(prompt_ids, completions):
        for _ in comps:
            c_ids = next(completion_ids)
            c_ids = c_ids if c_ids and c_ids[-1] == eos_id else c_ids + [eos_id]
            full_ids.append(p_ids + c_ids)
            prefixes.append(len(p_ids))
    return prompt_ids, full_ids, prefixes


def _prepare_table(table: pa.Table, indices: list[int], **kwargs: Any) -> pa.Table:
    """`_prepare_batch` from and to Arrow: token ids converted in C, other columns carried with their types."""
    batch = {c: table.column(c).to_pylist() for c in table.column_names if c in CONSUMED or c == "label"}
    out = _prepare_batch(batch, indices, **kwargs)
    src = pa.array(out.pop("_src"), type=pa.int64())
    columns = {key: pa.array(out[key], type=_IDS) for key in ("prompt_ids", "completion_ids")}
    columns.update({key: pa.array(out[key], type=pa.bool_())
                    for key in ("label", "_mismatch", "_prompt_cut", "_completion_cut")})
    columns["_row"] = pa.array(out["_row"], type=pa.int64())
    for c in table.column_names:
        if c not in CONSUMED and c != "label":
            columns[c] = table.column(c).take(src)
    return pa.table(columns)


def _fate(prompt_len: np.ndarray, completion_len: np.ndarray, max_length: int | None, mode: str):
    """(dropped, truncated, completion truncated) masks, as the collator will cut (see `KTOCollator._join`)."""
    none = np.zeros(len(prompt_len), dtype=bool)
    if max_length is None:
        return none, none, none
    total = prompt_len + completion_len
    if mode == "keep_end":
        truncated = total > max_length
        # the collator keeps the prompt's first token and the completion's first max_length - 1 (a row that
        # fits, e.g. a completion of exactly max_length with an empty prompt, is not cut at all)
        return none, truncated, truncated & (completion_len >= max_length)
    dropped = prompt_len >= max_length
    truncated = ~dropped & (total > max_length)
    return dropped, truncated, truncated


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
        self.processor = processor  # a vision-language model's processor (`kto_plugin.vision`), or None

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
        tokenized = dataset.with_format("arrow").map(
            _prepare_table,
            batched=True,
            batch_size=_MAP_BATCH,
            with_indices=True,
            num_proc=self.config.dataset_num_proc,
            fn_kwargs=self._fn_kwargs(fmt, conversational, name, chosen_first=False),
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
        if ROW_INDEX in tokenized.column_names:
            tokenized = tokenized.remove_columns(list(_STATS))
        else:
            tokenized = tokenized.remove_columns([c for c in _STATS if c != "_row"]).rename_column("_row", ROW_INDEX)
        dropped, truncated, completion_cut = _fate(
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
        self._check_image_tokens(dataset, report)
        return dataset, report

    def _check_image_tokens(self, dataset: datasets.Dataset, report: DataReport, batch: int = 64) -> None:
        """Refuses a `max_length` that the collator's keep-start cut would place inside a row's image tokens (the
        model would then get image features without their tokens), and counts in `report` the rows the collator
        will cut. Processes the rows' images once."""
        max_length, name = self.config.max_length, report.name
        if max_length is None:
            return
        column = image_column(dataset.column_names)
        for start in range(0, len(dataset), batch):
            rows = dataset.select(range(start, min(start + batch, len(dataset))))
            prompt_lens, ends, completion_lens = layout(self.processor, list(rows), column)
            for i, end in enumerate(ends or []):
                if end > max_length:
                    raise ValueError(
                        f"{name} dataset, row {start + i}: its prompt's image tokens end at token {end}, past "
                        f"max_length={max_length}, so the collator's cut would keep only part of the image. Raise "
                        f"KTOConfig(max_length=...) above {end} (room for the completion too), or make the images "
                        "smaller (fewer image tokens), or filter the row out."
                    )
            # keep-start, as the collator cuts; nothing is dropped (as TRL 1.16's vision collator)
            cut = (np.array(prompt_lens) + np.array(completion_lens)) > max_length
            report.truncated += int(cut.sum())
            report.completion_truncated += int(cut.sum())

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
                                 self.config.max_length, self.config.truncation_mode)
        # batches of 1000 pairs from the start of the stream, so "trl" order is TRL's on a stream too
        prepared = dataset.map(counter, batched=True, batch_size=TRL_UNPAIR_BLOCK, with_indices=True,
                               remove_columns=[c for c in columns if c in CONSUMED or c == "label"])
        return prepared, report


class _StreamCounter:
    """Prepares a streamed batch, drops what `_fate` drops and counts everything in the report."""

    def __init__(self, report: DataReport, fn_kwargs: dict[str, Any], max_length: int | None, mode: str) -> None:
        self.report, self.fn_kwargs, self.max_length, self.mode = report, fn_kwargs, max_length, mode

    def __call__(self, batch: Mapping[str, list], indices: list[int]) -> dict[str, list]:
        out = _prepare_batch(batch, indices, **self.fn_kwargs)
        src = out.pop("_src")
        out.update({c: [batch[c][i] for i in src] for c in batch if c not in CONSUMED and c != "label"})
        prompt_len = np.array([len(p) for p in out["prompt_ids"]], dtype=np.int64)
        completion_len = np.array([len(c) for c in out["completion_ids"]], dtype=np.int64)
        dropped, truncated, completion_cut = _fate(prompt_len, completion_len, self.max_length, self.mode)
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
