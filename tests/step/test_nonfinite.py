"""`KTOConfig.on_nonfinite`: a NaN injected into chosen rows is reported with the step and their row indices;
"raise" stops, "skip" drops exactly that step's update, "warn" goes on. DeepSpeed refuses "skip".

Injection: a forward hook on the policy's embedding (registered after `attach`, so a frozen-copy reference
stays clean) turns to NaN the rows of a batch whose token ids are one of the poisoned sequences.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from transformers import TrainerCallback

from kto_plugin import NonFiniteLossError
from kto_plugin import KTOPluginWarning

from helpers import kto_trainer

BATCH = 4


def poison(model, sequences, pad_id, prefix=False):
    """NaN the embedding output of every row whose non-pad token ids equal one of `sequences` (`prefix`: of every row
    that starts with one)."""
    targets = [torch.tensor(s) for s in sequences]

    def hook(module, inputs, output):
        ids = inputs[0]
        out = output.clone()
        for i, row in enumerate(ids):
            for seq in targets:
                n = len(seq)
                if n <= len(row) and torch.equal(row[:n], seq) and (prefix or n == len(row) or row[n] == pad_id):
                    out[i] = float("nan")
        return out

    return model.get_input_embeddings().register_forward_hook(hook)


def target_sequence(ds, i, max_length=96):
    return (list(ds[i]["prompt_ids"]) + list(ds[i]["completion_ids"]))[:max_length]


def kl_sequence(ds, i, max_length=96):
    """The KL row of position `i`: its prompt with the previous row's completion (within its batch)."""
    partner = i - 1 if i % BATCH else i + BATCH - 1
    return (list(ds[i]["prompt_ids"]) + list(ds[partner]["completion_ids"]))[:max_length]


def kl_completion(ds, i, max_length=96):
    """The completion tokens of that KL row: what the policy's KL pass runs when it reuses the prompt's cache."""
    return kl_sequence(ds, i, max_length)[len(ds[i]["prompt_ids"]):]


class WeightsPerStep(TrainerCallback):
    def __init__(self, model):
        self.model = model
        self.steps = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.steps[state.global_step] = {n: p.detach().clone() for n, p in self.model.named_parameters()}


def assert_only_update_dropped(weights, step):
    """The weights after `step` equal those before it; the next step updates them again, to finite values."""
    for name, value in weights.steps[step].items():
        assert torch.equal(value, weights.steps[step - 1][name]), name
    after = weights.steps[step + 1]
    assert any(not torch.equal(after[n], weights.steps[step][n]) for n in after)
    assert all(torch.isfinite(v).all() for v in after.values())


# A NaN in a target row reaches the KL pair of the same prompt when the policy's KL pass reuses the prompt's keys and
# values (kto_plugin.step._shared_prompt; test_target_row_nan_reaches_its_prompts_kl_pair), and the report then
# names z0 too. The injection here NaNs one exact row (a real NaN in a completion reaches every row holding it, the
# KL row of the next prompt too), so the tests of a target row's report run full rows (reuse_prompt_cache=False).
def setup(model, tokenizer, rows, tmp_path, policy, loss_type="kto", kl_estimate="batch", reuse_prompt_cache=False,
          **overrides):
    kto_kwargs = {"on_nonfinite": policy, "loss_type": loss_type, "kl_estimate": kl_estimate, "warn_guidance": False,
                  "reuse_prompt_cache": reuse_prompt_cache}
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, kto_kwargs=kto_kwargs,
                               per_device_train_batch_size=BATCH, max_steps=3, **overrides)
    kto.attach(trainer)
    return kto, trainer, trainer.train_dataset


# position 5 of the sequential order: step 2 (rows 4..7), second row of the batch
POSITION = 5


def test_raise_names_step_and_row(model, tokenizer, rows, tmp_path):
    kto, trainer, ds = setup(model, tokenizer, rows, tmp_path, "raise", loss_type="apo_zero_unpaired")
    row = ds[POSITION]["row_index"]
    poison(model, [target_sequence(ds, POSITION)], tokenizer.pad_token_id)
    with pytest.raises(NonFiniteLossError, match=rf"rows \[{row}\] at training step 2\b"):
        trainer.train()
    assert trainer.state.global_step == 1


def test_row_index_is_the_row_of_the_input(model, tokenizer, rows, tmp_path):
    kto, trainer, ds = setup(model, tokenizer, rows, tmp_path, "raise")
    assert len(ds) < len(rows)  # some rows were dropped (prompt too long), so index != position
    for i in (0, POSITION, len(ds) - 1):
        with warnings.catch_warnings():  # one row holds one label: warned unless warn_guidance is off
            warnings.simplefilter("ignore", KTOPluginWarning)
            alone = kto.prepare_dataset([rows[ds[i]["row_index"]]], name="check")
        assert alone[0]["prompt_ids"] == ds[i]["prompt_ids"]
        assert alone[0]["completion_ids"] == ds[i]["completion_ids"]


@pytest.mark.parametrize("reuse_prompt_cache", [True, False])
def test_nonfinite_z0_reports_the_kl_pair_rows(model, tokenizer, rows, tmp_path, reuse_prompt_cache):
    kto, trainer, ds = setup(model, tokenizer, rows, tmp_path, "raise", reuse_prompt_cache=reuse_prompt_cache)
    assert kto.loss_hook.passes.policy_sharing.on is reuse_prompt_cache
    row = ds[POSITION]["row_index"]
    if reuse_prompt_cache:  # the KL pass runs the KL completions only, against the prompt's cache
        poison(model, [kl_completion(ds, POSITION)], tokenizer.pad_token_id, prefix=True)
    else:
        poison(model, [kl_sequence(ds, POSITION)], tokenizer.pad_token_id)
    expected = rf"z0 = nan \(from the KL pairs of rows \[{row}\]\) at training step 2"
    with pytest.raises(NonFiniteLossError, match=expected):
        trainer.train()


def test_target_row_nan_reaches_its_prompts_kl_pair(model, tokenizer, rows, tmp_path):
    kto, trainer, ds = setup(model, tokenizer, rows, tmp_path, "raise", reuse_prompt_cache=True)
    row = ds[POSITION]["row_index"]
    poison(model, [target_sequence(ds, POSITION)], tokenizer.pad_token_id)
    expected = rf"rows \[{row}\] and the reference point z0 = nan \(from the KL pairs of rows \[{row}\]\) at training step 2"
    with pytest.raises(NonFiniteLossError, match=expected):
        trainer.train()


def test_window_estimate_reports_nonfinite_z0(model, tokenizer, rows, tmp_path):
    kto, trainer, ds = setup(model, tokenizer, rows, tmp_path, "raise", kl_estimate="window",
                             gradient_accumulation_steps=2)
    row = ds[POSITION]["row_index"]  # step 1 of a window of 2 micro-batches: rows 0..7
    poison(model, [kl_sequence(ds, POSITION)], tokenizer.pad_token_id)
    with pytest.raises(NonFiniteLossError, match=rf"KL pairs of rows \[{row}\]\) at training step 1\b"):
        trainer.train()


def test_skip_drops_exactly_that_update(model, tokenizer, rows, tmp_path):
    kto, trainer, ds = setup(model, tokenizer, rows, tmp_path, "skip")
    weights = WeightsPerStep(model)
    trainer.add_callback(weights)
    row = ds[POSITION]["row_index"]
    poison(model, [target_sequence(ds, POSITION)], tokenizer.pad_token_id)
    with pytest.warns(KTOPluginWarning, match=rf"rows \[{row}\] at training step 2\b.*update is skipped"):
        trainer.train()
    assert kto.nonfinite.skipped_steps == [2]
    assert_only_update_dropped(weights, 2)


def test_warn_goes_on_and_updates(model, tokenizer, rows, tmp_path):
    kto, trainer, ds = setup(model, tokenizer, rows, tmp_path, "warn")
    weights = WeightsPerStep(model)
    trainer.add_callback(weights)
    row = ds[POSITION]["row_index"]
    poison(model, [target_sequence(ds, POSITION)], tokenizer.pad_token_id)
    with pytest.warns(KTOPluginWarning) as record:
        trainer.train()
    assert re.search(rf"rows \[{row}\] at training step 2\b", str(record[0].message))
    assert not any("skipped" in str(w.message) for w in record)
    assert kto.nonfinite.skipped_steps == []
    assert trainer.state.global_step == 3
    # the NaN gradient went into the update: what "skip" prevents
    assert any(not torch.isfinite(weights.steps[2][n]).all() for n in weights.steps[2])


def test_eval_reports_the_evaluation_step(model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, kto_kwargs={"warn_guidance": False, "reuse_prompt_cache": False},
                               eval_rows=rows, per_device_eval_batch_size=BATCH)
    kto.attach(trainer)
    ds = trainer.eval_dataset
    poison(model, [target_sequence(ds, 1)], tokenizer.pad_token_id)
    with pytest.warns(KTOPluginWarning, match=rf"rows \[{ds[1]['row_index']}\] at evaluation at step 0"):
        trainer.evaluate()


def test_skip_refused_under_deepspeed(model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, kto_kwargs={"on_nonfinite": "skip"})
    trainer.is_deepspeed_enabled = True
    with pytest.raises(NotImplementedError, match="on_nonfinite='skip' is not supported under DeepSpeed"):
        kto.attach(trainer)


def test_on_nonfinite_validated():
    from kto_plugin import KTOConfig

    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        KTOConfig(on_nonfinite="ignore")


def test_window_estimate_with_skip_drops_exactly_that_window(model, tokenizer, rows, tmp_path):
    """kl_estimate="window" + on_nonfinite="skip": a non-finite KL pair in the second window makes that
    window's z0 non-finite for both its micro-batches; only step 2's update is dropped, once."""
    kto, trainer, ds = setup(model, tokenizer, rows, tmp_path, "skip", kl_estimate="window",
                             gradient_accumulation_steps=2)
    weights = WeightsPerStep(model)
    trainer.add_callback(weights)
    position = 2 * BATCH + 1  # step 2's window holds positions 8..15
    row = ds[position]["row_index"]
    poison(model, [kl_sequence(ds, position)], tokenizer.pad_token_id)
    with pytest.warns(KTOPluginWarning, match=rf"KL pairs of rows \[{row}\]\) at training step 2\b.*skipped"):
        trainer.train()
    assert kto.nonfinite.skipped_steps == [2]
    assert_only_update_dropped(weights, 2)


class StopAfterFirstMicroBatch(TrainerCallback):
    """Interrupts training between the micro-batches of a window (as a KeyboardInterrupt in a notebook)."""

    def on_substep_end(self, args, state, control, **kwargs):
        raise RuntimeError("interrupted")


def test_skip_pending_from_an_interrupted_run_does_not_drop_a_later_update(model, tokenizer, rows, tmp_path):
    """A non-finite micro-batch marks its window's update to be dropped; if training stops before that update,
    the mark must not carry over to the next run's first (finite) step."""
    kto, trainer, ds = setup(model, tokenizer, rows, tmp_path, "skip", gradient_accumulation_steps=2)
    handle = poison(model, [target_sequence(ds, 1)], tokenizer.pad_token_id)  # step 1, first micro-batch
    stop = StopAfterFirstMicroBatch()
    trainer.add_callback(stop)
    with pytest.warns(KTOPluginWarning, match="update is skipped"), pytest.raises(RuntimeError, match="interrupted"):
        trainer.train()
    handle.remove()
    trainer.remove_callback(stop)
    weights = WeightsPerStep(model)
    trainer.add_callback(weights)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()  # the rows are fine now: every update is applied
    assert kto.nonfinite.skipped_steps == []
    assert any(not torch.equal(weights.steps[1][n], before[n]) for n in before)
