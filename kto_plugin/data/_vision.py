"""Vision-language rows: images, a processor, and the KTO batch with the model's image inputs.

Images are turned into pixel values batch by batch in the collator (as TRL 1.16's vision collator does): the
prepared dataset keeps the raw ``prompt``, ``completion``, ``label`` and ``images`` (or ``image``) columns.

* Conversational rows: the images go, as ``{"type": "image"}`` items, at the start of the first user message
  (string contents become ``{"type": "text"}`` items); the processor's chat template renders the prompt (with the
  generation prompt) and prompt + completion, whose suffix after the prompt text is the completion text.
* Plain-text rows are used as given: the prompt holds the model's image placeholder itself, and no EOS is
  appended to the completion (TRL 1.16's vision collator does neither).
* The processor tokenizes the prompts with their images (expanding each placeholder to one token per image
  patch group) and the completions alone, both without special tokens; the rows are then joined, cut to
  `max_length` keeping the start and padded by `KTOCollator`, so the text layout is the text-only batch's.
* The KL batch pairs prompt i, with its images, with completion i - 1, as for text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ._collator import KTOCollator, KTOLabels, pad
from ._formats import UNPAIRED, detect_format
from ._pairing import kl_pairs

IMAGE_COLUMNS = ("images", "image")
# the processor's prompt outputs that describe the tokens, not the images
_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
# per-token types marking image tokens (Qwen2-VL: mm_token_type_ids; Gemma 3: token_type_ids); 0 on text tokens
_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")
# prefix of the image inputs in `KTOLabels` (the reference and KL forwards read them there)
VISION_PREFIX = "vision_"


def is_processor(obj: Any) -> bool:
    """True for a multimodal processor (a `transformers.ProcessorMixin` with a tokenizer)."""
    from transformers import ProcessorMixin

    return isinstance(obj, ProcessorMixin) and getattr(obj, "tokenizer", None) is not None


def image_column(column_names: Sequence[str]) -> str | None:
    return next((c for c in IMAGE_COLUMNS if c in column_names), None)


def _structured(messages: list, images: Sequence[Any]) -> list:
    """Messages with list contents, one ``{"type": "image"}`` per image at the start of the first user turn."""
    out, placed = [], not images
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not placed and message.get("role") == "user":
            content = [{"type": "image"} for _ in images] + list(content or [])
            placed = True
        out.append({**message, "content": content})
    return out


def render(processor: Any, row: dict[str, Any], images: Sequence[Any]) -> tuple[str, str]:
    """(prompt text, completion text) of one row, rendered as described in the module docstring."""
    prompt, completion = row["prompt"], row["completion"]
    if not isinstance(prompt, list):
        return prompt, completion
    kwargs = {"tools": row.get("tools"), "tokenize": False, **(row.get("chat_template_kwargs") or {})}
    prompt_messages = _structured(prompt, images)
    prompt_text = processor.apply_chat_template(prompt_messages, add_generation_prompt=True, **kwargs)
    full = processor.apply_chat_template(prompt_messages + _structured(completion, []), **kwargs)
    return prompt_text, full[len(prompt_text):]


def layout(
    processor: Any, rows: Sequence[dict[str, Any]], column: str
) -> tuple[list[int], list[int] | None, list[int]]:
    """(prompt tokens, image-token end, completion tokens) of each row, as the collator's processor calls give
    them; the image-token end is how many prompt tokens run up to and including the last image token (0 without
    images), None if the processor marks no image tokens we can find."""
    images = [list(r[column]) if column == "images" else [r[column]] for r in rows]
    texts = [render(processor, r, imgs) for r, imgs in zip(rows, images)]
    out = processor(images=images if any(images) else None, text=[t[0] for t in texts], add_special_tokens=False)
    completions = processor(text=[t[1] for t in texts], add_special_tokens=False)["input_ids"]
    prompt_lens = [len(ids) for ids in out["input_ids"]]
    completion_lens = [len(ids) for ids in completions]
    return prompt_lens, image_token_ends(processor, out, out["input_ids"]), completion_lens


def image_token_ends(processor: Any, outputs: Any, prompt_ids: Sequence[Sequence[int]]) -> list[int] | None:
    """How many tokens of each prompt run up to and including its last image token (0 without images), from the
    processor's outputs for the prompts (`prompt_ids`: each prompt's unpadded ids, in the outputs' order; the
    per-token types, when the processor gives them, are read at the same unpadded positions); None when the
    processor marks image tokens in no way we can read."""
    image_id = getattr(processor, "image_token_id", None)
    types = next((outputs[k] for k in _TYPE_KEYS if k in outputs), None)
    if types is None and image_id is None:
        return None
    ends = []
    for i, ids in enumerate(prompt_ids):
        marks = [t != 0 for t in types[i]] if types is not None else [t == image_id for t in ids]
        ends.append(max((j + 1 for j, m in enumerate(marks) if m), default=0))
    return ends


def refuse_cut_images(ends: Sequence[int] | None, max_length: int | None, where: str, offset: int = 0) -> None:
    """The image-token rule: a keep-start cut to `max_length` must not fall inside a prompt's image tokens (the
    model would get image features without their tokens). `where` names the rows ("train dataset, row {i}"), `i`
    counted from `offset`."""
    if max_length is None:
        return
    for i, end in enumerate(ends or []):
        if end > max_length:
            raise ValueError(
                f"{where.format(i=offset + i)}: its prompt's image tokens end at token {end}, past max_length={max_length}, "
                f"so the cut would keep only part of the image. Raise KTOConfig(max_length=...) above {end} (room "
                "for the completion too), or make the images smaller (fewer image tokens), or filter the row out."
            )


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


def count_cut_rows(dataset: Any, processor: Any, max_length: int | None, name: str, batch: int = 64) -> int:
    """Applies `refuse_cut_images` to every row of a map-style vision dataset and returns how many rows the
    collator's keep-start cut will shorten (they lose completion tokens; nothing is dropped, as TRL 1.16).
    Processes each row's images once."""
    if max_length is None:
        return 0
    column = image_column(dataset.column_names)
    cut = 0
    for start in range(0, len(dataset), batch):
        rows = dataset.select(range(start, min(start + batch, len(dataset))))
        prompt_lens, ends, completion_lens = layout(processor, list(rows), column)
        refuse_cut_images(ends, max_length, f"{name} dataset, row {{i}}", offset=start)
        cut += int(((np.array(prompt_lens) + np.array(completion_lens)) > max_length).sum())
    return cut


def image_token_end(processor: Any, rows: Sequence[dict[str, Any]], column: str) -> list[int] | None:
    """`layout`'s image-token end of each row."""
    return layout(processor, rows, column)[1]


class VisionKTOCollator(KTOCollator):
    """`KTOCollator` for rows with images: the text batch of `KTOCollator` plus the processor's image inputs.

    Output: the text batch (see `KTOCollator`), plus the processor's image tensors (e.g. ``pixel_values``
    (patches, C*P*P) and ``image_grid_thw`` (images, 3) for Qwen2-VL) at the top level, for the policy forward,
    and in ``labels`` under ``vision_<name>`` for the reference and KL forwards. A processor that marks image
    tokens (``mm_token_type_ids``, or ``token_type_ids``) gets them per sequence: the prompt's, 0 on completion
    tokens and padding (e.g. ``vision_mm_token_type_ids`` and ``kl_vision_mm_token_type_ids`` in ``labels``).
    Rows without an image column go to `KTOCollator`.
    """

    def __init__(self, processor: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.processor = processor

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        column = image_column(rows[0]) if rows else None
        if column is None:
            return super().__call__(rows)
        images = [list(r[column]) if column == "images" else [r[column]] for r in rows]
        texts = [render(self.processor, r, imgs) for r, imgs in zip(rows, images)]
        prompts = self.processor(
            images=images if any(images) else None, text=[t[0] for t in texts], padding=True, padding_side="left",
            return_tensors="pt", add_special_tokens=False,
        )
        completions = self.processor(text=[t[1] for t in texts], add_special_tokens=False)["input_ids"]
        keep = prompts["attention_mask"].bool()
        prompt_ids = [ids[m].tolist() for ids, m in zip(prompts["input_ids"], keep)]
        self._check_image_tokens(prompts, prompt_ids, keep)
        completion_ids = [list(c) for c in completions]
        batch = super().__call__([
            {"prompt_ids": p, "completion_ids": c, "label": r["label"]}
            for p, c, r in zip(prompt_ids, completion_ids, rows)
        ])
        labels: KTOLabels = batch["labels"]
        image_inputs = {k: v for k, v in prompts.items() if k not in _TEXT_KEYS}
        for key, value in image_inputs.items():
            labels[VISION_PREFIX + key] = value
        for name in _TYPE_KEYS:
            if name not in prompts:
                continue
            types = [t[m].tolist() for t, m in zip(prompts[name], keep)]
            labels[VISION_PREFIX + name] = self._types(types, completion_ids)
            if self.build_kl:
                labels["kl_" + VISION_PREFIX + name] = self._types(types, kl_pairs(completion_ids))
        top = {k[len(VISION_PREFIX):]: v for k, v in labels.items() if k.startswith(VISION_PREFIX)}
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **top,
                **self.model_kwargs, "labels": labels}

    def _check_image_tokens(self, prompts: Any, prompt_ids: list[list[int]], keep: torch.Tensor) -> None:
        """`refuse_cut_images` for a batch (streamed rows reach here unchecked; `prepare_dataset` checks
        map-style rows)."""
        if self.max_length is None:
            return
        unpadded = {k: [t[m].tolist() for t, m in zip(prompts[k], keep)] for k in _TYPE_KEYS if k in prompts}
        ends = image_token_ends(self.processor, unpadded, prompt_ids)
        refuse_cut_images(ends, self.max_length, "vision batch, row {i} of this batch")

    def _types(self, prompt_types: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
        """Token types laid out as the ids: the prompt's, then 0 for each completion token, cut and padded alike."""
        joined = [self._join(t, [0] * len(c))[0] for t, c in zip(prompt_types, completions)]
        return pad(joined, 0, self.pad_to_multiple_of)


def vision_inputs(labels: Any, prefix: str = "") -> dict[str, Any]:
    """The image inputs of a collated batch for the target (`prefix` "") or KL (`prefix` "kl_") forward."""
    out = {k[len(VISION_PREFIX):]: v for k, v in labels.items() if k.startswith(VISION_PREFIX)}
    if prefix:
        start = prefix + VISION_PREFIX
        out.update({k[len(start):]: v for k, v in labels.items() if k.startswith(start)})
    return out
