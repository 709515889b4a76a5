"""Tokenisation of one batch of input rows: validate, unpair, render (chat template or plain text + EOS), encode,
and split each row into prompt and completion ids (see `kto_plugin.data._prepare` for the rules and TRL parity).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa

from ._encoding import common_prefix_length, encode
from ._formats import CONSUMED, IMPLICIT, UNPAIRED, check_rows, extract_prompt


def _render(tokenizer: Any, messages: list, tools: Any, extra: Mapping | None, generation: bool) -> str:
    kwargs = {"tools": tools, "tokenize": False, **(extra or {})}
    if generation:
        kwargs["add_generation_prompt"] = True
    return tokenizer.apply_chat_template(messages, **kwargs)


def prepare_batch(
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


def prepare_table(table: pa.Table, indices: list[int], prepare: Callable | None = None, **kwargs: Any) -> pa.Table:
    """`prepare_batch` from and to Arrow: token ids converted in C, other columns carried with their types.
    `prepare`: what prepares the batch instead of `prepare_batch`, returning ``(output, anything)`` (the
    skipping of malformed rows, `kto_plugin.data._bad_rows`)."""
    batch = {c: table.column(c).to_pylist() for c in table.column_names if c in CONSUMED or c == "label"}
    out = prepare_batch(batch, indices, **kwargs) if prepare is None else prepare(batch, indices, **kwargs)[0]
    src = pa.array(out.pop("_src"), type=pa.int64())
    columns = {key: pa.array(out[key], type=_IDS) for key in ("prompt_ids", "completion_ids")}
    columns.update({key: pa.array(out[key], type=pa.bool_())
                    for key in ("label", "_mismatch", "_prompt_cut", "_completion_cut")})
    columns["_row"] = pa.array(out["_row"], type=pa.int64())
    for c in table.column_names:
        if c not in CONSUMED and c != "label":
            columns[c] = table.column(c).take(src)
    return pa.table(columns)
