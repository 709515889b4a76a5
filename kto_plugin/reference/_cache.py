"""The on-disk cache of precomputed reference log-probs: ``<key>.npz`` (arrays) and ``<key>.json`` (what they are).

The key (`cache_key`) hashes the dataset's content, the reference's weights, the reference mode and every
setting that changes the values (see `kto_plugin.reference._precompute`).

A cache must never stop a run nor feed it wrong values:

* **reading**: a file that cannot be used (truncated or emptied by a full disk or a cut copy, another format
  version, rows or columns that do not fit) is ignored with a `KTOPluginWarning` naming it; the caller then
  recomputes the values and writes the file again;
* **writing** is atomic: each file is written to a temporary name in the same directory, flushed to disk and
  renamed over the final name, so a reader sees the old file, the new one or none, never a part. A write that
  fails (a full disk: an `OSError`) removes its temporary file and is reported with a warning; the run goes on
  with the values it computed. A temporary file left by a process that was killed while writing is removed by
  the next process on the same host that uses the key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import warnings
from collections.abc import Callable, Sequence
from typing import IO, Any

import numpy as np

from ..errors import KTOPluginWarning

# 2: the format number is stored in the file as well (format 1 files have another key, so are never read)
CACHE_FORMAT = 2
_FORMAT_ENTRY = "format"
_TMP = ".tmp-"  # <final name>.tmp-<host>-<pid>


def default_cache_dir() -> str:
    root = os.environ.get("KTO_PLUGIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kto_plugin")
    return os.path.join(root, "ref_logps")


class RefLogpsCache:
    """Files ``<key>.npz`` (arrays) and ``<key>.json`` (what they are) in one directory."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.npz")

    def load(self, key: str, num_rows: int, required: Sequence[str] = ("ref_logps",)) -> dict[str, np.ndarray] | None:
        """The arrays stored under `key`, each of `num_rows` rows with every `required` one present; None (and a
        warning naming the file, when there is one) if there is no usable file."""
        path = self.path(key)
        _remove_stale_temporaries(self.directory, key)
        if not os.path.exists(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        # whatever a damaged file makes numpy or zipfile raise (BadZipFile, EOFError, ValueError, OSError,
        # NotImplementedError, ... measured by truncating and flipping bytes), the file is unusable
        except Exception as err:  # noqa: BLE001
            return _ignored(path, f"it cannot be read ({type(err).__name__}: {err}); it is truncated or damaged")
        version = arrays.pop(_FORMAT_ENTRY, None)
        if version is None or version.shape != () or int(version) != CACHE_FORMAT:
            found = "no format number" if version is None else f"format {version.tolist()!r}"
            return _ignored(path, f"it has {found}, this version reads format {CACHE_FORMAT}")
        missing = [name for name in required if name not in arrays]
        if missing:
            return _ignored(path, f"it lacks {missing} (it holds {sorted(arrays)})")
        lengths = {name: len(a) if a.ndim else None for name, a in arrays.items()}
        wrong = {name: n for name, n in lengths.items() if n != num_rows}
        if wrong:
            return _ignored(path, f"its arrays have {wrong} rows, the dataset has {num_rows}")
        return arrays

    def save(self, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> str | None:
        """Write `arrays` (and `meta`, as JSON) under `key`, each file atomically; returns the arrays' path, or None
        (with a warning) when the write failed."""
        path = self.path(key)
        meta_path = os.path.join(self.directory, f"{key}.json")
        text = json.dumps(meta, indent=1, sort_keys=True).encode()
        try:
            os.makedirs(self.directory, exist_ok=True)
            write_atomically(meta_path, lambda f: f.write(text))  # first: a description without values is harmless
            write_atomically(path, lambda f: np.savez(f, **{_FORMAT_ENTRY: np.int64(CACHE_FORMAT)}, **arrays))
        except OSError as err:
            with contextlib.suppress(OSError):
                os.remove(meta_path)
            warnings.warn(
                f"kto_plugin: could not write the reference log-prob cache {path} ({err}). Training goes on with the "
                "log-probs just computed; the next run computes them again. Free space there, or set "
                "KTOConfig(precompute_cache_dir=...) to another directory, or precompute_cache=False.",
                KTOPluginWarning,
                stacklevel=2,
            )
            return None
        return path


def write_atomically(path: str, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(file)`` on a temporary file beside `path`, flush it to disk and rename it to `path`. On any
    error the temporary file is removed and the error raised; `path` is left as it was."""
    tmp = f"{path}{_TMP}{socket.gethostname()}-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _ignored(path: str, why: str) -> None:
    warnings.warn(
        f"kto_plugin: ignoring the reference log-prob cache file {path}: {why}. The log-probs are computed again "
        "and the file is rewritten.",
        KTOPluginWarning,
        stacklevel=3,
    )


def _remove_stale_temporaries(directory: str, key: str) -> None:
    """Remove this key's temporary files whose writer, a process on this host, no longer runs (it was killed
    while writing). A live writer's file, and files from other hosts sharing the directory, are left alone."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    host = socket.gethostname()
    for name in names:
        if not name.startswith(key) or _TMP not in name:
            continue
        writer_host, _, pid = name.rpartition(_TMP)[2].rpartition("-")
        if writer_host == host and pid.isdigit() and not _running(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, name))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True).encode()).hexdigest()[
        :40
    ]
