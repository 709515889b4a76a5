"""Fingerprints: what identifies a reference's weights and a dataset's content, in one place.

* `tensors_fingerprint` / `module_fingerprint`: sha256 over every tensor's name, dtype, shape and elements: all of
  them (the precompute cache key: two references that differ anywhere get different keys) or `samples` evenly
  spaced ones (the resume check: cheap at any size, and an optimizer step changes the sampled elements of a
  trained tensor, so it tells the initial policy from a checkpoint's weights).
* `dataset_fingerprint`: sha256 of a prepared dataset's token ids and labels in order (its content, not the
  `datasets` `_fingerprint`, so it survives any map); `column_hash`: sha256 of one float column.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

TOKEN_COLUMNS = ("prompt_ids", "completion_ids", "label")


def tensors_fingerprint(
    tensors: Mapping[str, torch.Tensor], samples: int | None = None, keep: Callable[[str], bool] | None = None
) -> str | None:
    """sha256 over each tensor's name, dtype, shape and elements (all, or `samples` evenly spaced ones).

    `keep(name)` selects the tensors (default: all); None when it selects none.
    """
    h = hashlib.sha256()
    found = False
    for name, tensor in sorted(tensors.items()):
        if keep is not None and not keep(name):
            continue
        found = True
        flat = tensor.detach().reshape(-1)
        if samples is not None:
            flat = flat[:: max(1, flat.numel() // samples)][:samples]
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        h.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest() if found else None


def module_fingerprint(
    module: nn.Module, samples: int | None = None, keep: Callable[[str], bool] | None = None
) -> str | None:
    """`tensors_fingerprint` of every parameter and buffer of `module` (its state dict)."""
    return tensors_fingerprint(module.state_dict(), samples, keep)


def dataset_fingerprint(dataset: Any) -> str:
    """sha256 of the rows' token ids and labels, in order."""
    import pyarrow.compute as pc

    h = hashlib.sha256()
    h.update(str(len(dataset)).encode())
    arrow = dataset.with_format("arrow")
    step = 10_000
    for start in range(0, len(dataset), step):
        table = arrow[start : start + step]
        for column in TOKEN_COLUMNS:
            values = table.column(column).combine_chunks()
            if column == "label":
                h.update(np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.uint8).tobytes())
                continue
            h.update(np.asarray(pc.list_value_length(values).to_numpy(zero_copy_only=False), np.int64).tobytes())
            h.update(np.asarray(values.flatten().to_numpy(zero_copy_only=False), dtype=np.int64).tobytes())
    return h.hexdigest()


def column_hash(dataset: Any, column: str) -> str | None:
    """sha256 of a float column of a `datasets.Dataset`, or None when it has no such column."""
    if dataset is None or column not in (getattr(dataset, "column_names", None) or ()):  # a stream's may be None
        return None
    values = np.asarray(dataset.with_format("numpy")[column], dtype=np.float32)
    return hashlib.sha256(values.tobytes()).hexdigest()
