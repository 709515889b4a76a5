"""precompute_ref_log_probs=True (case 7): parity with TRL 1.16's precompute, correct KL reference log-probs
under any sampler (fixed partners), the on-disk cache, no reference model kept, refusals."""

from __future__ import annotations

import copy
import gc
import logging

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import args, kto_trainer
from reference_cases import (
    lora_config,
    parity_args,
    parity_problems,
    peft_policy,
    run_ours,
    run_trl,
    train_and_evaluate,
)
from reference_impl import naive_completion_logps
from transformers import Trainer

from kto_plugin import KTOConfig, KTOPlugin
from kto_plugin.data._collator import bits_as_float32
from kto_plugin.demo import build_tiny_model
from kto_plugin.data._pairing import kl_partners

KTO = dict(beta=0.1, max_length=128, precompute_ref_log_probs=True)


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "ref_cache")


def _precompute(cache_dir, **kw):
    return {"precompute_ref_log_probs": True, "precompute_cache_dir": cache_dir, **kw}


# --- the fixed pairing ---


def test_kl_partners_are_the_collators_rotation_under_sequential_batches():
    assert kl_partners(7, 3).tolist() == [2, 0, 1, 5, 3, 4, 5]
    for n, group in [(10, 4), (8, 4), (5, 2), (3, 8)]:
        partners = kl_partners(n, group)
        for start in range(0, n, group):
            batch = list(range(start, min(start + group, n)))
            if len(batch) == 1:
                continue
            rotated = batch[-1:] + batch[:-1]  # KTOCollator / TRL: prompt i with completion i - 1
            assert partners[batch].tolist() == rotated
        assert all(partners[i] != i for i in range(n)), "every prompt meets another row's completion"


# --- parity with TRL 1.16's precompute_ref_log_probs=True ---


def _policies(kind, base_model, tokenizer):
    """(our policy, TRL's policy, our plugin kwargs, TRL kwargs, lora) for each way of holding the
    reference."""
    if kind == "plain":
        return copy.deepcopy(base_model), copy.deepcopy(base_model), {}, {}, False
    if kind == "ref_model":
        other = build_tiny_model(len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, seed=2)
        return (
            copy.deepcopy(base_model),
            copy.deepcopy(base_model),
            {"ref_model": copy.deepcopy(other)},
            {"ref_model": copy.deepcopy(other)},
            False,
        )
    if kind == "peft-null":
        policy = peft_policy(base_model, trained=False)
        return policy, copy.deepcopy(base_model), {}, {"peft_config": lora_config()}, True
    if kind == "peft-copy":
        policy = peft_policy(base_model, trained=True)
        return policy, copy.deepcopy(policy), {}, {}, True
    raise AssertionError(kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain", "ref_model", "peft-null", "peft-copy"])
def test_precompute_matches_trl(kind, base_model, tokenizer, rows, tmp_path, cache_dir):
    ours_model, trl_model, plugin_kwargs, trl_kwargs, lora = _policies(kind, base_model, tokenizer)
    a = parity_args(str(tmp_path / "out"), lora=lora)
    eval_rows = rows[-16:]
    trl = run_trl(trl_model, rows, tokenizer, {k: v for k, v in KTO.items()}, a, eval_rows, **trl_kwargs)
    if kind == "peft-null":
        trl.model.load_state_dict(
            ours_model.state_dict()
        )  # same lora_A (B = 0: the precompute is unaffected)
    ours, kto = run_ours(
        ours_model, rows, tokenizer, {**KTO, "precompute_cache_dir": cache_dir}, a, eval_rows, **plugin_kwargs
    )
    # the stored columns are TRL's: same target log-probs, and KL log-probs of the same (sequential) pairs
    for split in ("train_dataset", "eval_dataset"):
        theirs, mine = getattr(trl, split), getattr(ours, split)
        np.testing.assert_allclose(mine["ref_logps"], theirs["ref_logps"], rtol=2e-6, atol=2e-5)
        np.testing.assert_allclose(mine["ref_kl_logps"], theirs["ref_KL_logps"], rtol=2e-6, atol=2e-5)
    assert kto.reference.mode == {"plain": "initial_policy", "ref_model": "released"}.get(
        kind, kto.reference.mode
    )
    assert kto.reference.ref_model is None
    train_and_evaluate(trl, ours)
    assert parity_problems(trl.state.log_history, ours.state.log_history) == []
    assert max(abs(e.get("rewards/chosen", 0.0)) for e in ours.state.log_history) > 0.05


# --- correct KL reference log-probs whatever the sampler ---


def test_precomputed_kl_logps_are_right_for_the_pairs_built_under_shuffling(
    model, tokenizer, rows, tmp_path, cache_dir
):
    reference = copy.deepcopy(model).eval()
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, kto_kwargs=_precompute(cache_dir))
    kto.attach(trainer)
    data = trainer.train_dataset
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(3)).tolist()
    for start in (0, 8, 20):  # batches of 5 rows drawn from anywhere: not the 4-row groups of the precompute
        batch = kto.collator([data[i] for i in order[start : start + 5]])
        labels = batch["labels"]
        with torch.no_grad():
            for prefix, key in (("", "ref_logps_bits"), ("kl_", "ref_kl_logps_bits")):
                ids, mask = labels[f"{prefix}input_ids"], labels[f"{prefix}attention_mask"]
                logits = reference(input_ids=ids, attention_mask=mask).logits
                naive = naive_completion_logps(logits, ids, labels[f"{prefix}completion_labels"] != -100)
                torch.testing.assert_close(bits_as_float32(labels[key]), naive, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_shuffled_training_with_precompute_equals_a_live_reference(
    base_model, tokenizer, rows, tmp_path, cache_dir
):
    """Random sampler: precomputed reference log-probs give the run a live reference gives on the same
    pairs."""
    shuffled = dict(train_sampling_strategy="random", max_steps=6, learning_rate=1.0, optim="sgd")
    kto_pre, pre = kto_trainer(
        copy.deepcopy(base_model),
        tokenizer,
        rows,
        tmp_path / "a",
        kto_kwargs=_precompute(cache_dir),
        **shuffled,
    )
    kto_pre.attach(pre)
    # the same rows and partners, reference log-probs computed live from a frozen copy
    paired = pre.train_dataset.remove_columns(["ref_logps", "ref_kl_logps"])
    kto_live, live = kto_trainer(copy.deepcopy(base_model), tokenizer, rows, tmp_path / "b", **shuffled)
    live.train_dataset = paired
    kto_live.attach(live)
    assert kto_live.reference.mode == "model"
    pre.train()
    live.train()
    logs_pre = [e for e in pre.state.log_history if "loss" in e]
    logs_live = [e for e in live.state.log_history if "loss" in e]
    assert len(logs_pre) == 6 and any(e["kl"] > 0 for e in logs_pre)
    for a, b in zip(logs_pre, logs_live, strict=True):
        assert a.keys() == b.keys()
        for key in ("loss", "kl", "grad_norm", "logps/chosen", "rewards/chosen", "rewards/rejected"):
            if key in a:  # a shuffled batch may hold only one kind of row
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


# --- the cache ---


def test_second_run_reuses_the_cache_and_says_so(model, tokenizer, rows, tmp_path, cache_dir, caplog):
    kto, trainer = kto_trainer(
        copy.deepcopy(model),
        tokenizer,
        rows,
        tmp_path,
        eval_rows=rows[:16],
        kto_kwargs=_precompute(cache_dir),
    )
    kto.attach(trainer)
    assert kto._precomputer.last_source == {"train": "computed", "eval": "computed"}
    first = trainer.train_dataset
    kto2, trainer2 = kto_trainer(
        copy.deepcopy(model),
        tokenizer,
        rows,
        tmp_path,
        eval_rows=rows[:16],
        kto_kwargs=_precompute(cache_dir),
    )
    with caplog.at_level(logging.INFO, logger="kto_plugin"):
        kto2.attach(trainer2)
    assert kto2._precomputer.last_source == {"train": "cache", "eval": "cache"}
    n = len(trainer2.train_dataset)
    assert f"reference log-probs for train ({n} rows) loaded from cache {cache_dir}/" in caplog.text
    for column in ("ref_logps", "ref_kl_logps", "kl_completion_ids"):
        assert trainer2.train_dataset[column] == first[column]


@pytest.mark.parametrize("change", ["weights", "data", "max_length", "batch_size"])
def test_cache_key_covers_what_changes_the_values(change, model, tokenizer, rows, tmp_path, cache_dir):
    kto, trainer = kto_trainer(
        copy.deepcopy(model), tokenizer, rows, tmp_path, kto_kwargs=_precompute(cache_dir)
    )
    kto.attach(trainer)
    other_model, other_rows, kto_kwargs, arg_overrides = (
        copy.deepcopy(model),
        rows,
        _precompute(cache_dir),
        {},
    )
    if change == "weights":
        with torch.no_grad():
            other_model.lm_head.weight[0, 0] += 1e-3
    elif change == "data":
        other_rows = [dict(r, completion=r["completion"] + " extra") for r in rows]
    elif change == "max_length":
        kto_kwargs["max_length"] = 90
    else:  # the KL pairing groups rows by the per-device batch size
        arg_overrides["per_device_train_batch_size"] = 2
    kto2, trainer2 = kto_trainer(
        other_model, tokenizer, other_rows, tmp_path, kto_kwargs=kto_kwargs, **arg_overrides
    )
    kto2.attach(trainer2)
    assert kto2._precomputer.last_source["train"] == "computed"


def test_cache_can_be_turned_off(model, tokenizer, rows, tmp_path, cache_dir):
    kto, trainer = kto_trainer(
        model, tokenizer, rows, tmp_path, kto_kwargs=_precompute(cache_dir, precompute_cache=False)
    )
    kto.attach(trainer)
    assert "ref_logps" in trainer.train_dataset.column_names
    import os

    assert not os.path.exists(cache_dir)


# --- batch size, memory, later datasets, refusals ---


@pytest.mark.parametrize("batch_size,expected", [(None, 4), (8, 8)])
def test_precompute_ref_batch_size_is_honoured(
    batch_size, expected, model, tokenizer, rows, tmp_path, cache_dir
):
    seen = []
    handle = model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    kto, trainer = kto_trainer(
        model,
        tokenizer,
        rows,
        tmp_path,
        kto_kwargs=_precompute(cache_dir, precompute_ref_batch_size=batch_size, length_buckets="off"),
    )
    kto.attach(trainer)
    handle.remove()
    n = len(trainer.train_dataset)
    sizes = [expected] * (n // expected) + ([n % expected] if n % expected else [])
    # per batch: the prompts, then the target and the KL completions together (rows not split by length)
    assert seen == [n for s in sizes for n in (s, 2 * s)]


def test_no_reference_model_is_created_or_kept(model, tokenizer, rows, tmp_path, cache_dir):
    def alive():
        gc.collect()
        return sum(isinstance(o, type(model)) for o in gc.get_objects())

    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, kto_kwargs=_precompute(cache_dir))
    before = alive()
    kto.attach(trainer)
    assert alive() == before and kto.reference.ref_model is None and kto.reference.mode == "initial_policy"
    trainer.train()
    assert {"ref_logps", "ref_kl_logps", "kl_completion_ids"} <= set(trainer.train_dataset.column_names)


def test_given_ref_model_is_released_and_returned(model, tokenizer, rows, tmp_path, cache_dir):
    ref = build_tiny_model(len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, seed=2)
    kto, trainer = kto_trainer(
        model, tokenizer, rows, tmp_path, kto_kwargs=_precompute(cache_dir), plugin_kwargs={"ref_model": ref}
    )
    kto.attach(trainer)
    assert kto.reference.mode == "released" and kto.reference.given_ref_model is None
    assert all(m is not ref for m in trainer.accelerator._models)
    trainer.train()
    with pytest.raises(ValueError, match="released after the precompute pass"):
        trainer.evaluate(eval_dataset=trainer.train_dataset.remove_columns(["ref_logps", "ref_kl_logps"]))


def test_later_eval_datasets(model, tokenizer, rows, tmp_path, cache_dir):
    kto, trainer = kto_trainer(
        model, tokenizer, rows, tmp_path, kto_kwargs=_precompute(cache_dir), max_steps=1
    )
    kto.attach(trainer)
    raw_eval = kto.prepare_dataset(rows[:16], name="later")
    # before training the initial policy is still the reference: precompute it, or evaluate it live
    precomputed = kto.precompute_reference(raw_eval, name="later")
    first = trainer.evaluate(eval_dataset=precomputed)
    live = trainer.evaluate(eval_dataset=raw_eval)
    assert first["eval_rewards/chosen"] == live["eval_rewards/chosen"] == 0.0
    assert first["eval_loss"] == pytest.approx(live["eval_loss"], abs=1e-6)
    trainer.train()
    assert trainer.evaluate(eval_dataset=precomputed)["eval_rewards/chosen"] != 0.0
    with pytest.raises(ValueError, match="gone once training has taken a step"):
        trainer.evaluate(eval_dataset=raw_eval)


def test_peft_reference_serves_later_datasets_live(base_model, tokenizer, rows, tmp_path, cache_dir):
    policy = peft_policy(base_model, trained=False)
    kto, trainer = kto_trainer(
        policy, tokenizer, rows, tmp_path, kto_kwargs=_precompute(cache_dir), max_steps=2, learning_rate=1.0
    )
    kto.attach(trainer)
    trainer.train()
    raw_eval = kto.prepare_dataset(rows[:16], name="later")
    live = trainer.evaluate(eval_dataset=raw_eval)  # adapter off, no precompute needed
    stored = trainer.evaluate(eval_dataset=kto.precompute_reference(raw_eval, name="later"))
    assert live["eval_rewards/chosen"] != 0.0
    for key in ("eval_loss", "eval_rewards/chosen", "eval_kl"):
        assert live[key] == pytest.approx(stored[key], rel=1e-4, abs=1e-6), key


def test_apo_zero_unpaired_stores_no_kl_columns(model, tokenizer, rows, tmp_path, cache_dir):
    kto, trainer = kto_trainer(
        model, tokenizer, rows, tmp_path, kto_kwargs=_precompute(cache_dir, loss_type="apo_zero_unpaired")
    )
    kto.attach(trainer)
    assert "ref_logps" in trainer.train_dataset.column_names
    assert not {"ref_kl_logps", "kl_completion_ids"} & set(trainer.train_dataset.column_names)
    trainer.train()


def test_detach_restores_the_datasets(model, tokenizer, rows, tmp_path, cache_dir):
    kto, trainer = kto_trainer(
        model, tokenizer, rows, tmp_path, eval_rows=rows[:16], kto_kwargs=_precompute(cache_dir)
    )
    train, evaluation = trainer.train_dataset, trainer.eval_dataset
    kto.attach(trainer)
    assert trainer.train_dataset is not train
    kto.detach()
    assert trainer.train_dataset is train and trainer.eval_dataset is evaluation


def test_iterable_dataset_is_refused_with_the_reason(model, tokenizer, rows, tmp_path, cache_dir):
    kto = KTOPlugin(KTOConfig(max_length=96, **_precompute(cache_dir)), tokenizer=tokenizer)
    stream = kto.prepare_dataset(rows).to_iterable_dataset()
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=stream, data_collator=kto.collator)
    with pytest.raises(
        ValueError, match="train dataset: it is an IterableDataset.*stores the results as columns"
    ):
        kto.attach(trainer)
    assert trainer.compute_loss_func is None


def test_unprepared_dataset_is_refused(model, tokenizer, rows, tmp_path, cache_dir):
    kto = KTOPlugin(KTOConfig(max_length=96, **_precompute(cache_dir)), tokenizer=tokenizer)
    trainer = Trainer(
        model=model, args=args(tmp_path), train_dataset=Dataset.from_list(rows), data_collator=kto.collator
    )
    with pytest.raises(ValueError, match="lacks .*prompt_ids.*prepare_dataset"):
        kto.attach(trainer)


def test_reattach_after_the_given_ref_model_was_released_is_refused(model, tokenizer, rows, tmp_path, cache_dir):
    """attach() releases a given ref_model after its precompute pass; a second attach (after detach, or
    after an attach that failed late) must not silently take a frozen copy of the policy as the reference."""
    ref = build_tiny_model(len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, seed=2)
    kto, trainer = kto_trainer(
        model, tokenizer, rows[:16], tmp_path, kto_kwargs=_precompute(cache_dir), plugin_kwargs={"ref_model": ref}
    )
    kto.attach(trainer)
    kto.detach()
    before = dict(vars(trainer))
    with pytest.raises(ValueError, match=r"ref_model given to KTOPlugin was released"):
        kto.attach(trainer)
    assert kto.trainer is None and vars(trainer).keys() == before.keys()


# --- progress the user sees ---


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_pass_progress_estimates_the_pass_then_the_time_left():
    from kto_plugin.reference._precompute import PassProgress

    clock, lines = _Clock(), []
    progress = PassProgress("reference log-probs for train", total=10, rows=80, every_s=30.0, clock=clock,
                            log=lambda fmt, *a: lines.append(fmt % a))
    clock.now += 2.0
    progress.step(1)  # 2 s for one batch of 10: about 20 s for the pass
    assert lines == ["kto_plugin: reference log-probs for train: 80 rows in 10 batches; the first took 2.0 s, "
                     "so the pass takes about 20 s"]
    clock.now += 8.0
    progress.step(2)  # 8 s after the last line: nothing (every 30 s)
    clock.now += 30.0
    progress.step(5)  # 40 s for 5 batches: 8 s each, 5 left -> 40 s
    assert lines[1:] == ["kto_plugin: reference log-probs for train: 5/10 batches (50%) in 40 s, about 40 s left"]
    clock.now += 600.0
    progress.step(10)  # the last batch: the caller's own line says how long the pass took
    assert len(lines) == 2


def test_pass_progress_is_silent_on_other_processes_and_for_one_batch():
    from kto_plugin.data._report import duration
    from kto_plugin.reference._precompute import PassProgress

    lines = []
    PassProgress("x", total=10, rows=80, log=None).step(1)
    PassProgress("x", total=1, rows=8, log=lambda *a: lines.append(a)).step(1)
    assert lines == []
    assert [duration(s) for s in (4.25, 42, 210, 7200)] == ["4.2 s", "42 s", "3.5 min", "2.0 h"]


def test_precompute_logs_an_estimate_and_the_time_it_took(model, tokenizer, rows, tmp_path, cache_dir, caplog):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, kto_kwargs=_precompute(cache_dir))
    with caplog.at_level(logging.INFO, logger="kto_plugin"):
        kto.attach(trainer)
    n = len(trainer.train_dataset)
    batches = -(-n // 4)  # per_device_train_batch_size=4
    assert batches > 1
    assert f"reference log-probs for train: {n} rows in {batches} batches; the first took " in caplog.text
    assert "so the pass takes about " in caplog.text
    assert f"reference log-probs for train ({n} rows, batch 4) computed in " in caplog.text
