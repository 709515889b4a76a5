"""Vision-language models: a tiny Qwen2-VL built from config, its processor built in code, generated images.

The batch is checked tensor by tensor against TRL 1.16's `DataCollatorForVisionUnpairedPreference`, and
training end to end against TRL 1.16's `KTOTrainer` (every logged metric within 2e-4 relative, as
tests/test_parity_trl.py does for text).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("PIL")

from trl_oracle import compare_logs, run_ours, run_trl, training_args  # noqa: E402
from vision_helpers import build_processor, build_tiny_vlm, vision_rows  # noqa: E402

from kto_plugin import KTOConfig, KTOPlugin  # noqa: E402
from kto_plugin.data._vision import VisionKTOCollator  # noqa: E402


@pytest.fixture(scope="module")
def processor(rows):
    return build_processor([r["prompt"] + r["completion"] for r in rows[:40]])


@pytest.fixture(scope="module")
def image_rows(rows):
    return vision_rows(rows, 16)


def _trl_batch(processor, rows, max_length=None, calculate_kl=True):
    from trl.trainer.kto_trainer import DataCollatorForVisionUnpairedPreference

    collator = DataCollatorForVisionUnpairedPreference(processor, max_length=max_length, calculate_kl=calculate_kl)
    return collator([dict(r) for r in rows])


@pytest.mark.parametrize("max_length", [None, 40])
def test_batch_matches_trl_vision_collator(processor, image_rows, max_length):
    rows = image_rows[:4]
    expected = _trl_batch(processor, rows, max_length)
    kto = KTOPlugin(KTOConfig(max_length=max_length), tokenizer=processor)
    assert isinstance(kto.collator, VisionKTOCollator)
    batch = kto.collator([dict(r) for r in rows])
    labels = batch["labels"]
    if max_length is not None:  # the cut reaches the completions of this batch
        assert batch["input_ids"].shape[1] == max_length
    for ours, theirs in [
        (batch["input_ids"], "input_ids"), (batch["attention_mask"], "attention_mask"),
        (batch["pixel_values"], "pixel_values"), (batch["image_grid_thw"], "image_grid_thw"),
        (batch["mm_token_type_ids"], "mm_token_type_ids"),
        (labels["vision_pixel_values"], "pixel_values"), (labels["vision_image_grid_thw"], "image_grid_thw"),
        (labels["vision_mm_token_type_ids"], "mm_token_type_ids"),
        (labels["kl_input_ids"], "KL_input_ids"), (labels["kl_attention_mask"], "KL_attention_mask"),
        (labels["kl_vision_mm_token_type_ids"], "KL_mm_token_type_ids"),
        (labels["label"], "label"),
    ]:
        assert torch.equal(ours, expected[theirs]), theirs
    # completion labels: the token id on completion tokens, -100 elsewhere (TRL: its completion mask)
    for ours, ids, mask in [(labels["completion_labels"], "input_ids", "completion_mask"),
                            (labels["kl_completion_labels"], "KL_input_ids", "KL_completion_mask")]:
        assert torch.equal(ours, expected[ids].masked_fill(expected[mask] == 0, -100)), mask


@pytest.mark.parametrize("multiple, padded", [(16, 128), (24, 144)])  # 128 columns unpadded: aligned to 16
def test_pad_to_multiple_of_pads_ids_masks_and_token_types(processor, image_rows, multiple, padded):
    rows = image_rows[:4]
    expected = _trl_batch(processor, rows)
    batch = KTOPlugin(KTOConfig(pad_to_multiple_of=multiple), tokenizer=processor).collator([dict(r) for r in rows])
    width = expected["input_ids"].shape[1]
    assert width == 128 and batch["input_ids"].shape[1] == padded
    assert torch.equal(batch["input_ids"][:, :width], expected["input_ids"])
    assert (batch["input_ids"][:, width:] == processor.tokenizer.pad_token_id).all()
    assert batch["attention_mask"][:, width:].sum() == 0 and batch["mm_token_type_ids"][:, width:].sum() == 0
    assert torch.equal(batch["mm_token_type_ids"][:, :width], expected["mm_token_type_ids"])
    assert batch["labels"]["kl_vision_mm_token_type_ids"].shape == batch["labels"]["kl_input_ids"].shape


def test_single_image_column_and_no_kl_batch(processor, image_rows):
    rows = [{**{k: v for k, v in r.items() if k != "images"}, "image": r["images"][0]} for r in image_rows[:3]]
    expected = _trl_batch(processor, rows, calculate_kl=False)
    kto = KTOPlugin(KTOConfig(loss_type="apo_zero_unpaired"), tokenizer=processor)
    kto.collator.build_kl = False  # as attach() sets it for a loss without the KL term
    batch = kto.collator([dict(r) for r in rows])
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    assert "kl_input_ids" not in batch["labels"] and "kl_vision_mm_token_type_ids" not in batch["labels"]


def test_prepare_dataset_keeps_image_rows_and_counts_them(processor, image_rows):
    kto = KTOPlugin(KTOConfig(), tokenizer=processor)
    prepared = kto.prepare_dataset(image_rows)
    assert set(prepared.column_names) == {"images", "prompt", "completion", "label"}
    report = kto.data_reports["train"]
    n_desirable = sum(r["label"] for r in image_rows)
    assert (report.rows_in, report.rows_out, report.n_desirable) == (16, 16, n_desirable)
    assert report.n_undesirable == 16 - n_desirable and report.conversational


def test_image_rows_refused_when_paired_keep_end_precomputed_or_mislabelled(processor, image_rows):
    paired = [{"images": r["images"], "prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"]}
              for r in image_rows[:4]]
    with pytest.raises(ValueError, match="images in a paired format.*unpair"):
        KTOPlugin(KTOConfig(), tokenizer=processor).prepare_dataset(paired)
    with pytest.raises(ValueError, match="KTOConfig.max_prompt_length cuts tokenized rows.*max_length"):
        KTOPlugin(KTOConfig(max_prompt_length=64), tokenizer=processor).prepare_dataset(image_rows)
    with pytest.raises(ValueError, match="truncation_mode='keep_end'.*image tokens"):
        KTOPlugin(KTOConfig(truncation_mode="keep_end"), tokenizer=processor).prepare_dataset(image_rows)
    with pytest.raises(ValueError, match=r"precompute_ref_log_probs=True\) is not supported for vision rows"):
        KTOPlugin(KTOConfig(precompute_ref_log_probs=True), tokenizer=processor).prepare_dataset(image_rows)
    bad = [dict(r) for r in image_rows[:4]]
    bad[2]["label"] = 1
    with pytest.raises(ValueError, match="row 2: 'label' is 1 \\(int\\); it must be a bool"):
        KTOPlugin(KTOConfig(), tokenizer=processor).prepare_dataset(bad)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_logged_metrics_match_trl_on_a_vision_language_model(loss_type, processor, rows, image_rows, tmp_path):
    # LM heads scaled up and a reference of another seed: next-token distributions far from uniform, so rewards
    # are far from 0 and the 2e-4 comparison is not about float noise in a difference of near-equal log-probs
    model = build_tiny_vlm(processor, seed=0, head_scale=30.0)
    ref_model = build_tiny_vlm(processor, seed=2, head_scale=30.0)
    kto_kwargs = dict(beta=0.1, loss_type=loss_type, max_length=512, desirable_weight=1.2, undesirable_weight=0.9)
    args = training_args(str(tmp_path), learning_rate=0.1)
    eval_rows = vision_rows(rows[20:], 8, seed=1)
    trl = run_trl(model, image_rows, processor, kto_kwargs, args, eval_rows=eval_rows, ref_model=ref_model)
    ours, kto = run_ours(model, image_rows, processor, kto_kwargs, args, eval_rows=eval_rows, ref_model=ref_model)
    trl.train()
    trl.evaluate()
    ours.train()
    ours.evaluate()

    expected, actual = trl.state.log_history, ours.state.log_history
    assert len(expected) == 8  # 6 training steps, the train summary, the evaluation
    assert compare_logs(expected, actual, rel=2e-4) == []
    if loss_type == "kto":  # the KL batch (prompt i's image with completion i - 1) reached the loss
        assert max(e.get("kl", 0.0) for e in actual) > 1.0
    assert max(abs(e.get("rewards/chosen", 0.0)) for e in actual) > 1.0


def test_streamed_image_rows_and_generate_during_eval(processor, image_rows, tmp_path):
    from datasets import IterableDataset
    from helpers import kto_trainer

    stream = IterableDataset.from_generator(lambda: iter(image_rows[:8]))
    kto = KTOPlugin(KTOConfig(), tokenizer=processor)
    prepared = kto.prepare_dataset(stream)
    assert kto.data_reports["train"].streaming
    first = list(prepared.take(4))
    assert torch.equal(kto.collator(first)["input_ids"], _trl_batch(processor, image_rows[:4])["input_ids"])
    model = build_tiny_vlm(processor)
    kto, trainer = kto_trainer(model, processor, image_rows, tmp_path, kto_kwargs=dict(generate_during_eval=True))
    with pytest.raises(NotImplementedError, match="generate_during_eval is not supported with a processor"):
        kto.attach(trainer)


@pytest.mark.slow
def test_lora_with_the_null_reference_matches_trl_on_a_vision_language_model(processor, rows, image_rows, tmp_path):
    import copy

    from reference_cases import lora_config, parity_args, parity_problems
    from reference_cases import run_ours as run_ours_peft
    from reference_cases import run_trl as run_trl_peft
    from reference_cases import train_and_evaluate

    base = build_tiny_vlm(processor, seed=0, head_scale=30.0)
    kto_kwargs = dict(beta=0.1, max_length=512)
    a = parity_args(str(tmp_path), lora=True, max_steps=3)
    eval_rows = vision_rows(rows[20:], 8, seed=1)
    trl = run_trl_peft(copy.deepcopy(base), image_rows, processor, kto_kwargs, a, eval_rows, peft_config=lora_config())
    ours, kto = run_ours_peft(copy.deepcopy(base), image_rows, processor, kto_kwargs, a, eval_rows,
                              peft_config=lora_config())
    assert kto.reference.mode == "null_adapter"
    ours.model.load_state_dict(trl.model.state_dict())  # the same random lora_A on both sides
    train_and_evaluate(trl, ours)
    assert parity_problems(trl.state.log_history, ours.state.log_history) == []
    assert max(abs(e.get("rewards/chosen", 0.0)) for e in ours.state.log_history) > 0.01


def test_max_length_that_would_cut_image_tokens_is_refused_at_prepare(processor, image_rows):
    from kto_plugin.data._vision import image_token_end

    ends = image_token_end(processor, image_rows, "images")
    # the reference: the processor's own expansion of each prompt, searched for its last image-pad token
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    end_id = processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    for row, end in zip(image_rows, ends):
        from kto_plugin.data._vision import render

        prompt, _ = render(processor, row, row["images"])
        ids = processor(images=[row["images"]], text=[prompt], add_special_tokens=False)["input_ids"][0]
        last = max(i for i, t in enumerate(ids) if t == pad_id)
        assert end == last + 1 and ids[last + 1] == end_id
    short = max(ends) - 1
    bad = ends.index(max(ends))
    with pytest.raises(ValueError, match=rf"row {bad}: its prompt's image tokens end at token {max(ends)}.*"
                                         rf"max_length={short}.*KTOConfig\(max_length="):
        KTOPlugin(KTOConfig(max_length=short), tokenizer=processor).prepare_dataset(image_rows)
    kto = KTOPlugin(KTOConfig(max_length=max(ends)), tokenizer=processor)
    assert len(kto.prepare_dataset(image_rows)) == len(image_rows)  # every image token fits: accepted


def test_collator_refuses_a_cut_through_image_tokens_for_streamed_rows(processor, image_rows):
    from datasets import IterableDataset
    from kto_plugin.data._vision import image_token_end

    ends = image_token_end(processor, image_rows[:4], "images")
    kto = KTOPlugin(KTOConfig(max_length=max(ends) - 1), tokenizer=processor)
    prepared = kto.prepare_dataset(IterableDataset.from_generator(lambda: iter(image_rows[:4])))  # not checked here
    with pytest.raises(ValueError, match=rf"image tokens end at token {max(ends)}.*max_length={max(ends) - 1}"):
        kto.collator(list(prepared))
    ok = KTOPlugin(KTOConfig(max_length=max(ends)), tokenizer=processor)
    assert ok.collator(image_rows[:4])["input_ids"].shape[1] == max(ends)


def test_streamed_image_rows_are_checked_and_counted(processor, image_rows):
    from datasets import IterableDataset

    kto = KTOPlugin(KTOConfig(), tokenizer=processor)
    prepared = kto.prepare_dataset(IterableDataset.from_generator(lambda: iter(image_rows[:8])))
    assert len(list(prepared)) == 8
    report = kto.data_reports["train"]
    n_desirable = sum(r["label"] for r in image_rows[:8])
    assert (report.rows_in, report.rows_out, report.n_desirable, report.n_undesirable) == (8, 8, n_desirable,
                                                                                          8 - n_desirable)
    bad = [dict(r) for r in image_rows[:4]]
    bad[2]["label"] = "yes"
    kto = KTOPlugin(KTOConfig(), tokenizer=processor)
    stream = kto.prepare_dataset(IterableDataset.from_generator(lambda: iter(bad)))
    with pytest.raises(ValueError, match="row 2: 'label' is 'yes' \\(str\\); it must be a bool"):
        list(stream)


def test_report_counts_the_rows_the_vision_collator_cuts(processor, image_rows):
    from kto_plugin.data._vision import image_token_end

    max_length = max(image_token_end(processor, image_rows, "images")) + 6  # every image fits, completions do not
    kto = KTOPlugin(KTOConfig(max_length=max_length), tokenizer=processor)
    prepared = kto.prepare_dataset(image_rows)
    uncut = KTOPlugin(KTOConfig(max_length=None), tokenizer=processor).collator(list(prepared))
    batch = kto.collator(list(prepared))  # the reference: what the collator keeps of each row
    truncated = completion_truncated = 0
    for i in range(len(prepared)):
        truncated += int(batch["attention_mask"][i].sum()) < int(uncut["attention_mask"][i].sum())
        kept = int((batch["labels"]["completion_labels"][i] != -100).sum())
        completion_truncated += kept < int((uncut["labels"]["completion_labels"][i] != -100).sum())
    report = kto.data_reports["train"]
    assert truncated > 0
    assert (report.truncated, report.completion_truncated) == (truncated, completion_truncated)
    assert f"{truncated} cut to max_length" in report.summary()
