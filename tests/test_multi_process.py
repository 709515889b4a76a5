"""Two processes on CPU (torchrun, gloo): ranks agree, and the 2-process run equals a 1-process run where the
math says it must.

One torchrun launch runs every 2-process set-up (`examples/multi_process.py --setup ...`); the 1-process
comparisons run in this process through the same function. Data order: a sequential sampler; with 2
processes, accelerate deals per-device batches of 4 alternately to rank 0 and 1, so one optimizer step of
"2 processes x batch 4 x accumulation A" sees the same rows as "1 process x batch 8 x accumulation A", and
the same micro-batches as "1 process x batch 4 x accumulation 2A". Desirable rows only (`--desirable_only`):
the policy then raises completion log-probs in general, so z0 leaves its clamp at 0 and is compared for real.

* `apo_zero_unpaired` (no z0): the gradient is the mean of per-example gradients over the same rows either
  way, so every step matches.
* `kto`, ``kl_estimate="batch"``: z0 is estimated per micro-batch across processes: over 8 pairs (two
  ranks x 4, each pairing within its 4 rows) with 2 processes, over the 8 rows of one batch (pairing within
  8) with 1 process. At step 1 policy = reference, so z0 = 0 in both and step 1 matches; later steps differ.
* `kto`, ``kl_estimate="window"``: z0 over every micro-batch of the window on every rank: 2 processes x
  accumulation 2 equals 1 process x accumulation 4 (same micro-batches, same pairs) at every step, and
  1 process x accumulation 2 (window) equals 2 processes x accumulation 1 (batch).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import load_script, torchrun_two

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "multi_process.py"
pytestmark = pytest.mark.slow

TWO_PROCESS = {
    "full-kto-batch-4-2": "full,kto,batch,4,2",
    "lora-kto-batch-4-2": "lora,kto,batch,4,2",
    "full-apo_zero_unpaired-batch-4-2": "full,apo_zero_unpaired,batch,4,2",
    "full-kto-window-4-2": "full,kto,window,4,2",
    "full-kto-batch-4-1": "full,kto,batch,4,1",
}


@pytest.fixture(scope="module")
def example():
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def two_process(tmp_path_factory):
    """{setup name: [rank 0 result, rank 1 result]} from one torchrun launch."""
    out = tmp_path_factory.mktemp("two_process")
    args = ["--output_dir", str(out / "runs"), "--results_dir", str(out / "results"), "--desirable_only"]
    for setup in TWO_PROCESS.values():
        args += ["--setup", setup]
    proc = torchrun_two(SCRIPT, *args)
    assert proc.stdout.count("weights identical on every rank: True") == len(TWO_PROCESS), proc.stdout
    return {
        name: [torch.load(out / "results" / f"{name}.rank{r}.pt", weights_only=False) for r in (0, 1)]
        for name in TWO_PROCESS
    }


def _one_process(example, tmp_path, setup):
    return example.train_once(example.parse_run(setup), str(tmp_path), desirable_only=True)


def _assert_weights_close(a, b, **tol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tol)


TOL = dict(rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", list(TWO_PROCESS))
def test_ranks_end_identical(two_process, name):
    rank0, rank1 = two_process[name]
    assert len(rank0["kl"]) == len(rank0["loss"]) == 4
    for key in rank0["weights"]:
        assert torch.equal(rank0["weights"][key], rank1["weights"][key]), key
    assert rank0["kl"] == rank1["kl"]
    assert rank0["loss"] == rank1["loss"]
    # evaluation (16 rows, 8 per rank): metrics reduced inside the loss call, the same on both ranks
    assert {"eval_kl", "eval_rewards/chosen", "eval_logps/chosen", "eval_loss"} <= rank0["eval"].keys()
    assert rank0["eval"] == rank1["eval"]


def test_training_moved_the_weights_and_z0(two_process):
    # not vacuous: the runs compared above train (weights change) and z0 leaves 0 after step 1 for kto
    for name in ("full-kto-batch-4-2", "full-kto-window-4-2", "full-kto-batch-4-1"):
        kl = two_process[name][0]["kl"]
        assert kl[0] == 0.0 and all(k > 0 for k in kl[1:]), (name, kl)
    lora = two_process["lora-kto-batch-4-2"][0]
    assert any(w.abs().sum() > 0 for n, w in lora["weights"].items() if "lora_B" in n)


def test_apo_zero_unpaired_equals_one_process_doubled_batch(two_process, example, tmp_path):
    two = two_process["full-apo_zero_unpaired-batch-4-2"][0]
    one = _one_process(example, tmp_path, "full,apo_zero_unpaired,batch,8,2")
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
    _assert_weights_close(one["weights"], two["weights"], **TOL)


def test_kto_batch_estimate_matches_doubled_batch_at_step_one_only(two_process, example, tmp_path):
    two = two_process["full-kto-batch-4-2"][0]
    one = _one_process(example, tmp_path, "full,kto,batch,8,2")
    _assert_weights_close(one["first_step_weights"], two["first_step_weights"], **TOL)
    assert one["kl"][0] == two["kl"][0] == 0.0
    # from step 2 on, z0 comes from differently paired rows: the estimates differ
    assert one["kl"][1:] != pytest.approx(two["kl"][1:], rel=1e-3)


def test_kto_window_estimate_equals_one_process_longer_window(two_process, example, tmp_path):
    two = two_process["full-kto-window-4-2"][0]
    one = _one_process(example, tmp_path, "full,kto,window,4,4")
    assert any(k > 0 for k in one["kl"]), one["kl"]
    assert one["kl"] == pytest.approx(two["kl"], rel=1e-4, abs=1e-7)
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
    _assert_weights_close(one["weights"], two["weights"], **TOL)


def test_one_process_window_equals_two_processes_batch(two_process, example, tmp_path):
    two = two_process["full-kto-batch-4-1"][0]
    one = _one_process(example, tmp_path, "full,kto,window,4,2")
    assert any(k > 0 for k in one["kl"]), one["kl"]
    assert one["kl"] == pytest.approx(two["kl"], rel=1e-4, abs=1e-7)
    _assert_weights_close(one["weights"], two["weights"], **TOL)


def test_fsdp2_reference_prepared_sharded_frozen_and_exact():
    """FSDP2 on CPU with gloo: `prepare_reference` shards the reference, frozen, eval mode, same logits.

    (accelerate 1.15 turns FSDP on only for accelerator devices, so a Trainer on CPU cannot run FSDP; the
    script hands `prepare_reference` accelerate's own FSDP plugin, as the Trainer would on GPUs.)
    """
    proc = torchrun_two(ROOT / "tests" / "scripts" / "fsdp_reference.py", timeout=300)
    assert "FSDP-REFERENCE-OK" in proc.stdout


def test_nonfinite_on_one_rank_is_reported_and_skipped_on_both():
    """`on_nonfinite="skip"`: a NaN row that only rank 1 trains on is reported on both ranks with its row index
    and drops step 2's update on both, so the ranks stay identical. `on_nonfinite="raise"`: both ranks raise in
    step 2 with the same message and stay in step (a barrier after it passes), within the subprocess timeout: nothing
    hangs (`tests/scripts/nonfinite_two_process.py`)."""
    proc = torchrun_two(ROOT / "tests" / "scripts" / "nonfinite_two_process.py", timeout=300)
    assert "NONFINITE-OK" in proc.stdout
    assert "NONFINITE-RAISE-OK" in proc.stdout
