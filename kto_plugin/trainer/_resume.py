"""Exact resume: the plugin's run state travels in each checkpoint's ``trainer_state.json``.

`Trainer.train(resume_from_checkpoint=...)` already restores the weights (the adapter's for a PEFT model), the
optimizer, the scheduler, the RNG states and the data position (it skips the batches already trained on, so the
collator's in-batch KL pairing and any stored ``kl_completion_ids`` partner see the same rows as before). What
only the plugin knows is kept under ``TrainerState.stateful_callbacks["kto_plugin"]``:

* the metrics accumulator (sums and counts since the last log) and the running ``num_tokens`` count, so a log
  whose interval spans the checkpoint averages the same micro-batches as an uninterrupted run;
* every plugin's `kto_state_dict` (BCO's running mean, the EMA of z0), under ``"plugins"``, restored through
  `kto_load_state_dict` before the first resumed step (and reset, with None, when a run starts afresh);
* what identifies the reference: a sampled fingerprint of a separate or frozen-copy reference model, and a
  hash of the train dataset's precomputed ``ref_logps``. A reference must be the *initial* policy: a resumed
  run whose model was loaded from the checkpoint would take its frozen copy (or its precomputed log-probs)
  from trained weights. That is refused in `on_train_begin`, before any step.

With ``sync_ref_model=True`` the reference is no longer the initial policy after a sync: its weights go into the
checkpoint folder (``kto_ref_model.safetensors``, `kto_plugin.reference._sync`) and the resumed run loads them in
`on_train_begin`, after the identity check. They are written when the Trainer has decided to save and before it
writes its own files (`on_step_end` / `on_epoch_end`), so the Trainer's ``trainer_state.json``, written last, marks
a complete checkpoint (`kto_plugin.trainer._checkpoints`); a save decided later (``save_strategy="best"``) gets the
file in `on_save`, after the Trainer's. The Trainer tells callbacks neither the checkpoint it resumes from nor
where the loaded state came from, so `attach` wraps ``trainer.train`` on the instance (`RecordCheckpointTrain`):
it resolves ``resume_from_checkpoint`` to a complete checkpoint and records it.

Why not `transformers.ExportableState`: the Trainer restores those only with
``restore_callback_states_from_checkpoint=True``, by constructing the callback class anew from JSON, while the
plugin's callbacks hold live objects. A key the Trainer does not know is written and read back untouched
(with ``restore_callback_states_from_checkpoint=True`` the Trainer logs that it ignores it).

The state is copied into `TrainerState` after every step, log and evaluation, so it is current whenever the
Trainer writes a checkpoint (which it does after logging and evaluating at a step).
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch
from transformers import TrainerCallback

from ..reference._fingerprint import column_hash, module_fingerprint, tensors_fingerprint
from ..reference._sharding import shards_parameters
from ..reference._sync import REFERENCE_WEIGHTS_NAME, load_reference, read_reference, save_reference
from ._checkpoints import resolve_resume

logger = logging.getLogger("kto_plugin")

STATE_KEY = "kto_plugin"
STATE_FORMAT = 1


# elements sampled per tensor for the resume check (see `kto_plugin.reference._fingerprint`)
SAMPLES = 64


class ResumeCallback(TrainerCallback):
    """Keeps ``state.stateful_callbacks["kto_plugin"]`` current and restores the plugin from it on resume.

    `KTOPlugin.attach` appends it to the callback list, so its `on_log` runs after the metrics callback has
    taken (and reset) the interval's metrics.
    """

    def __init__(self, plugin: Any) -> None:
        self.plugin = plugin
        self._identity: dict[str, str | None] | None = None
        self.checkpoint: str | None = None  # the checkpoint train() resumes from, set by `RecordCheckpointTrain`
        self._reference_saved_at: int | None = None  # the step whose checkpoint has the synced reference

    # --- what identifies the reference ---

    def reference_identity(self) -> dict[str, str | None]:
        """What the reference is, computed once per run: ``reference_kind`` (mode, adapter, copy or not),
        ``reference`` (its description), ``reference_model`` (a fingerprint of a separate or frozen-copy
        reference model, or of the reference adapter's tensors; None for a null reference, whose base model
        is never trained, and for sharded weights) and ``ref_logps`` (a hash of the precomputed column)."""
        if self._identity is None:
            plugin = self.plugin
            trainer = plugin.trainer
            reference = plugin.reference
            fingerprint = None
            sharded = shards_parameters(trainer)
            if reference.ref_model is not None and not sharded:
                fingerprint = module_fingerprint(trainer.accelerator.unwrap_model(reference.ref_model), SAMPLES)
            elif reference.mode == "named_adapter" and not sharded:
                marker = f".{reference.ref_adapter_name}."
                fingerprint = module_fingerprint(
                    trainer.accelerator.unwrap_model(trainer.model), SAMPLES, keep=lambda name: marker in name
                )
            copied = "copy" if reference.created_adapter else ""
            kind = f"{reference.mode}/{reference.ref_adapter_name or ''}/{copied}"
            self._identity = {
                "reference_kind": kind,
                "reference": reference.describe(),
                "reference_model": fingerprint,
                "ref_logps": column_hash(trainer.train_dataset, "ref_logps"),
            }
        return self._identity

    # --- save ---

    def snapshot(self) -> dict[str, Any]:
        plugin = self.plugin
        return {
            "format": STATE_FORMAT,
            "metrics": copy.deepcopy(plugin.metrics.state_dict()),
            "total_train_tokens": plugin.metrics.total_train_tokens,
            "plugins": plugin.plugins.state_dict(),
            "sync_ref_model": bool(plugin.config.sync_ref_model),
            **self.reference_identity(),
        }

    def _export(self, state: Any) -> None:
        if isinstance(state.stateful_callbacks, dict) and self.plugin.trainer is not None:
            state.stateful_callbacks[STATE_KEY] = self.snapshot()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._export(state)
        self._save_reference_before_checkpoint(args, state, control)

    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._export(state)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._export(state)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._export(state)
        self._save_reference_before_checkpoint(args, state, control)

    def _save_reference_before_checkpoint(self, args: Any, state: Any, control: Any) -> None:
        """The Trainer is about to write checkpoint-N (the flow callback decided it, after the sync callback mixed
        this step's update): with sync_ref_model, write the synced reference into that folder first."""
        if control.should_save and not state.is_hyper_param_search:
            self._save_reference(args, state, create=True)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """A save decided after `on_step_end` (``save_strategy="best"``, a callback of the user's) or in another
        folder: the synced reference goes in now, after the Trainer's files."""
        if self._reference_saved_at != state.global_step:
            self._save_reference(args, state, create=False)

    def _save_reference(self, args: Any, state: Any, create: bool) -> None:
        """With sync_ref_model, the reference is no longer the initial policy: its weights go into the checkpoint
        (``kto_ref_model.safetensors``, written atomically by the main process)."""
        plugin = self.plugin
        if not plugin.config.sync_ref_model or plugin.trainer is None or not args.should_save:
            return
        directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if create:
            os.makedirs(directory, exist_ok=True)
        elif not os.path.isdir(directory):
            # the Trainer saves elsewhere (a hyperparameter-search trial's run-N folder): resuming from that
            # checkpoint is refused for want of this file rather than silently using the initial reference
            logger.warning("kto_plugin: no checkpoint folder %s; the synced reference was not saved", directory)
            return
        path = save_reference(plugin.trainer, plugin.reference, directory)
        self._reference_saved_at = state.global_step
        logger.debug("kto_plugin: synced reference saved to %s", path)

    # --- restore ---

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._identity = None
        if self.plugin.trainer is not None:
            self.reference_identity()  # now, before a sync can move the reference
        callbacks = state.stateful_callbacks
        saved = callbacks.get(STATE_KEY) if isinstance(callbacks, dict) else None
        if not saved or state.global_step == 0:
            self.plugin.plugins.load_state_dict(None)  # a run from the start: no state of an earlier run
            return
        if saved.get("format") != STATE_FORMAT:
            raise ValueError(
                f"The checkpoint holds kto_plugin state of format {saved.get('format')!r}; this version reads "
                f"format {STATE_FORMAT}. Resume with the kto_plugin version that wrote it."
            )
        if saved.get("sync_ref_model") and not self.plugin.config.sync_ref_model:
            raise ValueError(
                f"Resuming at step {state.global_step}: the checkpoint holds a synced reference, the first run had "
                "KTOConfig(sync_ref_model=True). Resume with the same KTOConfig (sync_ref_model, "
                "ref_model_mixup_alpha, ref_model_sync_steps)."
            )
        synced = self._synced_reference(state.global_step)
        self._check_reference(
            saved, state.global_step, None if synced is None else tensors_fingerprint(synced[1], SAMPLES)
        )
        if synced is not None:
            load_reference(self.plugin.trainer, self.plugin.reference, synced[1], synced[0])
            logger.info("kto_plugin: synced reference restored from %s", synced[0])
        plugin = self.plugin
        plugin.metrics.load_state_dict(copy.deepcopy(saved["metrics"]))
        plugin.metrics.total_train_tokens = saved["total_train_tokens"]
        plugin.plugins.load_state_dict(saved.get("plugins"))
        logger.info(
            "kto_plugin: resumed at step %d with the checkpoint's metrics and token count", state.global_step
        )

    def _synced_reference(self, step: int) -> tuple[str, dict[str, torch.Tensor]] | None:
        """(path, tensors) of the checkpoint's synced reference, None without sync_ref_model; refuses a resume
        that cannot be exact. The checkpoint folder is known when `train` was called on the attached trainer
        (`RecordCheckpointTrain`); a run without sync_ref_model is refused from the saved state as well (see
        `on_train_begin`)."""
        config = self.plugin.config
        checkpoint = self.checkpoint
        path = None if checkpoint is None else os.path.join(checkpoint, REFERENCE_WEIGHTS_NAME)
        found = path is not None and os.path.isfile(path)
        if found and not config.sync_ref_model:
            raise ValueError(
                f"Resuming at step {step}: the checkpoint holds a synced reference ({path}), the first run had "
                "KTOConfig(sync_ref_model=True). Resume with the same KTOConfig (sync_ref_model, "
                "ref_model_mixup_alpha, ref_model_sync_steps)."
            )
        if not config.sync_ref_model:
            return None
        if found:
            return path, read_reference(path)
        if self.checkpoint is None:
            raise ValueError(
                f"Resuming at step {step} with KTOConfig(sync_ref_model=True), but the checkpoint folder is "
                "unknown, so the synced reference cannot be restored. Call trainer.train(resume_from_checkpoint=...) "
                "on the trainer given to kto.attach(trainer), after attaching."
            )
        if step >= config.ref_model_sync_steps:
            raise ValueError(
                f"Resuming at step {step} with KTOConfig(sync_ref_model=True), but {checkpoint} has no "
                f"{REFERENCE_WEIGHTS_NAME} (a checkpoint written without sync_ref_model or by an older version), "
                "so the reference synced until then is lost and the run would not be exact. Resume from a "
                "checkpoint written with sync_ref_model=True, or train again from the start."
            )
        return None  # no sync has happened yet: the reference is still the initial policy

    def _check_reference(self, saved: dict[str, Any], step: int, synced: str | None = None) -> None:
        """`synced`: the fingerprint of the checkpoint's synced reference, which the reference may already be
        (the Trainer loads every adapter of a PEFT checkpoint, the "ref" adapter too)."""
        now = self.reference_identity()
        if saved.get("reference_kind") and saved["reference_kind"] != now["reference_kind"]:
            raise ValueError(
                f"Resuming at step {step}: the reference is now {now['reference']!r}, but the checkpoint was "
                f"trained against {saved['reference']!r}. The reference must be the initial policy, as in the "
                "first run: build the model as for the first run (e.g. the base model with a fresh adapter, not "
                "the checkpoint's adapter or weights) with the same KTOConfig, ref_model and ref_adapter_name, "
                "and let trainer.train(resume_from_checkpoint=...) load the checkpoint."
            )
        was, now_fp = saved.get("reference_model"), now["reference_model"]
        if was and now_fp and now_fp not in (was, synced):
            raise ValueError(
                f"Resuming at step {step}: the reference model differs from the one the checkpoint was "
                "trained against. A frozen copy (of the model or of its adapter) is taken from the model the "
                "Trainer holds at kto.attach(trainer), which must be the initial policy: build the model as "
                "for the first run (e.g. from_pretrained(<base model>), not from the checkpoint directory) "
                "and let trainer.train(resume_from_checkpoint=...) load the checkpoint's weights. With "
                "ref_model=, pass the same reference as before."
            )
        if saved.get("ref_logps") and now["ref_logps"] and saved["ref_logps"] != now["ref_logps"]:
            raise ValueError(
                f"Resuming at step {step}: the precomputed reference log-probs of the train dataset differ "
                "from those the checkpoint was trained with (precompute_ref_log_probs=True computes them at "
                "kto.attach(trainer) from the model the Trainer holds then). Build the model as for the first "
                "run (the initial policy, not the checkpoint's weights), with the same train dataset and "
                "per_device_train_batch_size, and let trainer.train(resume_from_checkpoint=...) load the "
                "checkpoint."
            )
        if was:
            now["reference_model"] = was  # later checkpoints name the initial reference, as the first run's


class RecordCheckpointTrain:
    """Wraps a trainer's `train` (an instance attribute, undone by `detach`) to resolve ``resume_from_checkpoint``
    to a complete checkpoint (`resolve_resume`: ``True`` is the last complete ``checkpoint-N`` in
    ``args.output_dir``, passing over folders whose save was cut short; an incomplete folder is refused) and to tell
    `ResumeCallback` which checkpoint the run resumes from, so it can load the synced reference saved there: the
    Trainer passes neither the path nor the loaded state's origin to callbacks."""

    PARAMETERS = ("resume_from_checkpoint",)  # Trainer.train's first parameter (checked at attach)

    def __init__(self, original: Any, trainer: Any, callback: ResumeCallback) -> None:
        self.original = original
        self.trainer = trainer
        self.callback = callback

    def __call__(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        resume_from_checkpoint = resolve_resume(resume_from_checkpoint, self.trainer.args.output_dir)
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, bool):
            checkpoint = None  # False, or True with no checkpoint at all: the Trainer raises
        self.callback.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        try:
            return self.original(resume_from_checkpoint, *args, **kwargs)
        finally:
            self.callback.checkpoint = None
