"""kto_plugin.data._collator: exact tensors for the target and KL batches, truncation and refusals."""

from __future__ import annotations

import pytest
import torch

from kto_plugin.data._collator import KTOCollator, KTOLabels, bits_as_float32, float32_as_bits, pad

M = -100
ROWS = [
    {"prompt_ids": [1, 2], "completion_ids": [3, 4], "label": True},
    {"prompt_ids": [5], "completion_ids": [6], "label": False},
    {"prompt_ids": [7, 8, 9], "completion_ids": [10], "label": True},
]


def test_docstring_example():
    batch = KTOCollator(pad_token_id=0)(ROWS[:2])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    labels = batch["labels"]
    assert isinstance(labels, KTOLabels)
    assert labels["completion_labels"].tolist() == [[M, M, 3, 4], [M, 6, M, M]]
    assert labels["kl_input_ids"].tolist() == [[1, 2, 6], [5, 3, 4]]
    assert labels["label"].tolist() == [True, False]
    assert labels["input_ids"] is batch["input_ids"]


def test_kl_rotation_three_rows():
    labels = KTOCollator(pad_token_id=0)(ROWS)["labels"]
    # prompt i with completion i - 1; row 0 takes the last row's completion
    assert labels["kl_input_ids"].tolist() == [[1, 2, 10, 0], [5, 3, 4, 0], [7, 8, 9, 6]]
    assert labels["kl_attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert labels["kl_completion_labels"].tolist() == [[M, M, 10, M], [M, 3, 4, M], [M, M, M, 6]]


def test_no_row_meets_its_own_completion():
    rows = [{"prompt_ids": [i], "completion_ids": [100 + i], "label": bool(i % 2)} for i in range(7)]
    labels = KTOCollator(pad_token_id=0)(rows)["labels"]
    for i, row in enumerate(labels["kl_input_ids"].tolist()):
        assert row[0] == i and row[1] != 100 + i
    assert sorted(r[1] for r in labels["kl_input_ids"].tolist()) == [100 + i for i in range(7)]


def test_truncation_keep_start_matches_trl_rule():
    # prompt+completion cut to max_length from the right, in both batches
    labels = KTOCollator(pad_token_id=0, max_length=3)(ROWS)["labels"]
    assert labels["input_ids"].tolist() == [[1, 2, 3], [5, 6, 0], [7, 8, 9]]
    assert labels["completion_labels"].tolist() == [[M, M, 3], [M, 6, M], [M, M, M]]
    assert labels["kl_input_ids"].tolist() == [[1, 2, 10], [5, 3, 4], [7, 8, 9]]


def test_truncation_keep_end_keeps_the_completion():
    collator = KTOCollator(pad_token_id=0, max_length=3, truncation_mode="keep_end")
    labels = collator(ROWS)["labels"]
    assert labels["input_ids"].tolist() == [[2, 3, 4], [5, 6, 0], [8, 9, 10]]
    assert labels["completion_labels"].tolist() == [[M, 3, 4], [M, 6, M], [M, M, 10]]


def test_pad_to_multiple_of_boundary():
    assert pad([[1, 2, 3, 4]], 0, pad_to_multiple_of=4).shape == (1, 4)  # already aligned: unchanged
    assert pad([[1, 2, 3, 4, 5]], 0, pad_to_multiple_of=4).shape == (1, 8)
    batch = KTOCollator(pad_token_id=9, pad_to_multiple_of=8)(ROWS)
    assert batch["input_ids"].shape == (3, 8) and batch["labels"]["kl_input_ids"].shape == (3, 8)
    assert batch["input_ids"][1].tolist() == [5, 6, 9, 9, 9, 9, 9, 9]


def test_batch_of_one_is_refused():
    with pytest.raises(ValueError, match="batch of 1 row"):
        KTOCollator(pad_token_id=0)(ROWS[:1])


def test_no_kl_inputs_when_the_loss_does_not_need_them():
    batch = KTOCollator(pad_token_id=0, build_kl=False)(ROWS[:1])
    assert "kl_input_ids" not in batch["labels"]


def test_model_kwargs_and_precomputed_columns():
    collator = KTOCollator(pad_token_id=0)
    collator.model_kwargs = {"use_cache": False}
    rows = [dict(r, ref_logps=-1.5 * i, ref_kl_logps=-2.0 * i) for i, r in enumerate(ROWS)]
    batch = collator(rows)
    assert batch["use_cache"] is False
    # carried as int32 bit patterns, so the Trainer's DeepSpeed cast of floating inputs cannot round them
    assert batch["labels"]["ref_logps_bits"].dtype == torch.int32
    assert bits_as_float32(batch["labels"]["ref_logps_bits"]).tolist() == [0.0, -1.5, -3.0]
    assert bits_as_float32(batch["labels"]["ref_kl_logps_bits"]).tolist() == [0.0, -2.0, -4.0]
    exact = -123.456789
    assert bits_as_float32(float32_as_bits([exact])).item() == torch.tensor(exact, dtype=torch.float32).item()


def test_stored_kl_partners_replace_the_rotation():
    rows = [dict(r, kl_completion_ids=[50 + i]) for i, r in enumerate(ROWS)]
    batch = KTOCollator(pad_token_id=0)(rows)
    labels = batch["labels"]
    for i, row in enumerate(ROWS):
        width = len(row["prompt_ids"]) + 1
        assert labels["kl_input_ids"][i, :width].tolist() == list(row["prompt_ids"]) + [50 + i]
        expected = [-100] * len(row["prompt_ids"]) + [50 + i]
        assert labels["kl_completion_labels"][i, :width].tolist() == expected
    # one row is enough when its partner is stored
    assert KTOCollator(pad_token_id=0)(rows[:1])["labels"]["kl_input_ids"].shape[0] == 1


def test_missing_column_names_the_fix():
    with pytest.raises(KeyError, match="prepare_dataset"):
        KTOCollator(pad_token_id=0)([{"prompt": "a", "completion": "b", "label": True}] * 2)


def test_labels_dict_raises_typeerror_for_slices():
    # Trainer probes labels[..., 1:] and only catches TypeError/AttributeError (KeyError on Python >= 3.12)
    labels = KTOLabels(label=torch.tensor([True]))
    with pytest.raises(TypeError):
        labels[..., 1:]
    assert labels["label"].tolist() == [True]


def test_label_pad_token_id_and_padding_value():
    # the documented KTOTrainer meaning: label_pad_token_id fills the labels at prompt and padding positions,
    # padding_value fills input_ids past each row's end (the attention mask is still 0 there)
    batch = KTOCollator(pad_token_id=77, label_pad_token_id=-7)(ROWS[:2])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 77, 77]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    labels = batch["labels"]
    assert labels["completion_labels"].tolist() == [[-7, -7, 3, 4], [-7, 6, -7, -7]]
    assert labels["kl_completion_labels"].tolist() == [[-7, -7, 6], [-7, 3, 4]]
