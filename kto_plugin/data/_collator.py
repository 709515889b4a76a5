"""The KTO data collator: the target batch and the KL-mismatched batch, built from the batch itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._pairing import kl_pairs
from ._truncation import cut

IGNORE_INDEX = -100  # `KTOConfig.label_pad_token_id`'s default: a completion label that scores nothing


class KTOLabels(dict):
    """The `labels` entry of a KTO batch: a dict of tensors the loss hook reads.

    The Trainer moves it to the device like any mapping. From transformers 5.10 on, the Trainer probes
    ``labels[..., 1:]`` to count tokens and catches only TypeError/AttributeError; on Python >= 3.12 a plain
    dict raises KeyError there (slices became hashable) and training crashes. Non-string keys raise TypeError.
    """

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, str):
            raise TypeError(f"KTOLabels is indexed by field name, not {type(key).__name__}")
        return super().__getitem__(key)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        # a torch function got the KTO labels as a tensor: without `attach()` the model computes its own
        # causal-LM loss from `labels` (transformers pads them first: "pad() ... must be Tensor, not KTOLabels")
        name = getattr(func, "__name__", str(func))
        raise TypeError(
            f"torch.{name} got the KTO batch's labels (a KTOLabels dict), not a tensor: the model is computing its "
            "own loss from them, so the KTO loss hook is not installed: call kto.attach(trainer) before "
            "trainer.train(). (Code of your own reading the labels: take a field, e.g. labels['label'].)"
        )


def float32_as_bits(values: Sequence[float]) -> torch.Tensor:
    """float32 values carried as their int32 bit patterns.

    Under DeepSpeed the Trainer casts every floating-point tensor of a batch (labels included) to the
    DeepSpeed dtype; in bfloat16 a log-prob of -200 keeps 3 significant digits. Integers pass untouched, so
    precomputed reference log-probs travel as bits and `bits_as_float32` restores them exactly.

    >>> bits_as_float32(float32_as_bits([-1.5, 2.0])).tolist()
    [-1.5, 2.0]
    """
    return torch.tensor(values, dtype=torch.float32).view(torch.int32)


def bits_as_float32(bits: torch.Tensor) -> torch.Tensor:
    return bits.view(torch.float32)


def pad(rows: Sequence[Sequence[int]], value: int, pad_to_multiple_of: int | None = None) -> torch.Tensor:
    """Right-pad integer rows to the longest (rounded up to a multiple of `pad_to_multiple_of`).

    >>> pad([[1, 2, 3], [4]], 0, pad_to_multiple_of=4)
    tensor([[1, 2, 3, 0],
            [4, 0, 0, 0]])
    """
    width = max((len(r) for r in rows), default=0)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


class KTOCollator:
    """Collates prepared rows (`prompt_ids`, `completion_ids`, `label`) into a KTO batch.

    Output::

        {"input_ids": (B, T), "attention_mask": (B, T), **model_kwargs,
         "labels": KTOLabels(label=(B,) bool, input_ids=(B, T), attention_mask=(B, T),
                             completion_labels=(B, T) token id on completion tokens, label_pad_token_id
                                                 (-100) elsewhere,
                             kl_input_ids=(B, T'), kl_attention_mask=(B, T'), kl_completion_labels=(B, T'),
                             ref_logps_bits=(B,), ref_kl_logps_bits=(B,),  # only if precomputed
                             row_index=(B,))}  # only if the rows carry an integer `row_index`

    The loss hook sees only `labels`, so the target ids and mask are repeated there. The KL batch pairs
    prompt i with completion i - 1 (row 0 takes the last row's completion), so each prompt meets a
    completion it was not written for, and the mismatched completions are exactly the batch's own (paper
    section 4.1). Under a sequential sampler this is TRL's pairing; under any sampler it is still a true
    mismatch. Rows that carry a ``kl_completion_ids`` column (a fixed partner stored by the precompute pass,
    see `kto_plugin.reference._precompute`) are paired with that completion instead, so the pair scored by the policy
    is the one whose reference log-prob was precomputed, whatever the sampler. Precomputed ``ref_logps`` and
    ``ref_kl_logps`` columns travel as float32 bit patterns (`float32_as_bits`). Rows are cut to
    `max_length` keeping the start (TRL 1.16); with ``truncation_mode="keep_end"`` the end of the prompt and
    the whole completion are kept instead. For an encoder-decoder model (`encoder_decoder`, set at attach) the
    prompt is the encoder input and the completion the decoder's, see `_encoder_decoder_side`.

    Worked example (pad 0, no max_length)::

        rows   [1 2 | 3 4], [5 | 6]            (prompt | completion)
        input_ids            [[1 2 3 4], [5 6 0 0]]
        completion_labels    [[-100 -100 3 4], [-100 6 -100 -100]]
        kl_input_ids         [[1 2 6], [5 3 4]]
    """

    def __init__(
        self,
        pad_token_id: int,
        max_length: int | None = None,
        truncation_mode: str = "keep_start",
        pad_to_multiple_of: int | None = None,
        build_kl: bool = True,
        label_pad_token_id: int = IGNORE_INDEX,
    ) -> None:
        self.pad_token_id = pad_token_id
        self.label_pad_token_id = label_pad_token_id
        self.max_length = max_length
        self.truncation_mode = truncation_mode
        self.pad_to_multiple_of = pad_to_multiple_of
        self.build_kl = build_kl
        # encoder-decoder models (set by `KTOPlugin.attach` from `model.config.is_encoder_decoder`): the prompt
        # goes to the encoder, the completion is the decoder's input (shifted right) and its labels
        self.encoder_decoder = False
        self.decoder_start_token_id: int | None = None
        # Keyword arguments for the model call (e.g. output_hidden_states); set by `KTOPlugin.attach`.
        self.model_kwargs: dict[str, Any] = {}

    def _join(self, prompt: Sequence[int], completion: Sequence[int]) -> tuple[list[int], list[int]]:
        """Concatenate and truncate (`kto_plugin.data._truncation`); returns (input ids, completion labels)."""
        prompt, completion = cut(list(prompt), list(completion), self.max_length, self.truncation_mode)
        return prompt + completion, [self.label_pad_token_id] * len(prompt) + completion

    def _side(self, prompts: list, completions: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        joined = [self._join(p, c) for p, c in zip(prompts, completions)]
        ids = pad([j[0] for j in joined], self.pad_token_id, self.pad_to_multiple_of)
        labels = pad([j[1] for j in joined], self.label_pad_token_id, self.pad_to_multiple_of)
        mask = pad([[1] * len(j[0]) for j in joined], 0, self.pad_to_multiple_of)
        return ids, mask, labels

    def _encoder_decoder_side(self, prompts: list, completions: list) -> dict[str, torch.Tensor]:
        """Encoder inputs from the prompts; decoder inputs and labels from the completions.

        Each side is cut to `max_length` on its own: the prompt keeps its start (its end with
        ``truncation_mode="keep_end"``), the completion its start. `completion_labels` is (B, 1 + Tc): column 0
        is `label_pad_token_id` and column t + 1 is the completion token that decoder position t predicts, so
        the log-prob code reads it exactly as a decoder-only batch (position t scores label t + 1).

        Worked example (pad 0, decoder start 0, label pad M)::

            rows              [1 2 | 3 4], [5 | 6]
            input_ids         [[1 2], [5 0]]        (encoder)
            decoder_input_ids [[0 3], [0 0]]        (start token, then the completion shifted right)
            completion_labels [[M 3 4], [M 6 M]]
        """
        if self.decoder_start_token_id is None:
            raise ValueError(
                "The encoder-decoder model's config has no decoder_start_token_id: set "
                "model.config.decoder_start_token_id (T5: the pad id; BART: the EOS id)."
            )
        # each side alone under the one truncation rule: the prompt as a row without completion, the completion
        # as a row without prompt (so it keeps its start whatever truncation_mode says)
        prompts = [cut(list(p), [], self.max_length, self.truncation_mode)[0] for p in prompts]
        completions = [cut([], list(c), self.max_length, "keep_start")[1] for c in completions]
        decoder_input_ids = pad(
            [[self.decoder_start_token_id] + c[:-1] for c in completions], self.pad_token_id, self.pad_to_multiple_of
        )
        # one column wider than the decoder (the leading label pad), whatever pad_to_multiple_of made the width
        completion_labels = torch.full(
            (len(completions), decoder_input_ids.shape[1] + 1), self.label_pad_token_id, dtype=torch.long
        )
        for i, c in enumerate(completions):
            completion_labels[i, 1 : 1 + len(c)] = torch.as_tensor(c, dtype=torch.long)
        return {
            "input_ids": pad(prompts, self.pad_token_id, self.pad_to_multiple_of),
            "attention_mask": pad([[1] * len(p) for p in prompts], 0, self.pad_to_multiple_of),
            "decoder_input_ids": decoder_input_ids,
            "decoder_attention_mask": pad([[1] * len(c) for c in completions], 0, self.pad_to_multiple_of),
            "completion_labels": completion_labels,
        }

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        for key in ("prompt_ids", "completion_ids", "label"):
            if key not in rows[0]:
                raise KeyError(
                    f"KTOCollator: row 0 has no {key!r} column (it has {sorted(rows[0])}). If the dataset came from "
                    "kto.prepare_dataset, the Trainer removed its KTO columns: call kto.attach(trainer) before "
                    "trainer.train() (attach sets remove_unused_columns=False and installs the KTO loss). "
                    "Otherwise pass the data through kto.prepare_dataset first."
                )
        stored_partners = "kl_completion_ids" in rows[0]
        if self.build_kl and len(rows) < 2 and not stored_partners:
            raise ValueError(
                "KTOCollator got a batch of 1 row: KTO estimates its KL reference point from mismatched "
                "(prompt, completion) pairs within a per-device batch, and one row has no mismatched partner. "
                "Use per_device_train_batch_size >= 2 (the paper recommends >= 4) and per_device_eval_batch_size "
                ">= 2; with an uneven last batch set dataloader_drop_last=True."
            )
        prompts = [r["prompt_ids"] for r in rows]
        completions = [r["completion_ids"] for r in rows]
        if stored_partners:
            kl_completions = [r["kl_completion_ids"] for r in rows]
        else:
            kl_completions = kl_pairs(completions)
        if self.encoder_decoder:
            return self._encoder_decoder_batch(rows, prompts, completions, kl_completions)
        input_ids, attention_mask, completion_labels = self._side(prompts, completions)
        labels = KTOLabels(
            label=torch.tensor([bool(r["label"]) for r in rows], dtype=torch.bool),
            input_ids=input_ids,
            attention_mask=attention_mask,
            completion_labels=completion_labels,
        )
        if self.build_kl:
            kl_ids, kl_mask, kl_labels = self._side(prompts, kl_completions)
            labels.update(kl_input_ids=kl_ids, kl_attention_mask=kl_mask, kl_completion_labels=kl_labels)
        self._add_row_columns(rows, labels)
        return {"input_ids": input_ids, "attention_mask": attention_mask, **self.model_kwargs, "labels": labels}

    @staticmethod
    def _add_row_columns(rows: Sequence[dict[str, Any]], labels: KTOLabels) -> None:
        """Per-row columns the loss hook reads: ``row_index`` and precomputed reference log-probs (as bits)."""
        if "row_index" in rows[0] and all(isinstance(r["row_index"], int) for r in rows):
            labels["row_index"] = torch.tensor([r["row_index"] for r in rows], dtype=torch.long)
        for key in ("ref_logps", "ref_kl_logps"):
            if key in rows[0]:
                labels[f"{key}_bits"] = float32_as_bits([r[key] for r in rows])

    def _encoder_decoder_batch(self, rows, prompts, completions, kl_completions) -> dict[str, Any]:
        """The batch for an encoder-decoder model: KL pairs are prompt i (encoder) with completion i - 1 (decoder)."""
        side = self._encoder_decoder_side(prompts, completions)
        labels = KTOLabels(label=torch.tensor([bool(r["label"]) for r in rows], dtype=torch.bool), **side)
        if self.build_kl:
            kl = self._encoder_decoder_side(prompts, kl_completions)
            labels.update({f"kl_{key}": value for key, value in kl.items()})
        self._add_row_columns(rows, labels)
        inputs = {k: side[k] for k in ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")}
        return {**inputs, **self.model_kwargs, "labels": labels}
