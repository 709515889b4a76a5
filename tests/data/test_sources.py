"""Preference data from where users keep it: files of each format, save_to_disk folders, folders of files, a Hub
dataset by name read from the local cache (offline), through `load_preference_data` and `prepare_dataset`."""

from __future__ import annotations

import json

import datasets
import pytest
from helpers import cache_hub_dataset, offline_datasets_cache

from kto_plugin import KTOConfig, KTOPlugin
from kto_plugin.data import load_preference_data

ROWS = [{"prompt": f"What is {i} + 1?", "completion": f" {i + 1}", "label": i % 2 == 0} for i in range(6)]


def _write(path, kind):
    ds = datasets.Dataset.from_list(ROWS)
    if kind == "json":  # one JSON array, not JSON lines
        path.write_text(json.dumps(ROWS))
    elif kind == "jsonl":
        ds.to_json(str(path))
    elif kind == "csv":
        ds.to_csv(str(path), index=False)
    else:
        ds.to_parquet(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_a_file_of_each_format_is_the_train_split(tmp_path, kind):
    data = load_preference_data(_write(tmp_path / f"rows.{kind}", kind))
    assert list(data) == ["train"]
    assert data["train"].to_list() == ROWS  # CSV too: " 1" stays a string, True stays a bool


def test_a_save_to_disk_folder_of_a_dataset_and_of_a_dataset_dict(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:4]),
                          "test": datasets.Dataset.from_list(ROWS[4:])}).save_to_disk(str(tmp_path / "splits"))
    one = load_preference_data(tmp_path / "one")  # a PathLike too
    assert list(one) == ["train"] and one["train"].to_list() == ROWS
    splits = load_preference_data(str(tmp_path / "splits"))
    assert {k: v.to_list() for k, v in splits.items()} == {"train": ROWS[:4], "test": ROWS[4:]}


def test_a_folder_of_files_one_per_split(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    datasets.Dataset.from_list(ROWS[:4]).to_json(str(folder / "train.jsonl"))
    datasets.Dataset.from_list(ROWS[4:]).to_json(str(folder / "test.jsonl"))
    data = load_preference_data(folder)
    assert {k: v.to_list() for k, v in data.items()} == {"train": ROWS[:4], "test": ROWS[4:]}


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    return offline_datasets_cache(tmp_path, monkeypatch)


def test_a_hub_dataset_by_name_from_the_local_cache(tmp_path, offline_hub_cache):
    with pytest.raises(ConnectionError, match="kto-org/tiny-kto"):  # not cached yet, and offline
        load_preference_data("kto-org/tiny-kto")
    cache_hub_dataset(offline_hub_cache, "kto-org/tiny-kto", ROWS, tmp_path)
    data = load_preference_data("kto-org/tiny-kto")
    assert list(data) == ["train"] and data["train"].to_list() == ROWS


def test_prepare_dataset_takes_a_path(tokenizer, tmp_path):
    kto = KTOPlugin(KTOConfig(), tokenizer=tokenizer)
    prepared = kto.prepare_dataset(str(_write(tmp_path / "rows.parquet", "parquet")))
    assert list(prepared) == ["train"]
    assert prepared["train"]["label"] == [r["label"] for r in ROWS]
    assert kto.data_reports["train"].rows_out == len(ROWS)


def test_a_file_of_another_format_is_refused_naming_the_formats(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match=r"rows.txt' is a \.txt file; .*\.jsonl, \.json, \.csv or \.parquet"):
        load_preference_data(path)
