"""prepare_dataset: token ids identical to TRL 1.16's KTOTrainer, and clear errors for bad rows."""

from __future__ import annotations

import copy
import json

import pytest
from datasets import Dataset, DatasetDict

from kto_plugin import KTOConfig, KTOPlugin

TOOLS = json.dumps([{"type": "function", "function": {"name": "lookup", "description": "Look a word up",
                                                        "parameters": {"type": "object", "properties": {}}}}])


def trl_prepared(rows, tokenizer, model, tmp_path, max_length):
    from trl import KTOConfig as TRLKTOConfig
    from trl import KTOTrainer

    args = TRLKTOConfig(output_dir=str(tmp_path), max_length=max_length, per_device_train_batch_size=2,
                        report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False)
    trainer = KTOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return trainer.train_dataset


def conversational(rows):
    out = []
    for i, r in enumerate(rows):
        prompt = [{"role": "user", "content": r["prompt"].strip()}]
        if i % 3 == 0:
            prompt = [{"role": "system", "content": "Be harmless."}] + prompt
        out.append({
            "prompt": prompt,
            "completion": [{"role": "assistant", "content": r["completion"].strip()}],
            "label": r["label"],
            "tools": TOOLS if i % 4 == 0 else None,
        })
    return out


@pytest.mark.parametrize("kind", ["plain", "conversational"])
@pytest.mark.parametrize("max_length", [64, 1024])
def test_token_ids_identical_to_trl(kind, max_length, rows, tokenizer, model, tmp_path):
    data = rows[:40] if kind == "plain" else conversational(rows[:40])
    theirs = trl_prepared(data, tokenizer, model, tmp_path, max_length)
    kto = KTOPlugin(KTOConfig(max_length=max_length), tokenizer=tokenizer)
    ours = kto.prepare_dataset(data)
    assert ours["prompt_ids"] == theirs["prompt_ids"]
    assert ours["completion_ids"] == theirs["completion_ids"]
    assert ours["label"] == theirs["label"]
    report = kto.data_reports["train"]
    assert report.rows_in == 40 and report.rows_out == len(theirs)
    assert report.dropped_prompt_too_long == 40 - len(theirs)
    if kind == "plain":  # BOS added, EOS appended to the completion
        assert all(p[0] == tokenizer.bos_token_id for p in ours["prompt_ids"])
        assert all(c[-1] == tokenizer.eos_token_id for c in ours["completion_ids"])


def test_short_max_length_drops_and_counts(rows, tokenizer):
    kto = KTOPlugin(KTOConfig(max_length=40), tokenizer=tokenizer)
    out = kto.prepare_dataset(rows)
    report = kto.data_reports["train"]
    assert report.dropped_prompt_too_long > 0
    assert report.rows_out == len(out) == report.rows_in - report.dropped_prompt_too_long
    assert all(len(p) < 40 for p in out["prompt_ids"])
    assert report.truncated == sum(len(p) + len(c) > 40 for p, c in zip(out["prompt_ids"], out["completion_ids"]))
    assert "dropped" in report.summary()


def test_dataset_dict_and_list_inputs(rows, tokenizer):
    kto = KTOPlugin(KTOConfig(max_length=512), tokenizer=tokenizer)
    dd = kto.prepare_dataset(DatasetDict(train=Dataset.from_list(rows[:10]), test=Dataset.from_list(rows[10:14])))
    assert set(dd) == {"train", "test"} and len(dd["test"]) == kto.data_reports["test"].rows_out
    assert kto.prepare_dataset(rows[:6])["prompt_ids"] == dd["train"]["prompt_ids"][:6]


def test_missing_column_suggests_the_closest(tokenizer):
    kto = KTOPlugin(KTOConfig(), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"no 'completion' column.*Did you mean 'completions'"):
        kto.prepare_dataset([{"prompt": "a", "completions": "b", "label": True}])
    with pytest.raises(ValueError, match=r"no 'label' column"):
        kto.prepare_dataset([{"prompt": "a", "completion": "b"}])


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"label": "yes"}, r"row 2: 'label' is 'yes' \(str\); it must be a bool"),
        ({"label": 1.0}, r"row 2: 'label' is 1.0"),
        ({"completion": ""}, r"row 2: 'completion' is ''"),
        ({"prompt": None}, r"row 2: 'prompt' is None"),
    ],
)
def test_bad_rows_name_the_row(tokenizer, bad, match):
    data = [{"prompt": "Hi", "completion": "Hello", "label": True} for _ in range(4)]
    data[2] = {**data[2], **bad}
    kto = KTOPlugin(KTOConfig(), tokenizer=tokenizer)
    with pytest.raises((ValueError, TypeError), match=match):
        kto.prepare_dataset(data)


def test_mixed_plain_and_conversational_rows_are_refused(tokenizer):
    data = [{"prompt": "Hi", "completion": "Hello", "label": True},
            {"prompt": [{"role": "user", "content": "Hi"}], "completion": "Hello", "label": False}]
    kto = KTOPlugin(KTOConfig(), tokenizer=tokenizer)
    with pytest.raises((ValueError, TypeError)):
        kto.prepare_dataset(data)


def test_conversational_without_chat_template(tok):
    tok.chat_template = None
    kto = KTOPlugin(KTOConfig(), tokenizer=tok)
    with pytest.raises(ValueError, match="no chat template"):
        kto.prepare_dataset(conversational([{"prompt": "a", "completion": "b", "label": True}]))


def test_tokenizer_without_pad_uses_eos(tok):
    tok.pad_token = None
    kto = KTOPlugin(KTOConfig(), tokenizer=tok)
    assert kto.collator.pad_token_id == tok.eos_token_id


def test_max_completion_length_keeps_the_first_tokens_and_counts(rows, tokenizer):
    full = KTOPlugin(KTOConfig(max_length=None), tokenizer=tokenizer).prepare_dataset(rows[:20])
    kto = KTOPlugin(KTOConfig(max_length=None, max_completion_length=5), tokenizer=tokenizer)
    cut = kto.prepare_dataset(rows[:20])
    assert cut["prompt_ids"] == full["prompt_ids"]
    assert cut["completion_ids"] == [c[:5] for c in full["completion_ids"]]
    n_long = sum(len(c) > 5 for c in full["completion_ids"])
    assert n_long > 0
    assert kto.data_reports["train"].completion_limited == n_long
    assert "completions cut to max_completion_length" in kto.data_reports["train"].summary()
