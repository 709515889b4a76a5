"""The on-disk cache of precomputed reference log-probs: ``<key>.npz`` (arrays) and ``<key>.json`` (what they are).

The key (`cache_key`) hashes the dataset's content, the reference's weights, the reference mode and every
setting that changes the values (see `kto_plugin.reference._precompute`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import numpy as np

logger = logging.getLogger("kto_plugin")

CACHE_FORMAT = 1


def default_cache_dir() -> str:
    root = os.environ.get("KTO_PLUGIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kto_plugin")
    return os.path.join(root, "ref_logps")


class RefLogpsCache:
    """Files ``<key>.npz`` (arrays) and ``<key>.json`` (what they are) in one directory."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.npz")

    def load(self, key: str, num_rows: int) -> dict[str, np.ndarray] | None:
        path = self.path(key)
        if not os.path.exists(path):
            return None
        try:
            with np.load(path) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as err:
            logger.warning("kto_plugin: ignoring unreadable reference log-prob cache %s (%s)", path, err)
            return None
        if any(len(a) != num_rows for a in arrays.values()):
            return None
        return arrays

    def save(self, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> str:
        os.makedirs(self.directory, exist_ok=True)
        path = self.path(key)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        with open(os.path.join(self.directory, f"{key}.json"), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        return path


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True).encode()).hexdigest()[
        :40
    ]
