"""The experiment trackers for real: one `kto-plugin train` run on two processes (torchrun, CPU) reporting to
TensorBoard, MLflow (local file store), Weights & Biases (offline) and trackio (local SQLite), all offline; then
each tracker's files are read back with the tracker's own reader and compared with the run's log history.

What each test proves for its tracker: every KTO metric (TRL's names), train and eval, at the global step the
Trainer logged it, with the logged value; one run only (the main process reports, the other does not); the
`generate_during_eval` table; and the final evaluation in the same run as the training (`EvaluateAtTheEnd`).
"""

from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

KTO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
               "logits/chosen", "logits/rejected", "kl")
RUN_NAME = "kto-trackers"
STEPS, EVAL_STEPS = 4, 3  # evaluations at step 3 (eval_steps) and step 4 (the end of training)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    for name in ("tensorboard", "mlflow", "wandb", "trackio"):
        pytest.importorskip(name, reason="the trackers are in the dev extra")
    tmp = tmp_path_factory.mktemp("trackers")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_", "TRACKIO_"))}
    env.update({
        "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "KTO_PLUGIN_DISABLE_AUTOLOAD": "1",
        "WANDB_MODE": "offline", "WANDB_DIR": str(tmp / "wandb"), "WANDB_PROJECT": "kto",
        "MLFLOW_TRACKING_URI": (tmp / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true",
        "TRACKIO_DIR": str(tmp / "trackio"),
    })
    (tmp / "wandb").mkdir()
    out = tmp / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "kto_plugin.cli", "train", "--demo_pairs", "24", "--max_steps", str(STEPS), "--eval_steps", str(EVAL_STEPS),
           "--per_device_train_batch_size", "4", "--max_length", "128", "--logging_steps", "1",
           "--report_to", "tensorboard", "mlflow", "wandb", "trackio", "--run_name", RUN_NAME,
           "--generate_during_eval", "true", "--generate_num_prompts", "2", "--generate_max_new_tokens", "4",
           "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    history = json.loads((out / "log_history.json").read_text())
    generations = [json.loads(line) for line in (out / "kto_generations.jsonl").read_text().splitlines()]
    return {"tmp": tmp, "out": out, "history": history, "generations": generations, "log": proc.stdout + proc.stderr}


def expected(history):
    """{(global step, "train/<metric>" or "eval/<metric>"): value} for every KTO metric the Trainer logged."""
    values = {}
    for entry in history:
        split = "eval" if "eval_loss" in entry else "train" if "loss" in entry else None
        if split is None:
            continue
        for name in KTO_METRICS:
            values[(entry["step"], f"{split}/{name}")] = entry[("eval_" if split == "eval" else "") + name]
    return values


def test_the_run_logged_every_kto_metric_at_every_step(run):
    values = expected(run["history"])
    assert {step for step, key in values if key.startswith("train/")} == set(range(1, STEPS + 1))
    assert {step for step, key in values if key.startswith("eval/")} == {EVAL_STEPS, STEPS}
    assert len(values) == (STEPS + 2) * len(KTO_METRICS)
    assert {r["step"] for r in run["generations"]} == {EVAL_STEPS, STEPS} and len(run["generations"]) == 4


def test_each_phase_logs_one_line_from_the_main_process(run):
    log = run["log"]
    assert log.count("kto_plugin: attached: loss=kto") == 1  # the other process logs warnings only
    for step in (EVAL_STEPS, STEPS):
        line = f"kto_plugin: eval generations at step {step}: 2 prompts x (policy, reference), up to 4 new tokens"
        assert log.count(line) == 1
    assert log.count("and logged to wandb, trackio, mlflow, tensorboard") == 2


def _assert_same(found, values):
    assert set(found) == set(values), sorted(set(values) ^ set(found))
    for key, value in values.items():
        assert found[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def _assert_table(rows, run, step):
    want = [[r["step"], r["prompt"], r["policy"], r["reference"]] for r in run["generations"] if r["step"] == step]
    assert rows == want


# --- TensorBoard: the event file, read with TensorBoard's EventAccumulator ---


def test_tensorboard(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (logdir,) = glob.glob(str(run["out"] / "runs" / "*"))  # one writer: the main process's
    assert len(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))) == 1
    events = EventAccumulator(logdir, size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    values = expected(run["history"])
    found = {(e.step, tag): e.value for tag in events.Tags()["scalars"] if tag.split("/", 1)[1] in KTO_METRICS
             for e in events.Scalars(tag)}
    _assert_same(found, values)
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("eval/generations/text_summary")}
    assert set(texts) == {EVAL_STEPS, STEPS}
    for r in run["generations"]:  # a Markdown row per prompt; a line break inside a cell is written <br>
        assert f"\n| {r['step']} | {r['prompt'].replace(chr(10), '<br>')} | " in texts[r["step"]]


# --- MLflow: the local file store, read with MlflowClient ---


def test_mlflow(run, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run["tmp"] / "mlruns").as_uri())
    experiments = client.search_experiments()
    runs = [r for e in experiments for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1  # one run: the main process's, holding the final evaluation too
    (mlflow_run,) = runs
    assert mlflow_run.info.run_name == RUN_NAME
    found = {}
    for name in KTO_METRICS:
        for split, key in (("train", name), ("eval", "eval_" + name)):
            for metric in client.get_metric_history(mlflow_run.info.run_id, key):
                found[(metric.step, f"{split}/{name}")] = metric.value
    _assert_same(found, expected(run["history"]))
    path = client.download_artifacts(mlflow_run.info.run_id, "kto_generations/eval.json", str(run["tmp"]))
    table = json.loads(Path(path).read_text())
    assert table["columns"] == ["step", "prompt", "policy", "reference"]
    assert table["data"] == [[r["step"], r["prompt"], r["policy"], r["reference"]] for r in run["generations"]]


# --- Weights & Biases offline: the run's .wandb transaction log, parsed into wandb's own Record messages ---


def wandb_records(path):
    """The records of a .wandb file: a 7-byte header (``:W&B``, magic, version), then LevelDB log framing
    (32 KiB blocks; per chunk a CRC, a length and a FULL/FIRST/MIDDLE/LAST type) around `Record` protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32 * 1024, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        chunk, pos = data[pos + 7: pos + 7 + length], pos + 7 + length
        if kind == 0:
            pos += block - pos % block if pos % block else 0
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline(run):
    (run_dir,) = glob.glob(str(run["tmp"] / "wandb" / "wandb" / "offline-run-*"))  # one run: the main process's
    (log,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    found, tables = {}, {}
    for record in wandb_records(log):
        if record.WhichOneof("record_type") == "run":
            assert record.run.display_name == RUN_NAME
        if record.WhichOneof("record_type") != "history":
            continue
        items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        step = items["train/global_step"]
        for key, value in items.items():
            if key.split("/", 1)[-1] in KTO_METRICS and key.startswith(("train/", "eval/")):
                found[(step, key)] = value
        if "eval/generations/path" in items:  # a table: its fields as nested keys, its rows in a file
            tables[step] = items["eval/generations/path"]
    _assert_same(found, expected(run["history"]))
    assert set(tables) == {EVAL_STEPS, STEPS}
    for step, path in tables.items():
        table = json.loads(Path(run_dir, "files", path).read_text())
        assert table["columns"] == ["step", "prompt", "policy", "reference"]
        _assert_table(table["data"], run, step)


# --- trackio: the project's SQLite database, read with trackio's SQLiteStorage ---


def test_trackio(run, monkeypatch):
    import trackio.sqlite_storage as storage

    monkeypatch.setattr(storage, "TRACKIO_DIR", run["tmp"] / "trackio")  # read at import from the environment
    projects = storage.SQLiteStorage.get_projects()
    assert [storage.SQLiteStorage.get_runs(p) for p in projects] == [[RUN_NAME]]  # one run
    found, tables = {}, {}
    for entry in storage.SQLiteStorage.get_logs(projects[0], RUN_NAME):
        step = entry["train/global_step"]
        for key, value in entry.items():
            if key.split("/", 1)[-1] in KTO_METRICS and key.startswith(("train/", "eval/")):
                found[(step, key)] = value
        if "eval/generations" in entry:
            tables[step] = entry["eval/generations"]["_value"]
    _assert_same(found, expected(run["history"]))
    assert set(tables) == {EVAL_STEPS, STEPS}
    for step, rows in tables.items():
        _assert_table([[r["step"], r["prompt"], r["policy"], r["reference"]] for r in rows], run, step)
