"""Preference data from where users keep it, as a `datasets.DatasetDict` of splits.

`load_preference_data(source)` takes, in this order:

* a file: ``.jsonl`` / ``.json`` (JSON lines, or one JSON array of rows), ``.csv``, ``.parquet``: split
  ``train``;
* a folder written by `Dataset.save_to_disk` (split ``train``) or `DatasetDict.save_to_disk` (its splits);
* a folder of such files: the splits named by the file names (``train.jsonl``, ``test.jsonl``), as
  `datasets.load_dataset` reads a folder;
* anything else: a dataset on the Hugging Face Hub by name (``trl-lib/kto-mix-14k``), with `config`. Offline
  (``HF_HUB_OFFLINE=1``) it is read from the local `datasets` cache that an earlier online load left.

CSV text columns stay strings: pandas would read a completion ``" 4"`` as the number 4.0.
`KTOPlugin.prepare_dataset` and ``kto-plugin train --dataset_name`` both load through this function.
"""

from __future__ import annotations

import os
from typing import Any

import datasets

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_TEXT_COLUMNS = ("prompt", "completion", "chosen", "rejected")


def is_saved_dataset(path: str) -> bool:
    """A folder written by `save_to_disk`: a `Dataset`'s ``state.json``, or a `DatasetDict`'s
    ``dataset_dict.json``."""
    return any(os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json"))


def _csv_kwargs(files: list[str]) -> dict[str, Any]:
    if not files or any(os.path.splitext(f)[1].lower() != ".csv" for f in files):
        return {}
    return {"converters": dict.fromkeys(_TEXT_COLUMNS, str)}


def describe_source(source: str | os.PathLike) -> str:
    """What kind of source `source` is, in words, for log lines."""
    path = os.fspath(source)
    if os.path.isfile(path):
        return f"{FILE_FORMATS.get(os.path.splitext(path)[1].lower(), 'unknown')} file"
    if os.path.isdir(path):
        return "save_to_disk folder" if is_saved_dataset(path) else "folder of data files"
    return "Hub dataset"


def load_preference_data(source: str | os.PathLike, config: str | None = None) -> datasets.DatasetDict:
    """The splits of `source` (see the module docstring). Raises ValueError for a file of another format."""
    path = os.fspath(source)
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in FILE_FORMATS:
            raise ValueError(
                f"{path!r} is a {ext or 'extension-less'} file; preference data is read from .jsonl, .json, .csv "
                "or .parquet files, a save_to_disk folder, a folder of such files, or a Hub dataset name."
            )
        return datasets.load_dataset(FILE_FORMATS[ext], data_files=path, **_csv_kwargs([path]))
    if os.path.isdir(path):
        if is_saved_dataset(path):
            saved = datasets.load_from_disk(path)
            if isinstance(saved, datasets.DatasetDict):
                return saved
            return datasets.DatasetDict({"train": saved})
        files = [f for f in os.listdir(path) if os.path.splitext(f)[1].lower() in FILE_FORMATS]
        return datasets.load_dataset(path, config, **_csv_kwargs(files))
    return datasets.load_dataset(path, config)
