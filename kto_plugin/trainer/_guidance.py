"""The KTO paper's guidance on settings, as advice given once per setting at attach time.

Sources: KTO paper (Ethayarajh et al. 2024) sections 4-5 and eq. 8, and the recommendations its authors
wrote into TRL's documentation: beta 0.1 (0.01-1.0 is the range discussed); learning rate 5e-7 to 5e-6
for full fine-tuning; per-device batch >= 4 and an effective batch of 16-128; and
``desirable_weight * n_desirable / (undesirable_weight * n_undesirable)`` in [1, 4/3].
"""

from __future__ import annotations

import logging
from typing import Any

import datasets
import pyarrow.compute as pc

from ..data._report import BALANCE_RANGE, Advice, balance_advice  # noqa: F401  (the data's own advice)

logger = logging.getLogger("kto_plugin")

BETA_RANGE = (0.01, 1.0)
LR_RANGE = (5e-7, 5e-6)
MIN_PER_DEVICE_BATCH = 4
EFFECTIVE_BATCH_RANGE = (16, 128)


def settings_advice(
    beta: float,
    learning_rate: float,
    per_device_batch: int,
    effective_batch: int,
    needs_kl: bool,
    is_peft: bool,
) -> list[Advice]:
    """Advice on beta, learning rate and batch sizes; empty when everything is within the guidance."""
    out = []
    if not BETA_RANGE[0] <= beta <= BETA_RANGE[1]:
        out.append(Advice(
            "beta",
            f"beta={beta} is outside {BETA_RANGE[0]}-{BETA_RANGE[1]}; the paper uses 0.1 (lower for large or "
            "already fine-tuned models, higher for small ones). Set KTOConfig(beta=0.1) unless you mean it.",
        ))
    if not is_peft and not LR_RANGE[0] <= learning_rate <= LR_RANGE[1]:
        out.append(Advice(
            "learning_rate",
            f"learning_rate={learning_rate:g} is outside {LR_RANGE[0]:g}-{LR_RANGE[1]:g}, the range the KTO "
            "authors recommend for full fine-tuning (at beta=0.1 stay <= 1e-6; prefer more epochs to a higher "
            "rate). Set TrainingArguments(learning_rate=...) accordingly. (LoRA adapters usually take higher "
            "rates; this advice is not given for PEFT models.)",
        ))
    if needs_kl and per_device_batch < MIN_PER_DEVICE_BATCH:
        out.append(Advice(
            "per_device_batch",
            f"per_device_train_batch_size={per_device_batch}: the KL reference point is estimated within each "
            f"per-device batch, and the authors recommend >= {MIN_PER_DEVICE_BATCH}. Raise it (and lower "
            "gradient_accumulation_steps to keep the effective batch).",
        ))
    low, high = EFFECTIVE_BATCH_RANGE
    if not low <= effective_batch <= high:
        out.append(Advice(
            "effective_batch",
            f"effective batch (per-device x accumulation x processes) = {effective_batch}, outside the "
            f"recommended {low}-{high} for KTO. Adjust gradient_accumulation_steps or the batch size.",
        ))
    return out


def label_counts(trainer: Any) -> tuple[int, int] | None:
    """(desirable, undesirable) rows of the Trainer's own train dataset, the data it trains on (not whichever
    preparation report is called "train": an eval set prepared under that name would be counted instead). None
    for a stream (counted only as it is read) and for a dataset without a `label` column."""
    dataset = getattr(trainer, "train_dataset", None)
    if isinstance(dataset, datasets.IterableDataset):
        return None
    if isinstance(dataset, datasets.Dataset):
        if "label" not in dataset.column_names:
            return None
        desirable = int(pc.sum(dataset.with_format("arrow")["label"]).as_py() or 0)  # one bool column, no rows read
        return desirable, len(dataset) - desirable
    try:
        labels = dataset["label"]
    except (TypeError, KeyError, AttributeError, IndexError):
        return None
    desirable = sum(1 for x in labels if x)
    return desirable, len(labels) - desirable


def attach_advice(config: Any, trainer: Any, needs_kl: bool, is_peft: bool, counts: tuple[int, int] | None) -> list[Advice]:
    """Everything worth saying about this attachment's settings."""
    args = trainer.args
    world = getattr(trainer.accelerator, "num_processes", 1)
    # a user-supplied optimizer (Trainer(optimizers=...)) carries its own rate; args.learning_rate is unused then
    optimizer = getattr(trainer, "optimizer", None)
    learning_rate = optimizer.param_groups[0]["lr"] if optimizer is not None else args.learning_rate
    advice = settings_advice(
        beta=config.beta,
        learning_rate=learning_rate,
        per_device_batch=args.per_device_train_batch_size,
        effective_batch=args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
        needs_kl=needs_kl,
        is_peft=is_peft,
    )
    if counts is not None:
        balance = balance_advice(counts[0], counts[1], config.desirable_weight, config.undesirable_weight)
        if balance is not None:
            advice.append(balance)
    return advice


class Adviser:
    """Logs each piece of advice once per plugin (not once per attach)."""

    def __init__(self) -> None:
        self.given: set[str] = set()

    def give(self, advice: list[Advice]) -> None:
        for item in advice:
            if item.key not in self.given:
                self.given.add(item.key)
                logger.warning("kto_plugin guidance: %s (silence with KTOConfig(warn_guidance=False))", item.message)
