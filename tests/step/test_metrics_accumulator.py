"""The metrics accumulator: one running sum and count per name, however long the run."""

from __future__ import annotations

import json

import pytest
from helpers import kto_trainer
from transformers import TrainerCallback

from kto_plugin import hookimpl
from kto_plugin.step._metrics import MetricsAccumulator



def _leaves(tree):
    """Every leaf of a nested dict, as (path, value)."""
    if isinstance(tree, dict):
        return [(f"{k}/{p}", v) for k, sub in tree.items() for p, v in _leaves(sub)]
    return [("", tree)]


def test_accumulator_holds_sums_and_counts_not_values():
    acc = MetricsAccumulator()
    values = [0.1 * i for i in range(10_000)]
    for v in values:
        acc.add("train", "kl", v)
        acc.add("eval", "kl", -v)
    acc.set_latest("train", "num_tokens", 7)
    leaves = _leaves(acc.state_dict())
    assert len(leaves) == 5  # sums and counts for two (mode, name) pairs, one latest value
    assert all(type(v) in (float, int) for _, v in leaves)
    out = acc.pop("train")
    assert out == {"kl": pytest.approx(sum(values) / len(values), rel=1e-12), "num_tokens": 7.0}
    assert acc.pop("train") == {}  # pop resets the mode
    assert acc.pop("eval")["kl"] == pytest.approx(-sum(values) / len(values), rel=1e-12)


def test_accumulator_state_survives_json_exactly():
    """The state goes into trainer_state.json on every checkpoint: the round trip must be bit-exact."""
    acc = MetricsAccumulator()
    for v in (0.1, 1 / 3, -2.5e-7, 1e300):
        acc.add("train", "rewards/chosen", v)
    copy = MetricsAccumulator()
    copy.load_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert copy.pop("train") == acc.pop("train")


class _Recorder:
    """A `kto_metrics` plugin that keeps what it reported, to average independently of the accumulator."""

    def __init__(self):
        self.values = []

    @hookimpl
    def kto_metrics(self, policy_logps):
        value = float(policy_logps.mean())
        self.values.append(value)
        return {"test/mean_logps": value}


class _Probe(TrainerCallback):
    def __init__(self, accumulator, at):
        self.accumulator, self.at, self.seen = accumulator, at, {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.at:
            self.seen[state.global_step] = _leaves(self.accumulator.state_dict())
            self.seen[-state.global_step] = _leaves(state.stateful_callbacks.get("kto_plugin", {}))


@pytest.mark.slow
def test_accumulator_memory_is_constant_over_a_long_interval(model, tokenizer, rows, tmp_path):
    recorder = _Recorder()
    kto, trainer = kto_trainer(model, tokenizer, rows[:16], tmp_path, plugin_kwargs={"plugins": [recorder]},
                               kto_kwargs={"max_length": 48, "warn_guidance": False},
                               per_device_train_batch_size=2, max_steps=50, logging_steps=50)
    kto.attach(trainer)
    probe = _Probe(kto.metrics, at={5, 50})
    trainer.add_callback(probe)
    trainer.train()
    early, late = dict(probe.seen[5]), dict(probe.seen[50])
    assert early.keys() == late.keys()  # same names after 5 and after 50 micro-batches: no per-step entries
    assert all(type(v) in (float, int) for v in late.values())  # numbers, not tensors or lists
    assert early["counts/train/kl/"] == 5 and late["counts/train/kl/"] == 50
    # what each checkpoint would carry (tests/trainer/test_resume.py) does not grow either
    assert dict(probe.seen[-5]).keys() == dict(probe.seen[-50]).keys()
    assert len(probe.seen[-50]) < 50
    log = next(e for e in trainer.state.log_history if e.get("step") == 50 and "kl" in e)
    assert len(recorder.values) == 50
    assert log["test/mean_logps"] == pytest.approx(sum(recorder.values) / 50, rel=1e-12)
