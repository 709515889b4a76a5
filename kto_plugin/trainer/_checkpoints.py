"""Which checkpoint a run resumes from: never one whose save was cut short.

The Trainer writes a checkpoint folder file by file (weights, optimizer, scheduler, RNG states) and
``trainer_state.json`` last, which also holds the plugin's run state (``stateful_callbacks["kto_plugin"]``). With
``sync_ref_model=True`` the plugin writes the synced reference (``kto_ref_model.safetensors``, atomically) into
the folder *before* the Trainer's files (`kto_plugin.trainer._resume`). So a folder is complete exactly when its
``trainer_state.json`` is there and reads as JSON (and, when that state says the reference was synced, the
reference file is there): a process killed anywhere during the save leaves a folder without them.

The Trainer's ``resume_from_checkpoint=True`` takes the highest-numbered folder whatever it holds, and then fails
on the missing or truncated file. `resolve_resume` takes the last *complete* one instead, naming each incomplete
one it passes over, and refuses an incomplete folder named explicitly, suggesting the last complete one.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any

from ..errors import KTOPluginWarning
from ..reference._sync import REFERENCE_WEIGHTS_NAME

TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # the Trainer's folder names (`transformers.trainer_utils`)


def checkpoint_problem(folder: str) -> str | None:
    """Why `folder` is not a complete checkpoint, or None when it is."""
    state_path = os.path.join(folder, TRAINER_STATE_NAME)
    if not os.path.isfile(state_path):
        return f"it has no {TRAINER_STATE_NAME}, the file the Trainer writes last"
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as err:
        return f"its {TRAINER_STATE_NAME} does not read ({err})"
    callbacks = state.get("stateful_callbacks") if isinstance(state, dict) else None
    saved = callbacks.get("kto_plugin") if isinstance(callbacks, dict) else None
    synced = isinstance(saved, dict) and saved.get("sync_ref_model")
    if synced and not os.path.isfile(os.path.join(folder, REFERENCE_WEIGHTS_NAME)):
        return f"it was written with KTOConfig(sync_ref_model=True) but has no {REFERENCE_WEIGHTS_NAME}"
    return None


def checkpoints(directory: str) -> list[str]:
    """The ``checkpoint-N`` folders in `directory`, newest (highest N) first."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    found = [(int(m.group(1)), n) for n in names if (m := _CHECKPOINT.match(n)) and os.path.isdir(os.path.join(directory, n))]
    return [os.path.join(directory, n) for _, n in sorted(found, reverse=True)]


def _last_complete(directory: str, below: int | None = None) -> str | None:
    for folder in checkpoints(directory):
        step = int(_CHECKPOINT.match(os.path.basename(folder)).group(1))
        if (below is None or step < below) and checkpoint_problem(folder) is None:
            return folder
    return None


def resolve_resume(resume_from_checkpoint: Any, output_dir: str) -> Any:
    """What to give `Trainer.train` for `resume_from_checkpoint`: ``True`` becomes the last complete checkpoint
    in `output_dir` (a `KTOPluginWarning` names each newer, incomplete one); a folder is returned as given if it is
    complete, and refused with a `ValueError` naming the last complete one if not. Anything else (None, False, a
    folder that does not exist, ``True`` without any checkpoint) is returned unchanged for the Trainer to handle."""
    if resume_from_checkpoint is True:
        found = checkpoints(output_dir)
        if not found:
            return resume_from_checkpoint
        skipped = []
        for folder in found:
            problem = checkpoint_problem(folder)
            if problem is None:
                for other, why in skipped:
                    warnings.warn(
                        f"kto_plugin: {other} is incomplete ({why}): its save was cut short. Resuming from {folder}, "
                        "the last complete checkpoint; the resumed run writes the later one again when it gets there.",
                        KTOPluginWarning,
                        stacklevel=4,
                    )
                return folder
            skipped.append((folder, problem))
        listed = "; ".join(f"{folder}: {why}" for folder, why in skipped)
        raise ValueError(
            f"resume_from_checkpoint=True, but no checkpoint in {output_dir} is complete ({listed}): every save was "
            "cut short. Train again from the start (resume_from_checkpoint=None)."
        )
    if isinstance(resume_from_checkpoint, (str, os.PathLike)) and os.path.isdir(resume_from_checkpoint):
        folder = os.fspath(resume_from_checkpoint)
        problem = checkpoint_problem(folder)
        if problem is None:
            return resume_from_checkpoint
        match = _CHECKPOINT.match(os.path.basename(os.path.normpath(folder)))
        previous = _last_complete(os.path.dirname(os.path.normpath(folder)), int(match.group(1)) if match else None)
        suggestion = (
            f"The last complete checkpoint before it is {previous}: pass resume_from_checkpoint={previous!r} (or True, "
            "which skips incomplete checkpoints)." if previous else
            "No earlier complete checkpoint is beside it: train again from the start (resume_from_checkpoint=None)."
        )
        raise ValueError(
            f"Checkpoint {folder} is incomplete ({problem}): its save was cut short, or files were removed since. "
            f"{suggestion}"
        )
    return resume_from_checkpoint
