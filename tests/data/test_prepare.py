"""prepare_dataset: token ids identical to TRL 1.16's KTOTrainer for every format, and clear errors for bad rows."""

from __future__ import annotations

import copy
import json
import logging
import re
import warnings

import pytest
from datasets import Dataset, DatasetDict, IterableDataset

from kto_plugin import KTOConfig, KTOPlugin
from kto_plugin.data._formats import extract_prompt
from kto_plugin.demo import load_hh_pairs
from kto_plugin import KTOPluginWarning

TOOLS = json.dumps([{"type": "function", "function": {"name": "lookup", "description": "Look a word up",
                                                        "parameters": {"type": "object", "properties": {}}}}])
SYSTEM = {"role": "system", "content": "Be harmless."}


def trl_prepared(rows, tokenizer, model, tmp_path, max_length):
    from trl import KTOConfig as TRLKTOConfig
    from trl import KTOTrainer

    args = TRLKTOConfig(output_dir=str(tmp_path), max_length=max_length, per_device_train_batch_size=2,
                        report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False)
    trainer = KTOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return trainer.train_dataset


def prepare(kto, data, name="train"):
    """kto.prepare_dataset, expecting the one-label warning exactly when the kept rows have one label."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", KTOPluginWarning)
        out = kto.prepare_dataset(data, name=name)
    report = kto.data_reports[name]
    one_label = report.n_desirable == 0 or report.n_undesirable == 0
    assert [w for w in caught if issubclass(w.category, KTOPluginWarning)] == ([] if not one_label else caught[-1:])
    return out


def messages(text):
    """HH-RLHF's '\\n\\nHuman: ...\\n\\nAssistant: ...' as a list of messages."""
    parts = re.split(r"\n\n(Human|Assistant): ", text)
    return [{"role": "user" if role == "Human" else "assistant", "content": content}
            for role, content in zip(parts[1::2], parts[2::2])]


def conversational(rows):
    out = []
    for i, r in enumerate(rows):
        prompt = [{"role": "user", "content": r["prompt"].strip()}]
        if i % 3 == 0:
            prompt = [SYSTEM] + prompt
        out.append({
            "prompt": prompt,
            "completion": [{"role": "assistant", "content": r["completion"].strip()}],
            "label": r["label"],
            "tools": TOOLS if i % 4 == 0 else None,
        })
    return out


def paired_rows(kind, n=12):
    out = []
    for i, pair in enumerate(load_hh_pairs(n)):
        if kind == "implicit":
            out.append(dict(pair))
        elif kind == "paired":
            prompt, good, bad = extract_prompt(pair["chosen"], pair["rejected"])
            out.append({"prompt": prompt, "chosen": good, "rejected": bad})
        else:
            chosen, rejected = messages(pair["chosen"]), messages(pair["rejected"])
            if i % 3 == 0:
                chosen, rejected = [SYSTEM] + chosen, [SYSTEM] + rejected
            row = {"chosen": chosen, "rejected": rejected, "tools": TOOLS if i % 2 == 0 else None}
            if kind == "paired_conversational":
                shared = next(j for j, (a, b) in enumerate(zip(chosen, rejected)) if a != b)
                row = {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:],
                       "tools": row["tools"]}
            out.append(row)
    return out


def assert_same_tokens(ours, theirs):
    assert ours["prompt_ids"] == theirs["prompt_ids"]
    assert ours["completion_ids"] == theirs["completion_ids"]
    assert ours["label"] == theirs["label"]


@pytest.mark.parametrize("kind", ["plain", "conversational"])
@pytest.mark.parametrize("max_length", [64, 1024])
def test_token_ids_identical_to_trl(kind, max_length, rows, tokenizer, model, tmp_path):
    data = rows[:40] if kind == "plain" else conversational(rows[:40])
    theirs = trl_prepared(data, tokenizer, model, tmp_path, max_length)
    kto = KTOPlugin(KTOConfig(max_length=max_length), tokenizer=tokenizer)
    ours = prepare(kto, data)
    assert_same_tokens(ours, theirs)
    report = kto.data_reports["train"]
    assert report.rows_in == 40 and report.rows_out == len(theirs)
    assert report.dropped_prompt_too_long == 40 - len(theirs)
    if kind == "plain":  # BOS added, EOS appended to the completion
        assert all(p[0] == tokenizer.bos_token_id for p in ours["prompt_ids"])
        assert all(c[-1] == tokenizer.eos_token_id for c in ours["completion_ids"])


@pytest.mark.parametrize("kind", ["paired", "implicit", "paired_conversational", "implicit_conversational"])
def test_paired_formats_identical_to_trl(kind, tokenizer, model, tmp_path):
    data = paired_rows(kind)
    max_length = 1024 if "conversational" in kind else 160  # 160: some prompts dropped, some rows truncated
    theirs = trl_prepared(data, tokenizer, model, tmp_path, max_length)
    kto = KTOPlugin(KTOConfig(max_length=max_length), tokenizer=tokenizer)
    ours = prepare(kto, data)
    assert_same_tokens(ours, theirs)
    report = kto.data_reports["train"]
    assert report.rows_in == 12 and report.rows_out == len(theirs)
    assert report.format == ("paired" if kind.startswith("paired") else "implicit_prompt")
    assert report.conversational == ("conversational" in kind)
    if "conversational" in kind:  # the system turn and the tools are in the rendered prompt
        assert all(p[0] == tokenizer.bos_token_id for p in ours["prompt_ids"])
        assert "<|tools|>" in tokenizer.decode(ours["prompt_ids"][0])
        assert "Be harmless." in tokenizer.decode(ours["prompt_ids"][0])
    else:
        assert report.dropped_prompt_too_long > 0 and report.truncated > 0


def test_paired_order_trl_blocks_and_interleaved(tokenizer):
    from trl.data_utils import unpair_preference_dataset

    pairs = [{"prompt": f"Q{i}", "chosen": f" yes {i}", "rejected": f" no {i}", "id": i} for i in range(1100)]
    theirs = unpair_preference_dataset(Dataset.from_list(pairs))  # TRL 1.16's unpairing, as KTOTrainer calls it
    kto = KTOPlugin(KTOConfig(), tokenizer=tokenizer)
    ours = kto.prepare_dataset(pairs)
    assert list(zip(ours["id"], ours["label"])) == list(zip(theirs["id"], theirs["label"]))
    assert ours["label"][:1000] == [True] * 1000  # the first 1000 pairs' chosen rows come first
    kto = KTOPlugin(KTOConfig(paired_order="interleaved"), tokenizer=tokenizer)
    inter = kto.prepare_dataset(pairs)
    assert list(zip(inter["id"], inter["label"])) == [(i, lab) for i in range(1100) for lab in (True, False)]
    assert kto.data_reports["train"].order == "interleaved"


def counting_stream(rows, seen):
    def gen():
        for row in rows:
            seen.append(1)
            yield row

    return IterableDataset.from_generator(gen)


@pytest.mark.parametrize("order", ["trl", "interleaved"])
def test_iterable_dataset_is_prepared_lazily(order, tokenizer):
    pairs = paired_rows("implicit", n=40) * 100  # 4000 pairs
    seen = []
    kto = KTOPlugin(KTOConfig(max_length=160, paired_order=order), tokenizer=tokenizer)
    stream = kto.prepare_dataset(counting_stream(pairs, seen))
    assert isinstance(stream, IterableDataset)
    assert len(seen) <= 1  # preparation read at most the first row
    first = list(stream.take(10))
    assert len(seen) < 1200  # one batch of 1000 pairs (and a little look-ahead), not the 4000
    whole = KTOPlugin(KTOConfig(max_length=160, paired_order=order), tokenizer=tokenizer)
    expected = whole.prepare_dataset(pairs[:1000])
    for got, want in zip(first, expected.select(range(10))):
        assert (got["prompt_ids"], got["completion_ids"], got["label"]) == (
            want["prompt_ids"], want["completion_ids"], want["label"])
    report = kto.data_reports["train"]
    assert report.streaming and report.rows_in == 1000 and report.dropped_prompt_too_long > 0
    assert report.dropped_prompt_too_long == whole.data_reports["train"].dropped_prompt_too_long
    assert report.dropped_rows == whole.data_reports["train"].dropped_rows
    assert report.dropped_rows == [i for i, pair in enumerate(pairs[:40]) if trl_prompt_length(pair, tokenizer) >= 160][:10]


def trl_prompt_length(pair, tokenizer):
    """Tokens TRL keeps as the prompt of a pair's rows (the longer of the two), from TRL's own functions."""
    from trl.data_utils import common_prefix_length, extract_prompt

    ex = extract_prompt(pair)
    prompt = tokenizer(ex["prompt"])["input_ids"]
    return max(common_prefix_length(prompt, tokenizer(ex["prompt"] + ex[side] + tokenizer.eos_token)["input_ids"])
               for side in ("chosen", "rejected"))


def test_dataset_dict_list_and_dict_of_columns(rows, tokenizer):
    kto = KTOPlugin(KTOConfig(max_length=512), tokenizer=tokenizer)
    dd = kto.prepare_dataset(DatasetDict(train=Dataset.from_list(rows[:10]), test=Dataset.from_list(rows[10:14])))
    assert set(dd) == {"train", "test"} and len(dd["test"]) == kto.data_reports["test"].rows_out
    assert kto.prepare_dataset(rows[:6], name="list")["prompt_ids"] == dd["train"]["prompt_ids"][:6]
    columns = {k: [r[k] for r in rows[:6]] for k in ("prompt", "completion", "label")}
    assert kto.prepare_dataset(columns, name="columns")["completion_ids"] == dd["train"]["completion_ids"][:6]
    from datasets import IterableDatasetDict

    kto = KTOPlugin(KTOConfig(max_length=512), tokenizer=tokenizer)  # the splits' names again: a new plugin
    streams = kto.prepare_dataset(IterableDatasetDict(
        train=Dataset.from_list(rows[:10]).to_iterable_dataset(), test=Dataset.from_list(rows[10:14]).to_iterable_dataset()))
    assert isinstance(streams, IterableDatasetDict) and set(streams) == {"train", "test"}
    assert [r["prompt_ids"] for r in streams["test"]] == dd["test"]["prompt_ids"]
    assert kto.data_reports["test"].streaming and kto.data_reports["test"].rows_in == 4


def test_second_run_loads_from_cache(rows, tokenizer, tmp_path):
    import datasets

    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:20]))
    data = Dataset.from_json(str(path), cache_dir=str(tmp_path / "cache"))
    kto = KTOPlugin(KTOConfig(max_length=128), tokenizer=tokenizer)
    first = kto.prepare_dataset(data)
    files = sorted(p.name for p in (tmp_path / "cache").rglob("*.arrow"))
    assert len(files) == 2  # the input and the prepared split

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    ds_logger = datasets.utils.logging.get_logger("datasets.arrow_dataset")
    level = ds_logger.level
    ds_logger.addHandler(handler)
    ds_logger.setLevel(logging.INFO)
    try:  # a new plugin and a copy of the tokenizer, as a second run would have
        again = KTOPlugin(KTOConfig(max_length=128), tokenizer=copy.deepcopy(tokenizer)).prepare_dataset(data)
    finally:
        ds_logger.removeHandler(handler)
        ds_logger.setLevel(level)
    assert any("Loading cached processed dataset" in r.getMessage() for r in records)
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.arrow")) == files  # nothing new written
    assert again["prompt_ids"] == first["prompt_ids"] and again["completion_ids"] == first["completion_ids"]
    # a changed setting that changes the tokens is not served from the cache
    other = KTOPlugin(KTOConfig(max_length=128, max_prompt_length=16), tokenizer=tokenizer).prepare_dataset(data)
    assert max(len(p) for p in other["prompt_ids"]) <= 16


def test_truncation_coherent_with_the_collator(rows, tokenizer):
    for mode, max_prompt in (("keep_start", None), ("keep_end", None), ("keep_end", 24), ("keep_start", 24)):
        kto = KTOPlugin(KTOConfig(max_length=48, truncation_mode=mode, max_prompt_length=max_prompt),
                        tokenizer=tokenizer)
        data = prepare(kto, rows)
        report = kto.data_reports["train"]
        batch = kto.collator(list(data))
        kept = batch["attention_mask"].sum(1).tolist()
        comp_kept = (batch["labels"]["completion_labels"] != -100).sum(1).tolist()
        full = [len(p) + len(c) for p, c in zip(data["prompt_ids"], data["completion_ids"])]
        assert max(kept) <= 48
        assert report.truncated == sum(k < f for k, f in zip(kept, full))
        assert report.completion_truncated == sum(k < len(c) for k, c in zip(comp_kept, data["completion_ids"]))
        assert min(comp_kept) > 0  # every row keeps completion tokens
        if mode == "keep_end":
            assert report.dropped_prompt_too_long == 0 and report.rows_out == len(rows)
        if max_prompt is not None:
            assert max(len(p) for p in data["prompt_ids"]) <= 24 and report.prompt_truncated > 0
            assert all(p[0] == tokenizer.bos_token_id for p in data["prompt_ids"])


# --- validation ---


@pytest.mark.parametrize(
    "columns,match",
    [
        (("prompt", "completions", "label"), r"no 'completion' column.*Did you mean 'completions'.*Rename it"),
        (("prompt", "completion"), r"no 'label' column"),
        (("prompt", "chosen", "rejcted"), r"no 'rejected' column.*Did you mean 'rejcted'"),
        (("prompt", "chosen_response", "rejected_response"), r"no 'chosen' column.*Did you mean 'chosen_response'"),
    ],
)
def test_missing_column_suggests_the_closest(tokenizer, columns, match):
    kto = KTOPlugin(KTOConfig(), tokenizer=tokenizer)
    row = {c: (True if c == "label" else "text") for c in columns}
    with pytest.raises(ValueError, match=match):
        kto.prepare_dataset([row])
    with pytest.raises(ValueError, match=match):
        kto.prepare_dataset(Dataset.from_list([row]))


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"label": "yes"}, r"train dataset, row 2: 'label' is 'yes' \(str\); it must be a bool.*Convert"),
        ({"label": 1.0}, r"row 2: 'label' is 1.0 \(float\)"),
        ({"label": [True, False]}, r"row 2: 'label' is \[True, False\].*holds 2 values.*dict of lists"),
        ({"completion": ""}, r"row 2: 'completion' is ''.*Filter"),
        ({"prompt": None}, r"row 2: 'prompt' is None"),
        ({"completion": [{"role": "assistant", "content": "x"}]}, r"row 2: 'completion' is conversational but row 0"),
    ],
)
def test_bad_rows_name_the_row(tokenizer, bad, match):
    data = [{"prompt": "Hi", "completion": "Hello", "label": i % 2 == 0} for i in range(4)]
    data[2] = {**data[2], **bad}
    kto = KTOPlugin(KTOConfig(), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=match):
        kto.prepare_dataset(data)


def test_bad_values_in_an_arrow_dataset_name_the_row(tokenizer):
    kto = KTOPlugin(KTOConfig(), tokenizer=tokenizer)
    data = Dataset.from_dict({"prompt": ["a", "b", "c"], "completion": ["x", "y", "z"], "label": ["yes", "no", "no"]})
    with pytest.raises(ValueError, match=r"row 0: 'label' is 'yes'"):
        kto.prepare_dataset(data)
    data = Dataset.from_dict({"prompt": ["a", "b", "c"], "chosen": ["x", None, "z"], "rejected": ["u", "v", "w"]})
    with pytest.raises(ValueError, match=r"row 1: 'chosen' is None"):
        kto.prepare_dataset(data)


def test_implicit_prompt_without_shared_start(tokenizer):
    kto = KTOPlugin(KTOConfig(), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"row 1: 'chosen' and 'rejected' share no common start.*'prompt' column"):
        kto.prepare_dataset([{"chosen": "Q: a? A: b", "rejected": "Q: a? A: c"}, {"chosen": "x", "rejected": "y"}])


def test_mixed_plain_and_conversational_rows_are_refused(tokenizer):
    data = [{"prompt": "Hi", "completion": "Hello", "label": True},
            {"prompt": [{"role": "user", "content": "Hi"}], "completion": "Hello", "label": False}]
    kto = KTOPlugin(KTOConfig(), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"row 1: 'prompt' is conversational but row 0 is plain text"):
        kto.prepare_dataset(data)


def test_dict_of_columns_with_a_short_label_column(tokenizer):
    kto = KTOPlugin(KTOConfig(), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"column 'label' has 2 values but 'prompt' has 3"):
        kto.prepare_dataset({"prompt": ["a", "b", "c"], "completion": ["x", "y", "z"], "label": [True, False]})


def test_conversational_without_chat_template(tok):
    tok.chat_template = None
    kto = KTOPlugin(KTOConfig(), tokenizer=tok)
    with pytest.raises(ValueError, match=r"no chat template.*tokenizer.chat_template ="):
        kto.prepare_dataset(conversational([{"prompt": "a", "completion": "b", "label": True}]))


def test_tokenizer_without_pad_uses_eos_and_says_so(tok, caplog):
    tok.pad_token = None
    with caplog.at_level(logging.WARNING, logger="kto_plugin"):
        kto = KTOPlugin(KTOConfig(), tokenizer=tok)
    assert kto.collator.pad_token_id == tok.eos_token_id
    assert "no pad token; using its EOS token" in caplog.text


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


def test_tokenizer_without_eos(tok):
    tok.pad_token = "<pad>"
    tok.eos_token = None
    kto = KTOPlugin(KTOConfig(), tokenizer=tok)
    with pytest.raises(ValueError, match=r"no eos_token.*tokenizer.eos_token ="):
        kto.prepare_dataset([{"prompt": "a", "completion": "b", "label": True}])
    tok.pad_token = None
    with pytest.raises(ValueError, match=r"neither a pad token nor an EOS token"):
        KTOPlugin(KTOConfig(), tokenizer=tok)


def test_num_proc_gives_the_same_rows(tokenizer):
    pairs = paired_rows("implicit", n=30)
    one = KTOPlugin(KTOConfig(max_length=160), tokenizer=tokenizer)
    two = KTOPlugin(KTOConfig(max_length=160, dataset_num_proc=2), tokenizer=tokenizer)
    a, b = prepare(one, pairs), prepare(two, pairs)
    assert_same_tokens(a, b)
    assert one.data_reports["train"] == two.data_reports["train"]


def test_completion_empty_after_tokenization(tok):
    tok.chat_template = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    kto = KTOPlugin(KTOConfig(), tokenizer=tok)
    data = [{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Yo"}],
             "label": True}]
    with pytest.raises(ValueError, match=r"row 0: 'completion' has no tokens after the prompt"):
        kto.prepare_dataset(data)


def test_prompts_longer_than_max_length_are_dropped_and_counted(rows, tokenizer, caplog):
    kto = KTOPlugin(KTOConfig(max_length=40), tokenizer=tokenizer)
    with caplog.at_level(logging.INFO, logger="kto_plugin"):
        out = prepare(kto, rows)
    report = kto.data_reports["train"]
    lengths = [len(tokenizer(r["prompt"])["input_ids"]) for r in rows]
    assert report.dropped_prompt_too_long == sum(n >= 40 for n in lengths) > 0
    assert report.dropped_rows == [i for i, n in enumerate(lengths) if n >= 40][:10]
    assert report.rows_out == len(out) == report.rows_in - report.dropped_prompt_too_long
    assert all(len(p) < 40 for p in out["prompt_ids"])
    assert len([r for r in caplog.records if "prepared train" in r.message]) == 1  # reported once
    assert "dropped: prompt alone >= max_length" in caplog.text and "keep_end" in caplog.text
    with pytest.raises(ValueError, match=r"every row's prompt is at least max_length=4 tokens.*keep_end"):
        KTOPlugin(KTOConfig(max_length=4), tokenizer=tokenizer).prepare_dataset(rows)


@pytest.mark.parametrize("label", [True, False])
def test_one_label_only_warns_and_still_prepares(tokenizer, label):
    data = [{"prompt": f"Q{i}", "completion": " A", "label": label} for i in range(4)]
    kto = KTOPlugin(KTOConfig(), tokenizer=tokenizer)
    kind = "desirable" if label else "undesirable"
    with pytest.warns(KTOPluginWarning, match=rf"only {kind} rows \(4\). KTO still runs"):
        out = kto.prepare_dataset(data)
    assert len(out) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error", KTOPluginWarning)
        KTOPlugin(KTOConfig(warn_guidance=False), tokenizer=tokenizer).prepare_dataset(data)  # silenced


def test_balance_report_suggests_desirable_weight(tokenizer):
    data = [{"prompt": f"Q{i}", "completion": " A", "label": i < 2} for i in range(8)]  # 2 desirable, 6 undesirable
    kto = KTOPlugin(KTOConfig(), tokenizer=tokenizer)
    kto.prepare_dataset(data)
    # eq. 8: 1 <= w * 2 / (1 * 6) <= 4/3  =>  w in [3, 4]
    assert re.search(r"= 0\.33, outside .*\[1, 4/3\].*desirable_weight in \[3\.00, 4\.00\]",
                     kto.data_reports["train"].balance)
    kto = KTOPlugin(KTOConfig(desirable_weight=3.5), tokenizer=tokenizer)
    kto.prepare_dataset(data)
    assert kto.data_reports["train"].balance is None


def test_a_prepared_stream_trains(model, tokenizer, tmp_path):
    import math

    from transformers import Trainer

    from helpers import args

    pairs = paired_rows("implicit", n=8)

    def gen():
        yield from pairs

    kto = KTOPlugin(KTOConfig(max_length=96, truncation_mode="keep_end", paired_order="interleaved"),
                    tokenizer=tokenizer)
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=2),
                      train_dataset=kto.prepare_dataset(IterableDataset.from_generator(gen)),
                      data_collator=kto.collator)
    kto.attach(trainer)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    report = kto.data_reports["train"]
    assert report.rows_in == 8 and report.rows_out == 16 and report.n_desirable == report.n_undesirable == 8


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_precomputed_reference_uses_the_same_truncation(mode, base_model, tokenizer, rows, tmp_path):
    """Reference log-probs precomputed at attach() are those of the sequences the documented rule keeps."""
    import torch
    from transformers import Trainer

    from helpers import args
    from reference_impl import naive_completion_logps

    kto = KTOPlugin(KTOConfig(max_length=48, max_prompt_length=24 if mode == "keep_end" else None,
                              truncation_mode=mode, precompute_ref_log_probs=True, precompute_cache=False),
                    tokenizer=tokenizer)
    data = prepare(kto, rows[:16])
    trainer = Trainer(model=copy.deepcopy(base_model), args=args(tmp_path), train_dataset=data,
                      data_collator=kto.collator)
    kto.attach(trainer)
    stored = trainer.train_dataset["ref_logps"]
    assert kto.data_reports["train"].truncated > 0
    for row, ref in zip(data, stored):
        prompt, completion = row["prompt_ids"], row["completion_ids"]
        if len(prompt) + len(completion) > 48:  # the rule docs/data.md "Truncation" states
            if mode == "keep_start":
                completion = completion[: 48 - len(prompt)]
            else:
                prompt = prompt[len(prompt) + len(completion) - 48:] if len(completion) < 48 else prompt[:1]
                completion = completion if len(completion) < 48 else completion[:47]
        ids = torch.tensor([prompt + completion])
        mask = torch.tensor([[0] * len(prompt) + [1] * len(completion)])
        with torch.no_grad():
            expected = naive_completion_logps(base_model(ids).logits, ids, mask)[0].item()
        assert ref == pytest.approx(expected, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("chosen,rejected", [
    ("The sky is blue.", "The sky is green."),  # a space before the divergence goes to the completions
    ("Same text", "Same text"),
    ("Short", "Short and longer"),
    ("Q: x? A: yes", "Q: x? A:  no"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
     [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}]),
    ([{"role": "user", "content": "a"}], [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}]),
])
def test_extract_prompt_is_trls(chosen, rejected):
    from trl.data_utils import extract_prompt as trl_extract_prompt

    from kto_plugin.data._formats import extract_prompt

    theirs = trl_extract_prompt({"chosen": chosen, "rejected": rejected})
    assert extract_prompt(chosen, rejected) == (theirs["prompt"], theirs["chosen"], theirs["rejected"])


def test_an_empty_stream_is_refused_with_a_clear_error(tokenizer):
    from datasets import Features, Value

    features = Features({"prompt": Value("string"), "completion": Value("string"), "label": Value("bool")})
    empty = IterableDataset.from_generator(lambda: iter([]), features=features)
    with pytest.raises(ValueError, match="train dataset is an empty stream: there are no rows to train on"):
        KTOPlugin(KTOConfig(), tokenizer=tokenizer).prepare_dataset(empty)


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_report_truncation_counts_match_what_the_collator_cuts(tokenizer, rows, mode):
    from tokenizers import processors

    no_bos = copy.deepcopy(tokenizer)
    no_bos.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # a prompt whose tokens merge into the completion's ("th" + "e cat"), so it keeps no token of its own
    splits = [("th", "e cat is here"), ("Hum", "an: hello there"), ("yo", "u are right"), ("wh", "at is it")]
    prompt, completion = next((p, c) for p, c in splits
                              if no_bos.tokenize(p)[0] != no_bos.tokenize(p + c + no_bos.eos_token)[0])
    data = [dict(r) for r in rows[:12]] + [{"prompt": prompt, "completion": completion + " again", "label": True},
                                          {"prompt": prompt, "completion": completion, "label": False}]
    max_length = 24
    kto = KTOPlugin(KTOConfig(max_length=max_length, truncation_mode=mode), tokenizer=no_bos)
    prepared = prepare(kto, data)
    assert prepared[-1]["prompt_ids"] == [] and len(prepared[-1]["completion_ids"]) < max_length
    kto = KTOPlugin(KTOConfig(max_length=len(prepared[-1]["completion_ids"]), truncation_mode=mode), tokenizer=no_bos)
    prepared = prepare(kto, data)
    truncated = completion_truncated = 0
    batch = kto.collator(list(prepared))  # the reference: what the collator keeps of each row
    for i, row in enumerate(prepared):
        kept = int(batch["attention_mask"][i].sum())
        kept_completion = int((batch["labels"]["completion_labels"][i] != -100).sum())
        truncated += kept < len(row["prompt_ids"]) + len(row["completion_ids"])
        completion_truncated += kept_completion < len(row["completion_ids"])
    report = kto.data_reports["train"]
    assert (report.truncated, report.completion_truncated) == (truncated, completion_truncated)
    assert truncated > 0


def test_an_empty_dict_of_columns_is_refused_with_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match=r"train dataset is an empty dict: no columns.*'completion', 'label'"):
        KTOPlugin(KTOConfig(), tokenizer=tokenizer).prepare_dataset({})


def test_a_list_that_is_not_messages_names_its_row(tokenizer, rows):
    data = [dict(r) for r in rows[:4]]
    data[1]["completion"] = ["Sure.", "No."]  # a list of strings: neither text nor {'role', 'content'} messages
    kto = KTOPlugin(KTOConfig(), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"row 1: 'completion' is a list of str, not a string or a list of "):
        kto.prepare_dataset(data)
    every = Dataset.from_list([{**r, "completion": [r["completion"]]} for r in rows[:4]])  # Arrow accepts these
    with pytest.raises(ValueError, match=r"row 0: 'completion' is a list of str, not a string or a list of "):
        kto.prepare_dataset(every)


def test_preparation_logs_one_line_with_counts_and_time(tokenizer, rows, caplog):
    kto = KTOPlugin(KTOConfig(max_length=1024), tokenizer=tokenizer)
    with caplog.at_level(logging.INFO, logger="kto_plugin"):
        kto.prepare_dataset(rows[:20])
        kto.prepare_dataset(IterableDataset.from_generator(lambda: iter(rows[:4])), name="stream")
    lines = [r.getMessage() for r in caplog.records if "prepared" in r.getMessage()]
    assert len(lines) == 2
    assert re.fullmatch(r"kto_plugin: prepared train \(unpaired\): 20 rows from 20 input rows; 10 desirable / "
                        r"10 undesirable; prepared in \d+\.\d s", lines[0]), lines[0]
    assert kto.data_reports["train"].seconds > 0
    # a stream is prepared as it is read: no time, and the counts are those read so far
    assert "streaming: counts so far" in lines[1] and "prepared in" not in lines[1]
