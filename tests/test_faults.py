"""Fault injection: what a user sees, and what is kept, when a file is damaged, a disk fills or a run is killed.

Every fault is injected for real: cache files are truncated or emptied on disk, the cache's writer raises the
`OSError` of a full disk, runs are SIGKILLed at a deterministic point (a save function patched in the child kills
its own process), a real stream holds a malformed row 5000, and under torchrun a real process dies or hangs.
docs/faults.md lists each fault with the test that injects it (`test_the_faults_table_names_a_test_for_each_fault`).

Killed runs are children forked from the test process (`killed_at_fault_point`): a fresh interpreter would spend
about 5 s importing torch and transformers per fault, a fork starts at once with the model, tokenizer and data
already built. Each child is bounded by a timeout, so a bug cannot hang the suite; the resumed or next run then
runs here, and is compared with an uninterrupted run.
"""

from __future__ import annotations

import copy
import errno
import io
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from datasets import IterableDataset
from helpers import KTO_KEYS, assert_same_weights, kto_trainer, logged, train_run

from kto_plugin import KTOConfig, KTOPlugin, KTOPluginWarning
from kto_plugin.reference import _cache
from kto_plugin.trainer._checkpoints import checkpoint_problem

ROOT = Path(__file__).resolve().parents[1]


def killed_at_fault_point(run, timeout: float = 120) -> None:
    """Run `run()` in a forked child, which must kill its own process (SIGKILL, `die`) at its fault point."""
    child = multiprocessing.get_context("fork").Process(target=run)
    child.start()
    child.join(timeout)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"the child did not reach its fault point within {timeout} s")
    assert child.exitcode == -signal.SIGKILL, f"the child ended with exit code {child.exitcode}, not killed at its fault point"


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# --- the reference log-prob cache ---

def precompute_run(base_model, tokenizer, rows, out, cache_dir, eval_rows=None, cache=True):
    """A plugin attached with precompute_ref_log_probs=True over 16 input rows (10 prepared: 3 batches of 4) and
    `eval_rows`."""
    kto, trainer = kto_trainer(
        copy.deepcopy(base_model), tokenizer, rows[:16], out, eval_rows=eval_rows, max_steps=1,
        kto_kwargs={"max_length": 256, "precompute_ref_log_probs": True, "precompute_cache_dir": str(cache_dir),
                    "precompute_cache": cache, "warn_guidance": False},
    )
    kto.attach(trainer)
    return kto, trainer


def precomputed(dataset):
    return {c: dataset[c] for c in ("ref_logps", "ref_kl_logps", "kl_completion_ids")}


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path):
    path.write_bytes(b"")


def _rewrite_as_format(version):
    def rewrite(path):
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files if k != "format"}
        if version is not None:
            arrays["format"] = np.int64(version)
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    return rewrite


DAMAGE = {
    # the bug this issue found: np.load raised zipfile.BadZipFile, which the reader did not catch
    "truncated": (_truncate, r"it cannot be read \(BadZipFile: File is not a zip file\); it is truncated or damaged"),
    "emptied": (_empty, r"it cannot be read \(EOFError: No data left in file\); it is truncated or damaged"),
    "older_format": (_rewrite_as_format(None), rf"it has no format number, this version reads format {_cache.CACHE_FORMAT}"),
    "newer_format": (_rewrite_as_format(_cache.CACHE_FORMAT + 1),
                     rf"it has format {_cache.CACHE_FORMAT + 1}, this version reads format {_cache.CACHE_FORMAT}"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_cache_file_is_ignored_recomputed_and_rewritten(damage, base_model, tokenizer, rows, tmp_path):
    cache = tmp_path / "cache"
    _, first = precompute_run(base_model, tokenizer, rows, tmp_path / "first", cache)
    [path] = cache.glob("*.npz")
    files = sorted(p.name for p in cache.iterdir())
    assert files == sorted([path.name, path.with_suffix(".json").name])
    corrupt, why = DAMAGE[damage]
    corrupt(path)
    with pytest.warns(KTOPluginWarning, match=rf"ignoring the reference log-prob cache file {re.escape(str(path))}: "
                                              rf"{why}\. The log-probs are computed again and the file is rewritten"):
        kto, second = precompute_run(base_model, tokenizer, rows, tmp_path / "second", cache)
    assert kto._precomputer.last_source == {"train": "computed"}
    assert precomputed(second.train_dataset) == precomputed(first.train_dataset)
    assert sorted(p.name for p in cache.iterdir()) == files  # rewritten under its name; no temporary file
    kto, third = precompute_run(base_model, tokenizer, rows, tmp_path / "third", cache)  # whole again: no warning
    assert kto._precomputer.last_source == {"train": "cache"}
    assert precomputed(third.train_dataset) == precomputed(first.train_dataset)


def test_a_cache_file_with_other_columns_or_rows_is_ignored(tmp_path):
    """A file under the right name that holds what this run cannot use (a KL column missing, another row count)."""
    cache = _cache.RefLogpsCache(str(tmp_path))
    assert cache.save("key", {"ref_logps": np.zeros(3, np.float32)}, {}) == str(tmp_path / "key.npz")
    with pytest.warns(KTOPluginWarning, match=r"key\.npz: it lacks \['kl_partner'\] \(it holds \['ref_logps'\]\)"):
        assert cache.load("key", 3, ("ref_logps", "kl_partner")) is None
    with pytest.warns(KTOPluginWarning, match=r"key\.npz: its arrays have \{'ref_logps': 3\} rows, the dataset has 4"):
        assert cache.load("key", 4) is None
    assert cache.load("key", 3)["ref_logps"].tolist() == [0.0, 0.0, 0.0]


def _disk_full_in_savez(monkeypatch):
    def savez(file, **arrays):
        file.write(b"\0" * 512)  # some bytes reached the file before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "savez", savez)
    return r"\[Errno 28\] No space left on device"


def _io_error_in_fsync(monkeypatch):
    def fsync(fd):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "fsync", fsync)
    return r"\[Errno 5\] Input/output error"


@pytest.mark.parametrize("failure", [_disk_full_in_savez, _io_error_in_fsync], ids=["disk_full", "io_error"])
def test_a_cache_write_that_fails_leaves_no_file_and_the_run_goes_on(failure, base_model, tokenizer, rows, tmp_path,
                                                                     monkeypatch):
    cache = tmp_path / "cache"
    _, uncached = precompute_run(base_model, tokenizer, rows, tmp_path / "uncached", cache, cache=False)
    error = failure(monkeypatch)
    with pytest.warns(KTOPluginWarning, match=rf"could not write the reference log-prob cache {re.escape(str(cache))}"
                                              rf"/\w+\.npz \({error}\)\. Training goes on"):
        kto, trainer = precompute_run(base_model, tokenizer, rows, tmp_path / "failed", cache)
    assert list(cache.iterdir()) == []  # neither the file, nor its description, nor a temporary file
    assert precomputed(trainer.train_dataset) == precomputed(uncached.train_dataset)
    trainer.train()
    assert trainer.state.global_step == 1
    monkeypatch.undo()
    kto, _ = precompute_run(base_model, tokenizer, rows, tmp_path / "next", cache)
    assert kto._precomputer.last_source == {"train": "computed"} and len(list(cache.glob("*.npz"))) == 1


# --- a run killed during the precompute pass ---

def _kill_in_the_eval_pass(monkeypatch):
    """Killed after the first batch of the eval dataset's pass (the train dataset's is done and cached)."""
    from kto_plugin.reference import _precompute

    real = _precompute.compute_reference_logps

    def compute(dataset, collator, run_batch, *args, desc, **kwargs):
        calls = []

        def batch(labels):
            calls.append(1)
            if "eval" in desc and len(calls) == 2:
                die()
            return run_batch(labels)
        return real(dataset, collator, batch, *args, desc=desc, **kwargs)
    monkeypatch.setattr(_precompute, "compute_reference_logps", compute)


def _kill_in_the_eval_write(monkeypatch):
    """Killed half-way through writing the eval dataset's array file (the second one written)."""
    real = np.savez
    calls = []

    def savez(file, **arrays):
        calls.append(1)
        if len(calls) < 2:
            return real(file, **arrays)
        data = io.BytesIO()
        real(data, **arrays)
        file.write(data.getvalue()[: len(data.getvalue()) // 2])
        file.flush()
        die()
    monkeypatch.setattr(np, "savez", savez)


@pytest.mark.parametrize("fault", [_kill_in_the_eval_pass, _kill_in_the_eval_write], ids=["in_the_pass", "in_the_write"])
def test_a_run_killed_during_precompute_leaves_only_complete_work(fault, base_model, tokenizer, rows, tmp_path,
                                                                  monkeypatch):
    """The next run reuses what was complete (the train dataset's file) and computes the rest (eval's) again."""
    cache = tmp_path / "cache"
    eval_rows = rows[16:24]

    def run():
        fault(monkeypatch)
        precompute_run(base_model, tokenizer, rows, tmp_path / "killed", cache, eval_rows=eval_rows)

    killed_at_fault_point(run)
    left = sorted(p.name for p in cache.iterdir())
    assert len([n for n in left if n.endswith(".npz")]) == 1  # the train dataset's; nothing of eval's under its key
    temporary = [n for n in left if ".tmp-" in n]
    assert len(temporary) == (1 if fault is _kill_in_the_eval_write else 0)
    kto, trainer = precompute_run(base_model, tokenizer, rows, tmp_path / "next", cache, eval_rows=eval_rows)
    assert kto._precomputer.last_source == {"train": "cache", "eval": "computed"}
    _, uncached = precompute_run(base_model, tokenizer, rows, tmp_path / "uncached", cache, eval_rows=eval_rows,
                                 cache=False)
    assert precomputed(trainer.train_dataset) == precomputed(uncached.train_dataset)
    assert precomputed(trainer.eval_dataset) == precomputed(uncached.eval_dataset)
    now = sorted(p.name for p in cache.iterdir())
    assert len(now) == 4 and not [n for n in now if ".tmp-" in n]  # the killed writer's temporary file is gone


# --- a run killed while writing a checkpoint ---

SYNC = {"sync_ref_model": True, "ref_model_sync_steps": 1, "ref_model_mixup_alpha": 0.6}


def _kill_after_the_weights(monkeypatch):
    """checkpoint-4: the model's weights written, then killed before the optimizer's state."""
    from transformers import Trainer

    real = Trainer._save_optimizer_and_scheduler

    def save(self, output_dir):
        if self.state.global_step == 4:
            die()
        return real(self, output_dir)
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", save)


def _kill_in_trainer_state(monkeypatch):
    """checkpoint-4: every file written but half of trainer_state.json (the Trainer's last file)."""
    from transformers import TrainerState

    real = TrainerState.save_to_json

    def save(self, json_path):
        if self.global_step != 4:
            return real(self, json_path)
        real(self, json_path)
        text = Path(json_path).read_text()
        Path(json_path).write_text(text[: len(text) // 2])
        die()
    monkeypatch.setattr(TrainerState, "save_to_json", save)


def _kill_after_the_synced_reference(monkeypatch):
    """sync_ref_model, checkpoint-4: kto_ref_model.safetensors written, killed before the Trainer's files."""
    from kto_plugin.trainer import _resume

    real = _resume.save_reference

    def save(trainer, reference, directory):
        path = real(trainer, reference, directory)
        if directory.endswith("checkpoint-4"):
            die()
        return path
    monkeypatch.setattr(_resume, "save_reference", save)


def _kill_in_the_synced_reference(monkeypatch):
    """sync_ref_model, checkpoint-4: killed half-way through writing kto_ref_model.safetensors."""
    from kto_plugin.reference import _sync

    real = _sync.write_atomically

    def write(path, write_to):
        if "checkpoint-4" not in path:
            return real(path, write_to)
        data = io.BytesIO()
        write_to(data)
        with open(f"{path}.tmp-{os.getpid()}", "wb") as f:
            f.write(data.getvalue()[: len(data.getvalue()) // 2])
        die()
    monkeypatch.setattr(_sync, "write_atomically", write)


CHECKPOINT_FAULTS = {
    "after_the_weights": (_kill_after_the_weights, None, "it has no trainer_state.json"),
    "in_trainer_state": (_kill_in_trainer_state, None, "its trainer_state.json does not read"),
    "after_the_synced_reference": (_kill_after_the_synced_reference, SYNC, "it has no trainer_state.json"),
    "in_the_synced_reference": (_kill_in_the_synced_reference, SYNC, "it has no trainer_state.json"),
}


@pytest.fixture(scope="module")
def straight_runs(base_model, tokenizer, rows, tmp_path_factory):
    """Uninterrupted 4-step runs, one per KTO config, made once."""
    runs = {}

    def get(kto_kwargs, **overrides):
        key = repr((kto_kwargs, overrides))
        if key not in runs:
            out = tmp_path_factory.mktemp("straight")
            runs[key] = train_run(copy.deepcopy(base_model), tokenizer, rows[:16], out, kto_kwargs=kto_kwargs,
                                  **overrides)[1]
        return runs[key]
    return get


@pytest.mark.parametrize("fault", list(CHECKPOINT_FAULTS))
def test_a_run_killed_while_saving_a_checkpoint_resumes_from_the_last_complete_one(fault, base_model, tokenizer,
                                                                                   rows, tmp_path, monkeypatch,
                                                                                   straight_runs):
    """Killed while writing checkpoint-4 (checkpoints every 2 steps; with sync_ref_model, save_total_limit=1, so
    checkpoint-2 survives only if checkpoint-4 is not taken for complete too early). resume_from_checkpoint=True
    passes over checkpoint-4, naming it, and resumes from checkpoint-2: the final weights and the KTO metrics of
    steps 3-4 equal an uninterrupted run's, bit for bit. Naming checkpoint-4 itself is refused, suggesting
    checkpoint-2."""
    inject, kto_kwargs, problem = CHECKPOINT_FAULTS[fault]
    kto_kwargs = {"warn_guidance": False, **(kto_kwargs or {})}
    overrides = {"learning_rate": 0.05, **({"save_total_limit": 1} if "sync_ref_model" in kto_kwargs else {})}
    out = tmp_path / "run"

    def run():
        inject(monkeypatch)
        train_run(copy.deepcopy(base_model), tokenizer, rows[:16], out, kto_kwargs=kto_kwargs, **overrides)

    killed_at_fault_point(run)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    if fault == "after_the_synced_reference":  # the plugin's file comes first, then the Trainer's
        assert sorted(p.name for p in (out / "checkpoint-4").iterdir()) == ["kto_ref_model.safetensors"]
    assert checkpoint_problem(str(out / "checkpoint-2")) is None
    assert checkpoint_problem(str(out / "checkpoint-4")).startswith(problem)
    expected = rf"Checkpoint {re.escape(str(out / 'checkpoint-4'))} is incomplete \({problem}.*The last complete " \
               rf"checkpoint before it is {re.escape(str(out / 'checkpoint-2'))}"
    with pytest.raises(ValueError, match=expected):
        train_run(copy.deepcopy(base_model), tokenizer, rows[:16], out, resume=str(out / "checkpoint-4"),
                  kto_kwargs=kto_kwargs, **overrides)
    with pytest.warns(KTOPluginWarning, match=rf"checkpoint-4 is incomplete \({problem}.*\): its save was cut short\. "
                                              rf"Resuming from {re.escape(str(out / 'checkpoint-2'))}, the last complete"):
        _, resumed = train_run(copy.deepcopy(base_model), tokenizer, rows[:16], out, resume=True,
                               kto_kwargs=kto_kwargs, **overrides)
    straight = straight_runs(kto_kwargs, **overrides)
    assert_same_weights(straight.model, resumed.model)
    keys = KTO_KEYS + ("loss", "grad_norm")
    want = logged(straight, {3, 4}, keys)
    assert set(want) == {3, 4} and logged(resumed, {3, 4}, keys) == want
    assert checkpoint_problem(str(out / "checkpoint-4")) is None  # written again, whole


def test_resume_with_no_complete_checkpoint_is_refused(base_model, tokenizer, rows, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"resume_from_checkpoint=True, but no checkpoint in .* is complete "
                                         r"\(.*checkpoint-2: it has no trainer_state.json.*Train again from the start"):
        train_run(copy.deepcopy(base_model), tokenizer, rows[:16], out, resume=True)


# --- a streamed dataset whose row 5000 is malformed ---

BAD_ROW = 5000


def stream_run(base_model, tokenizer, out, on_bad_row, max_steps=6):
    """6001 short unpaired rows streamed, row 5000's completion empty; batches of 1000, a checkpoint every 2."""
    def rows():
        for i in range(BAD_ROW + 1001):
            yield {"prompt": f"Q{i % 7}:", "completion": "" if i == BAD_ROW else f" a{i % 3}", "label": i % 2 == 0}

    from helpers import args
    from transformers import Trainer

    kto = KTOPlugin(KTOConfig(max_length=32, on_bad_row=on_bad_row, warn_guidance=False), tokenizer=tokenizer)
    trainer = Trainer(model=copy.deepcopy(base_model), data_collator=kto.collator,
                      train_dataset=kto.prepare_dataset(IterableDataset.from_generator(rows)),
                      args=args(out, per_device_train_batch_size=1000, max_steps=max_steps, save_strategy="steps",
                                save_steps=2))
    kto.attach(trainer)
    return kto, trainer


def test_a_malformed_row_5000_of_a_stream_stops_the_run_or_is_skipped(base_model, tokenizer, tmp_path):
    """The stream is prepared as the Trainer reads it: row 5000 opens step 6's batch, which accelerate fetches a batch
    ahead, so the run stops after step 4 (and its checkpoint).
    "raise": the error names the row and the streamed dataset, and checkpoint-4 is complete. Resumed from it with
    on_bad_row="skip", the run ends as a run that skipped the row from the start, and the report counts it."""
    out = tmp_path / "run"
    _, trainer = stream_run(base_model, tokenizer, out, "raise")
    with pytest.raises(ValueError, match=rf"train dataset, row {BAD_ROW}: 'completion' is ''\..*read from the streamed "
                                         r"train dataset while training.*KTOConfig\(on_bad_row='skip'\)"):
        trainer.train()
    assert trainer.state.global_step == 4
    assert checkpoint_problem(str(out / "checkpoint-4")) is None
    kto, resumed = stream_run(base_model, tokenizer, out, "skip")
    resumed.train(resume_from_checkpoint=True)
    report = kto.data_reports["train"]
    assert (report.skipped_bad_rows, report.bad_rows) == (1, [BAD_ROW])
    assert report.first_bad_row.startswith(f"train dataset, row {BAD_ROW}: 'completion' is ''")
    assert f"1 malformed input rows skipped (on_bad_row='skip'; rows [{BAD_ROW}])" in report.summary()
    straight_kto, straight = stream_run(base_model, tokenizer, tmp_path / "straight", "skip")
    straight.train()
    assert straight_kto.data_reports["train"].rows_out == 6000
    assert_same_weights(straight.model, resumed.model)
    want = logged(straight, {5, 6}, KTO_KEYS)
    assert set(want) == {5, 6} and logged(resumed, {5, 6}, KTO_KEYS) == want


def test_on_bad_row_skip_on_a_map_style_dataset_counts_every_skipped_row(tokenizer):
    from datasets import Dataset

    rows = [{"prompt": "Q:", "completion": f" a{i}", "label": i % 2 == 0} for i in range(12)]
    rows[3]["completion"] = ""
    rows[7]["label"] = None
    data = Dataset.from_list(rows)
    with pytest.raises(ValueError, match=r"train dataset, row 7: 'label' is None"):  # on_bad_row="raise"
        KTOPlugin(KTOConfig(warn_guidance=False), tokenizer=tokenizer).prepare_dataset(data)
    kto = KTOPlugin(KTOConfig(on_bad_row="skip", warn_guidance=False), tokenizer=tokenizer)
    prepared = kto.prepare_dataset(data)
    report = kto.data_reports["train"]
    assert prepared["row_index"] == [i for i in range(12) if i not in (3, 7)]
    assert (report.rows_in, report.rows_out, report.skipped_bad_rows, report.bad_rows) == (12, 10, 2, [3, 7])
    assert report.first_bad_row.startswith("train dataset, row 3: 'completion' is ''")
    every = Dataset.from_list([dict(r, completion="") for r in rows])
    with pytest.raises(ValueError, match=r"every one of its 12 rows is malformed, so on_bad_row='skip' left none"):
        kto.prepare_dataset(every)


def test_on_bad_row_is_validated():
    with pytest.raises(ValueError, match=r"on_bad_row must be one of \('raise', 'skip'\), got 'ignore'"):
        KTOConfig(on_bad_row="ignore")


# --- one process of two dies or hangs mid-step under torchrun ---

# the process group's timeout the script sets (docs/faults.md), per fault: "die" must end well before its timeout
# could fire; "hang" ends by its timeout, long enough that the two processes' start-up skew on a loaded machine
# never reaches it
TIMEOUTS = {"die": 60, "hang": 20}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(TIMEOUTS))
def test_one_process_of_two_dying_or_hanging_mid_step_ends_the_run_with_an_error(fault, tmp_path):
    """Rank 1 is SIGKILLed (or hangs) inside step 2, before the step's first collective. "die": the survivor's
    collective fails at once (gloo: the connection is reset), long before the timeout, and torchrun stops the run
    naming the dead rank. "hang": the survivor's collective fails when the process group's timeout runs out, and
    torchrun stops the hung rank. Either way torchrun exits with an error, and checkpoint-1 (written before the
    fault) is complete."""
    timeout = TIMEOUTS[fault]
    script = ROOT / "tests" / "scripts" / "rank_fault_two_process.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "KTO_PLUGIN_DISABLE_AUTOLOAD": "1"}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), fault, str(tmp_path / "run"), str(timeout)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env, check=False)
    elapsed = time.monotonic() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "RANK0 STEP 1" in proc.stdout and "RANK0 STEP 2" not in proc.stdout and "FINISHED" not in proc.stdout
    assert "ChildFailedError" in output
    if fault == "die":
        assert re.search(r"Signal 9 \(SIGKILL\) received by PID", output), output[-3000:]
        survivor = r"RANK0 ERROR RuntimeError: .*Connection (reset|closed) by peer"
        assert elapsed < timeout, elapsed  # start-up included: the timeout never fired
    else:
        survivor = rf"RANK0 ERROR RuntimeError: .*Timed out waiting {timeout * 1000}ms"
        assert timeout < elapsed < timeout + 120, elapsed
    # the survivor reports the failed collective, unless torchrun's stop signal reached it first
    assert re.search(survivor, proc.stdout) or "RANK0 ERROR" not in proc.stdout, proc.stdout[-2000:]
    assert checkpoint_problem(str(tmp_path / "run" / "checkpoint-1")) is None


# --- the docs ---

def test_the_faults_table_names_a_test_for_each_fault():
    """docs/faults.md has one table row per fault, each naming the test that injects it, which exists."""
    guide = (ROOT / "docs" / "faults.md").read_text()
    table = re.search(r"\| fault \| what you see \| what is kept \| test \|\n\|[-| ]+\|\n((?:\|.*\|\n)+)", guide)
    assert table, "docs/faults.md lost its table"
    lines = table.group(1).splitlines()
    named = [re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", line.rsplit("|", 2)[-2]) for line in lines]
    assert len(lines) >= 15 and all(len(tests) == 1 for tests in named), lines
    for [(path, name)] in named:
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.MULTILINE), f"{path}::{name} is not a test"
    this_module = {name for [(path, name)] in named if path == "tests/test_faults.py"}
    tests_here = set(re.findall(r"^def (test_\w+)\(", Path(__file__).read_text(), re.MULTILINE))
    assert tests_here - this_module == {"test_on_bad_row_is_validated", "test_the_faults_table_names_a_test_for_each_fault"}
