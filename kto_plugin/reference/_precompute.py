"""Precomputed reference log-probs (`precompute_ref_log_probs=True`): one pass, then no reference model.

For every row the pass stores three columns:

* ``ref_logps``: the reference's summed completion log-prob of the row's own completion (eq. 7's pi_ref(y|x));
* ``kl_completion_ids``: the completion of the row's fixed KL partner, and
* ``ref_kl_logps``: the reference's log-prob of that partner completion after the row's prompt.

**Why a fixed partner.** z0 pairs each prompt with another row's completion. Without precomputation our
collator pairs within each batch (prompt i with completion i - 1), which is only known once the sampler has
drawn the batch; a precompute pass cannot know it under shuffling. So the pairing is decided at precompute
time and stored with the row, and the collator uses the stored partner completion whenever a row carries one:
the policy's KL pass at train time scores exactly the pair whose reference log-prob was stored, whatever the
sampler or the number of processes. (TRL 1.16 also stores a fixed partner per row, at dataset preparation,
and requires a sequential sampler for the KL losses so that the partners are the batch's own completions.)

The partner of row i is TRL's: the previous row within consecutive groups of `per_device_train_batch_size`
rows, the first row of a group taking the group's last. Under a sequential sampler these are exactly the pairs
the rotating collator builds, so the numbers equal TRL's. Two deliberate differences: evaluation datasets are
grouped by `per_device_eval_batch_size` (the pairs our collator builds in an evaluation batch; TRL groups them
by the train batch size), and a trailing group of one row is paired with the row before it (TRL pairs it with
itself, which is no mismatch).

**Cache.** The three columns (as partner indices) are stored under ``precompute_cache_dir``, keyed by a
content hash of the dataset's token columns, a hash of the reference's weights, the reference mode and the
settings that change the values (max_length, truncation, KL group size, mixed precision, log-prob path). A
second run with the same key loads them and says so in the log. The pass keeps its results in memory and writes
the file once, atomically, at its end (`kto_plugin.reference._cache`): a run killed during the pass or the write
leaves no file under the key, and the next run computes the values again; a damaged file is ignored, with a
warning, and replaced.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn

from ..data._pairing import kl_partners
from ..data._report import duration
from ._cache import RefLogpsCache, cache_key
from ._fingerprint import dataset_fingerprint, module_fingerprint
from ._sharding import shards_parameters

logger = logging.getLogger("kto_plugin")

PRECOMPUTED_COLUMNS = ("ref_logps", "ref_kl_logps", "kl_completion_ids")


def _batches(num_rows: int, batch_size: int) -> list[range]:
    return [range(s, min(s + batch_size, num_rows)) for s in range(0, num_rows, batch_size)]


class PassProgress:
    """Log lines for a pass over `total` batches, so a long pass is never silent.

    After the first batch: the rows and batches and an estimate of the whole pass (first batch's time x
    batches); then, every `every_s` seconds, the batches done and an estimate of the time left (the mean
    time per batch so far x batches left). A pass of one batch logs nothing here (the caller logs its end).
    `log` is ``logger.info``-like, or None (another process than the main one: nothing is logged).
    """

    def __init__(
        self,
        desc: str,
        total: int,
        rows: int | None,
        log: Callable[..., None] | None,
        every_s: float = 30.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.desc, self.total, self.rows, self.log = desc, total, rows, log
        self.every_s, self.clock = every_s, clock
        self.started = self.last = clock()

    def step(self, done: int) -> None:
        """Batch number `done` (1-based) has finished."""
        if self.log is None or self.total <= 1:
            return
        now = self.clock()
        elapsed = now - self.started
        if done == 1:
            rows = f"{self.rows} rows in " if self.rows is not None else ""
            self.log(
                "kto_plugin: %s: %s%d batches; the first took %s, so the pass takes about %s",
                self.desc, rows, self.total, duration(elapsed), duration(elapsed * self.total),
            )
            self.last = now
        elif done < self.total and now - self.last >= self.every_s:
            self.log(
                "kto_plugin: %s: %d/%d batches (%d%%) in %s, about %s left",
                self.desc, done, self.total, 100 * done // self.total, duration(elapsed),
                duration(elapsed / done * (self.total - done)),
            )
            self.last = now


def compute_reference_logps(
    dataset: Any,
    collator: Callable[[Sequence[dict[str, Any]]], dict[str, Any]],
    run_batch: Callable[[Any], tuple[torch.Tensor, torch.Tensor | None]],
    batch_size: int,
    accelerator: Any,
    needs_kl: bool,
    desc: str,
) -> dict[str, np.ndarray]:
    """Run the reference over `dataset` (which already has `kl_completion_ids` when `needs_kl`).

    Batches are split across processes (every process runs the same number of forwards, as sharded models
    need) and gathered. Returns ``ref_logps`` (N,) and, with `needs_kl`, ``ref_kl_logps`` (N,), float32.
    """
    from accelerate.utils import gather_object

    num_rows = len(dataset)
    batches = _batches(num_rows, batch_size)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_rank = -(-len(batches) // world)
    mine = batches[rank::world]
    mine = mine + [mine[-1] if mine else batches[-1]] * (per_rank - len(mine))  # repeats are dropped below
    columns = [
        c for c in ("prompt_ids", "completion_ids", "label", "kl_completion_ids") if c in dataset.column_names
    ]
    source = dataset.select_columns(columns)
    results = []
    progress = PassProgress(
        desc, len(mine), num_rows if world == 1 else None,
        log=logger.info if accelerator.is_main_process else None,
    )
    for i, rows_range in enumerate(mine):
        chunk = source[rows_range.start : rows_range.stop]
        rows = [dict(zip(chunk, values, strict=True)) for values in zip(*chunk.values(), strict=True)]
        ref, ref_kl = run_batch(collator(rows)["labels"])
        results.append(
            (
                rows_range.start,
                ref.float().cpu().numpy(),
                ref_kl.float().cpu().numpy() if ref_kl is not None else None,
            )
        )
        progress.step(i + 1)
    if world > 1:
        results = gather_object(results)
    ref_logps = np.full(num_rows, np.nan, dtype=np.float32)
    ref_kl_logps = np.full(num_rows, np.nan, dtype=np.float32)
    for start, ref, ref_kl in results:
        ref_logps[start : start + len(ref)] = ref
        if ref_kl is not None:
            ref_kl_logps[start : start + len(ref_kl)] = ref_kl
    out = {"ref_logps": ref_logps}
    if needs_kl:
        out["ref_kl_logps"] = ref_kl_logps
    for key, values in out.items():
        missing = np.flatnonzero(np.isnan(values))
        if missing.size:
            raise RuntimeError(
                f"{desc}: no {key} for rows {missing[:5].tolist()} after the pass (internal error)."
            )
    return out


def with_partner_completions(dataset: Any, partners: np.ndarray) -> Any:
    """`dataset` plus a ``kl_completion_ids`` column: row i gets the completion of row ``partners[i]``."""
    import pyarrow as pa

    completions = dataset.with_format("arrow")[:].column("completion_ids")
    taken = completions.take(pa.array(partners, type=pa.int64())).combine_chunks()
    return dataset.add_column("kl_completion_ids", taken)


def drop_precomputed(dataset: Any) -> Any:
    present = [c for c in PRECOMPUTED_COLUMNS if c in dataset.column_names]
    return dataset.remove_columns(present) if present else dataset


def check_precomputable(dataset: Any, name: str) -> None:
    """Refuses a dataset the precompute pass cannot extend with columns (a stream, a list, an unprepared one)."""
    if isinstance(dataset, datasets.IterableDataset):
        raise ValueError(
            f"precompute_ref_log_probs=True cannot precompute the {name} dataset: it is an "
            "IterableDataset. Precomputation runs the reference over every row once before training and "
            "stores the results as columns of the dataset (cached on disk by its content), which needs a "
            "map-style dataset whose rows can be counted, indexed and extended; a stream has none of "
            "that. Materialise it (e.g. datasets.Dataset.from_generator(...) or load_dataset(..., "
            "streaming=False)), or set precompute_ref_log_probs=False to compute reference log-probs on "
            "the fly."
        )
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"precompute_ref_log_probs=True needs the {name} dataset as a datasets.Dataset (it adds "
            f"columns), got {type(dataset).__name__}. Use kto.prepare_dataset(...), or "
            "datasets.Dataset.from_list(rows)."
        )
    missing = [c for c in ("prompt_ids", "completion_ids", "label") if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The {name} dataset lacks {missing} (it has {dataset.column_names}): pass it through "
            "kto.prepare_dataset(...) before precomputing."
        )


class ReferencePrecomputer:
    """Adds the precomputed columns to datasets for one attachment (see the module docstring).

    Args:
        trainer: the attached Trainer.
        reference: its `ReferenceManager` (set up; not yet released).
        passes: the step's `Passes`, whose `reference_logps` runs the reference on one collated batch (moved to
            the device here): the live step's code, so precomputed and live values agree.
        collator: the KTO collator.
        settings: what changes the values besides data and weights (max_length, truncation, ...), for the key.
        needs_kl: whether the loss needs KL partners.
        cache_dir: where cached columns live; None disables the cache.
    """

    def __init__(
        self,
        trainer: Any,
        reference: Any,
        passes: Any,
        collator: Any,
        settings: dict[str, Any],
        needs_kl: bool,
        cache_dir: str | None,
    ) -> None:
        self.trainer = trainer
        self.reference = reference
        self.passes = passes
        self.collator = collator
        self.settings = settings
        self.needs_kl = needs_kl
        self.cache = RefLogpsCache(cache_dir) if cache_dir else None
        self._reference_fingerprint: str | None = None
        self.last_source: dict[str, str] = {}  # dataset name -> "cache" / "computed", for logs and tests

    def _reference_module(self) -> nn.Module:
        unwrap = self.trainer.accelerator.unwrap_model
        if self.reference.ref_model is not None:
            return unwrap(self.reference.ref_model)
        return unwrap(self.trainer.model)

    def reference_fingerprint(self) -> str | None:
        """Hash of the reference's weights (rank 0's, broadcast); None when sharded, which disables the
        cache."""
        if self._reference_fingerprint is None:
            from accelerate.utils import broadcast_object_list

            module = self._reference_module()
            value = [None if shards_parameters(self.trainer) else module_fingerprint(module)]
            if self.trainer.accelerator.num_processes > 1:
                broadcast_object_list(value, from_process=0)
            self._reference_fingerprint = value[0] or ""
        return self._reference_fingerprint or None

    def _run_batch(self, labels: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        from accelerate.utils import send_to_device

        module = self._reference_module()
        device = next(module.parameters()).device
        with torch.no_grad(), self.trainer.accelerator.autocast():
            reference = self.passes.reference_logps(self.trainer, send_to_device(labels, device), self.needs_kl)
        return reference.target, reference.kl

    def __call__(self, dataset: Any, name: str, group_size: int, batch_size: int) -> Any:
        """`dataset` with ``ref_logps``, and with KL ``kl_completion_ids`` and ``ref_kl_logps``."""
        from accelerate.utils import broadcast_object_list

        dataset = drop_precomputed(dataset)
        num_rows = len(dataset)
        partners = kl_partners(num_rows, group_size) if self.needs_kl else None
        accelerator = self.trainer.accelerator
        key = None
        fingerprint = self.reference_fingerprint() if self.cache is not None else None
        if fingerprint is not None:
            key = cache_key(
                {
                    "dataset": dataset_fingerprint(dataset),
                    "reference": fingerprint,
                    "mode": self.reference.mode,
                    "adapter": self.reference.ref_adapter_name,
                    "needs_kl": self.needs_kl,
                    "kl_group": group_size if self.needs_kl else None,
                    "mixed_precision": str(accelerator.mixed_precision),
                    **self.settings,
                }
            )
        elif self.cache is not None:
            logger.info(
                "kto_plugin: reference weights are sharded, so the log-prob cache is off for %s", name
            )
        required = ("ref_logps", "ref_kl_logps", "kl_partner") if partners is not None else ("ref_logps",)
        arrays = [self.cache.load(key, num_rows, required) if key and accelerator.is_main_process else None]
        if accelerator.num_processes > 1:
            broadcast_object_list(arrays, from_process=0)
        arrays = arrays[0]
        if arrays is not None:
            self.last_source[name] = "cache"
            logger.info(
                "kto_plugin: reference log-probs for %s (%d rows) loaded from cache %s",
                name,
                num_rows,
                self.cache.path(key),
            )
        else:
            started = time.perf_counter()
            source = with_partner_completions(dataset, partners) if partners is not None else dataset
            arrays = compute_reference_logps(
                source,
                self.collator,
                self._run_batch,
                batch_size,
                accelerator,
                self.needs_kl,
                desc=f"reference log-probs for {name}",
            )
            if partners is not None:
                arrays["kl_partner"] = partners
            self.last_source[name] = "computed"
            saved = None
            if key and accelerator.is_main_process:
                saved = self.cache.save(
                    key,
                    arrays,
                    {
                        "dataset": name,
                        "rows": num_rows,
                        "reference": self.reference.describe(),
                        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                        **self.settings,
                    },
                )
            accelerator.wait_for_everyone()
            logger.info(
                "kto_plugin: reference log-probs for %s (%d rows, batch %d) computed in %s%s",
                name,
                num_rows,
                batch_size,
                duration(time.perf_counter() - started),
                f" and cached at {saved}" if saved else "",
            )
        out = dataset.add_column("ref_logps", arrays["ref_logps"].astype(np.float32))
        if partners is not None:
            if not np.array_equal(
                arrays["kl_partner"], partners
            ):  # pragma: no cover - the key covers the group
                raise RuntimeError(
                    f"Cached KL partners for {name} do not match this run's; clear {self.cache.path(key)}."
                )
            out = with_partner_completions(out, partners)
            out = out.add_column("ref_kl_logps", arrays["ref_kl_logps"].astype(np.float32))
        return out
