"""Dataset preparation: unpaired `{prompt, completion, label}` rows (plain text or conversational) to token ids.

The ids are exactly those TRL 1.16's `KTOTrainer` puts in its `train_dataset` for the same tokenizer:

* plain text: the tokenizer's EOS is appended to the completion text unless it already ends with it; prompt and
  prompt+completion are tokenized with the tokenizer's special tokens (so a BOS is added where the tokenizer adds
  one), and the completion is what follows the longest common prefix of the two;
* conversational (lists of ``{"role", "content"}`` messages): the prompt is rendered with the chat template and
  ``add_generation_prompt=True``, prompt+completion without, both tokenized without extra special tokens;
* rows whose prompt alone reaches `max_length` are dropped (they would keep no completion token).

Tokenization is batched (`datasets.map(batched=True)`), so a fast tokenizer encodes many rows per call.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets

logger = logging.getLogger("kto_plugin")

REQUIRED_COLUMNS = ("prompt", "completion", "label")
TOKEN_COLUMNS = ("prompt_ids", "completion_ids", "label")
_MAP_BATCH = 1000


@dataclass
class DataReport:
    """What preparation did to one dataset: nothing is dropped or cut without being counted here."""

    name: str
    rows_in: int = 0
    rows_out: int = 0
    n_desirable: int = 0
    n_undesirable: int = 0
    dropped_prompt_too_long: int = 0
    truncated: int = 0  # rows whose prompt+completion exceeds max_length (cut in the collator)
    completion_limited: int = 0  # rows whose completion was cut to max_completion_length
    prompt_boundary_mismatch: int = 0  # rows whose tokenized prompt is not a prefix of prompt+completion
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [
            f"{self.name}: {self.rows_out}/{self.rows_in} rows kept",
            f"{self.n_desirable} desirable / {self.n_undesirable} undesirable",
        ]
        if self.dropped_prompt_too_long:
            parts.append(f"{self.dropped_prompt_too_long} dropped (prompt alone >= max_length)")
        if self.completion_limited:
            parts.append(f"{self.completion_limited} completions cut to max_completion_length")
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_length")
        if self.prompt_boundary_mismatch:
            parts.append(
                f"{self.prompt_boundary_mismatch} with a prompt/completion token boundary that merges "
                "(completion starts where the tokenizations diverge)"
            )
        return "; ".join(parts)


def _closest(name: str, options: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""


def is_conversational(value: Any) -> bool:
    """True for a non-empty list of ``{"role": ..., ...}`` messages."""
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], Mapping) and "role" in value[0]


def _as_dataset(data: Any, name: str = "train") -> Any:
    if isinstance(data, (datasets.Dataset, datasets.DatasetDict)):
        return data
    if isinstance(data, list):
        if not data:
            raise ValueError("prepare_dataset got an empty list: there are no rows to train on.")
        if not all(isinstance(row, Mapping) for row in data):
            bad = next(i for i, row in enumerate(data) if not isinstance(row, Mapping))
            raise TypeError(f"prepare_dataset: row {bad} of the list is a {type(data[bad]).__name__}, not a dict.")
        # check in Python first: Arrow's own conversion errors name neither the row nor the fix
        validate_columns(list(data[0]), name)
        for i, row in enumerate(data):
            missing = [c for c in REQUIRED_COLUMNS if c not in row]
            if missing:
                raise ValueError(f"{name} dataset, row {i}: missing {missing} (row 0 has them).")
        _check_rows({c: [row[c] for row in data] for c in REQUIRED_COLUMNS}, 0, name)
        return datasets.Dataset.from_list([dict(row) for row in data])
    raise TypeError(
        f"prepare_dataset takes a datasets.Dataset, DatasetDict or a list of dicts, got {type(data).__name__}."
    )


IMAGE_COLUMNS = ("images", "image")
VLM_ALTERNATIVE = (
    "kto_plugin trains text-only language models (decoder-only or encoder-decoder). For KTO on a vision-language "
    "model, use TRL 1.16's KTOTrainer, which takes rows with 'images' and a processor and builds the KL batch with "
    "its vision collator."
)


def validate_columns(column_names: Sequence[str], name: str) -> None:
    """Raise a clear error for a missing `prompt`/`completion`/`label` column, with the closest name present, and
    for image columns (vision-language rows are not supported)."""
    images = [c for c in IMAGE_COLUMNS if c in column_names]
    if images:
        raise NotImplementedError(
            f"{name} dataset has an image column {images[0]!r}: vision-language rows are not supported. "
            f"{VLM_ALTERNATIVE} To train on the text alone, drop it first: dataset.remove_columns({images[0]!r})."
        )
    for column in REQUIRED_COLUMNS:
        if column not in column_names:
            raise ValueError(
                f"{name} dataset has no {column!r} column (columns: {list(column_names)}).{_closest(column, column_names)} "
                "KTO rows are {'prompt': ..., 'completion': ..., 'label': bool}: rename the column with "
                "dataset.rename_column(old, new)."
            )


def _check_rows(batch: Mapping[str, list], offset: int, name: str) -> None:
    conversational = is_conversational(batch["prompt"][0]) if batch["prompt"] else False
    for i, (prompt, completion, label) in enumerate(zip(batch["prompt"], batch["completion"], batch["label"])):
        row = offset + i
        if not isinstance(label, bool):
            raise ValueError(
                f"{name} dataset, row {row}: 'label' is {label!r} ({type(label).__name__}); it must be a bool "
                "(True = desirable, False = undesirable). Convert it, e.g. "
                "dataset.map(lambda r: {'label': r['label'] in ('yes', 'true', 1)})."
            )
        for column, value in (("prompt", prompt), ("completion", completion)):
            if value is None or (isinstance(value, (str, list)) and len(value) == 0):
                raise ValueError(
                    f"{name} dataset, row {row}: {column!r} is {value!r}. Every row needs a non-empty prompt and "
                    "completion: filter such rows out first (dataset.filter(...))."
                )
            if is_conversational(value) != conversational or not isinstance(value, (str, list)):
                kind = "conversational" if conversational else "plain text"
                raise ValueError(
                    f"{name} dataset, row {row}: {column!r} is {type(value).__name__} but row {offset} is {kind}. "
                    "Use one format for all rows: strings, or lists of {'role', 'content'} messages."
                )


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _tokenize_batch(
    batch: Mapping[str, list], tokenizer: Any, max_prompt_length: int | None, max_completion_length: int | None = None,
    separate: bool = False,
) -> dict[str, list]:
    prompts, completions = batch["prompt"], batch["completion"]
    if is_conversational(prompts[0]):
        tools_column = batch.get("tools")
        kwargs_column = batch.get("chat_template_kwargs")
        prompt_texts, full_texts = [], []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            tools = tools_column[i] if tools_column is not None else None
            tools = json.loads(tools) if isinstance(tools, str) else tools
            extra = dict(kwargs_column[i] or {}) if kwargs_column is not None else {}
            template_kwargs = {"tools": tools or None, "tokenize": False, **extra}
            prompt_texts.append(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, **template_kwargs))
            full_texts.append(tokenizer.apply_chat_template(prompt + completion, **template_kwargs))
        special = False
    else:
        eos = tokenizer.eos_token
        completions = [c if c.endswith(eos) else c + eos for c in completions]
        prompt_texts = list(prompts)
        full_texts = [p + c for p, c in zip(prompts, completions)]
        special = True
    prompt_ids = tokenizer(prompt_texts, add_special_tokens=special)["input_ids"]
    if separate and special:
        # encoder-decoder: prompt and completion are separate sequences, each with the tokenizer's special tokens
        # (a T5 tokenizer appends EOS to both); the completion keeps exactly one EOS at its end
        eos_id = tokenizer.eos_token_id
        completion_ids = tokenizer([c.removesuffix(tokenizer.eos_token) for c in completions])["input_ids"]
        completion_ids = [c if c and c[-1] == eos_id else c + [eos_id] for c in completion_ids]
        full_ids = [p + c for p, c in zip(prompt_ids, completion_ids)]
    else:
        full_ids = tokenizer(full_texts, add_special_tokens=special)["input_ids"]
    out_prompt, out_completion, mismatch, cut = [], [], [], []
    for p_ids, f_ids in zip(prompt_ids, full_ids):
        n = _common_prefix(p_ids, f_ids)
        mismatch.append(n < len(p_ids))
        prompt = f_ids[:n]
        if max_prompt_length is not None and len(prompt) > max_prompt_length:
            # keep the end of the prompt (the turns nearest the completion), and a leading BOS if there is one
            head = prompt[:1] if prompt[0] == tokenizer.bos_token_id else []
            prompt = head + prompt[len(prompt) - max_prompt_length + len(head) :]
        completion = f_ids[n:]
        # documented KTOTrainer meaning: the completion keeps its first max_completion_length tokens
        cut.append(max_completion_length is not None and len(completion) > max_completion_length)
        if cut[-1]:
            completion = completion[:max_completion_length]
        out_prompt.append(prompt)
        out_completion.append(completion)
    return {
        "prompt_ids": out_prompt,
        "completion_ids": out_completion,
        "_mismatch": mismatch,
        "_completion_cut": cut,
        "_prompt_len": [len(p) for p in out_prompt],
        "_completion_len": [len(c) for c in out_completion],
    }


ROW_INDEX = "row_index"


def prepare_split(
    dataset: datasets.Dataset,
    tokenizer: Any,
    name: str,
    max_length: int | None,
    max_prompt_length: int | None,
    num_proc: int | None,
    max_completion_length: int | None = None,
    separate: bool = False,
) -> tuple[datasets.Dataset, DataReport]:
    """Validate and tokenize one split; returns the prepared split and its report."""
    report = DataReport(name=name, rows_in=len(dataset))
    validate_columns(dataset.column_names, name)
    if len(dataset) == 0:
        raise ValueError(f"{name} dataset is empty: there are no rows to train on.")
    if tokenizer.eos_token is None:
        raise ValueError(
            "The tokenizer has no eos_token: KTO appends EOS to plain-text completions so the model learns to stop. "
            "Set one: tokenizer.eos_token = '...'."
        )
    # validation reads only the three columns, in large batches, before any tokenization
    checked = dataset.select_columns(list(REQUIRED_COLUMNS))
    for start in range(0, len(checked), 10_000):
        _check_rows(checked[start : start + 10_000], start, name)
    conversational = is_conversational(dataset[0]["prompt"])
    if conversational and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{name} dataset is conversational but the tokenizer has no chat template. Set one, e.g. "
            "tokenizer.chat_template = '{% for m in messages %}...{% endfor %}', or load a tokenizer that has one."
        )
    if ROW_INDEX not in dataset.column_names:
        # names the rows of a non-finite loss in long runs (`kto_plugin.nonfinite`); survives the drops below
        dataset = dataset.add_column(ROW_INDEX, list(range(len(dataset))))
    keep = [c for c in dataset.column_names if c not in ("prompt", "completion", "tools", "chat_template_kwargs")]
    tokenized = dataset.map(
        _tokenize_batch,
        batched=True,
        batch_size=_MAP_BATCH,
        num_proc=num_proc,
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_prompt_length": max_prompt_length,
            "max_completion_length": max_completion_length,
            "separate": separate,
        },
        remove_columns=[c for c in dataset.column_names if c not in keep],
        desc=f"Tokenizing {name} dataset",
    )
    prompt_lengths = tokenized["_prompt_len"]
    completion_lengths = tokenized["_completion_len"]
    report.prompt_boundary_mismatch = sum(tokenized["_mismatch"])
    report.completion_limited = sum(tokenized["_completion_cut"])
    tokenized = tokenized.remove_columns(["_mismatch", "_completion_cut", "_prompt_len", "_completion_len"])
    if max_length is not None:
        keep_rows = [i for i, n in enumerate(prompt_lengths) if n < max_length]
        report.dropped_prompt_too_long = len(tokenized) - len(keep_rows)
        report.truncated = sum(
            1 for i in keep_rows if prompt_lengths[i] + completion_lengths[i] > max_length
        )
        if report.dropped_prompt_too_long:
            tokenized = tokenized.select(keep_rows)
    if len(tokenized) == 0:
        raise ValueError(
            f"{name} dataset: every row's prompt is at least max_length={max_length} tokens, so no row is left. "
            "Raise max_length, or set max_prompt_length (with truncation_mode='keep_end') to shorten prompts."
        )
    labels = tokenized["label"]
    report.rows_out = len(tokenized)
    report.n_desirable = sum(1 for x in labels if x)
    report.n_undesirable = report.rows_out - report.n_desirable
    return tokenized, report
