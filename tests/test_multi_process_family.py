"""The KTO family's state on two processes (one torchrun launch, tests/scripts/family_two_process.py): both ranks hold
the same running mean and moving average, equal to what every rank's rows give, updated when the docs say; BCO on
2 processes x batch 4 equals 1 process x batch 8 (same rows per micro-batch, same count-weighted mean)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from helpers import load_script, torchrun_two

SCRIPT = Path(__file__).resolve().parent / "scripts" / "family_two_process.py"
pytestmark = pytest.mark.slow
STEPS, ACCUMULATION, BATCH = 3, 2, 4


@pytest.fixture(scope="module")
def two_process(tmp_path_factory):
    """{set-up: [rank 0 result, rank 1 result]} from one torchrun launch."""
    out = tmp_path_factory.mktemp("family_two_process")
    torchrun_two(SCRIPT, str(out))
    return {name: [torch.load(out / f"{name}.rank{r}.pt", weights_only=False) for r in (0, 1)]
            for name in load_script(SCRIPT).SETUPS}


@pytest.mark.parametrize("name", list(load_script(SCRIPT).SETUPS))
def test_ranks_hold_the_same_state_logs_and_weights(two_process, name):
    rank0, rank1 = two_process[name]
    assert rank0["state"] == rank1["state"]
    assert rank0["logs"] == rank1["logs"] and len(rank0["logs"]) == STEPS
    assert all(torch.equal(rank0["weights"][k], rank1["weights"][k]) for k in rank0["weights"])
    # not vacuous: each rank saw its own rows
    assert not torch.equal(torch.cat(rank0["log_ratios"]), torch.cat(rank1["log_ratios"]))


def test_bco_running_mean_is_over_every_rank_and_micro_batch(two_process):
    rank0, rank1 = two_process["bco"]
    assert len(rank0["log_ratios"]) == STEPS * ACCUMULATION  # updated once per micro-batch
    rewards = _in_order(rank0, rank1)
    state = rank0["state"]["builtin:bco"]
    assert state["count"] == len(rewards) == STEPS * ACCUMULATION * BATCH * 2
    assert state["reward_sum"] / state["count"] == pytest.approx(math.fsum(rewards) / len(rewards), rel=1e-5)
    # delta after each micro-batch: the mean of every rank's rows so far; a step's log averages its micro-batches'
    per_batch = 2 * BATCH
    deltas = [math.fsum(rewards_so_far) / len(rewards_so_far)
              for rewards_so_far in (rewards[: per_batch * (k + 1)]
                                     for k in range(STEPS * ACCUMULATION))]
    for step, log in enumerate(rank0["logs"]):
        window = deltas[step * ACCUMULATION : (step + 1) * ACCUMULATION]
        assert log["bco/delta"] == pytest.approx(sum(window) / len(window), rel=1e-5, abs=1e-7)


def _in_order(rank0, rank1):
    """Every rank's rewards, micro-batch by micro-batch (rank 0's then rank 1's rows of each)."""
    beta = rank0["beta"]
    return [beta * float(r) for mine, theirs in zip(rank0["log_ratios"], rank1["log_ratios"])
            for r in torch.cat([mine, theirs])]


@pytest.mark.parametrize("name,updates", [("ema_batch", STEPS * ACCUMULATION), ("ema_window", STEPS)])
def test_ema_is_of_every_rank_pairs_updated_per_micro_batch_or_per_window(two_process, name, updates):
    rank0, rank1 = two_process[name]
    assert len(rank0["kl_log_ratios"]) == len(rank1["kl_log_ratios"]) == updates
    value, values = None, []
    for mine, theirs in zip(rank0["kl_log_ratios"], rank1["kl_log_ratios"]):
        pairs = [float(r) for r in torch.cat([mine, theirs])]
        estimate = max(0.0, math.fsum(pairs) / len(pairs))
        value = estimate if value is None else 0.5 * value + 0.5 * estimate
        values.append(value)
    assert value > 0
    assert rank0["state"]["builtin:ema"]["value"] == pytest.approx(value, rel=1e-5)
    # the logged kl: z0 of each micro-batch, averaged over the step's (the window's z0 serves all of them)
    per_step = [values[s * updates // STEPS : (s + 1) * updates // STEPS] for s in range(STEPS)]
    assert [h["kl"] for h in rank0["logs"]] == pytest.approx([sum(v) / len(v) for v in per_step], rel=1e-5)


def test_bco_on_two_processes_equals_one_process_with_the_doubled_batch(two_process, tmp_path):
    two = two_process["bco"][0]
    one = load_script(SCRIPT).run("bco", str(tmp_path), batch=2 * BATCH, accumulation=ACCUMULATION)
    assert one["state"]["builtin:bco"]["count"] == two["state"]["builtin:bco"]["count"]
    assert one["state"]["builtin:bco"]["reward_sum"] == pytest.approx(two["state"]["builtin:bco"]["reward_sum"],
                                                                      rel=1e-4)
    assert [h["loss"] for h in one["logs"]] == pytest.approx([h["loss"] for h in two["logs"]], rel=1e-5)
    for key in two["weights"]:
        torch.testing.assert_close(one["weights"][key], two["weights"][key], rtol=1e-4, atol=1e-6, msg=key)
