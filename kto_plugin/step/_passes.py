"""The no-grad forward passes of a KTO step besides the Trainer's own policy forward.

* the policy on the KL (mismatched) batch;
* the reference on the target batch and, for losses with a KL term, on the KL batch: one switch into the
  reference per micro-batch (`ReferenceManager.activate`), or the precomputed log-probs the batch carries.

Call them under `torch.no_grad()`; every result holds (B,) float32 summed completion log-probs and, when asked
(``with_tokens``: a plugin asked for per-token values), the (B, T) per-token log-probs (`SequenceLogps.token_logps`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from ..data._collator import bits_as_float32
from ..data._vision import vision_inputs
from ..reference import ReferenceManager
from ..reference._manager import lm_head_of
from ._logprobs import LogpsPath, SequenceLogps

if TYPE_CHECKING:
    from transformers import Trainer


def model_inputs(labels: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """The model inputs beyond ids and mask (`prefix` "kl_" for the KL batch): an encoder-decoder batch's decoder
    inputs, a vision batch's image inputs; empty for a text batch of a decoder-only model."""
    if f"{prefix}decoder_input_ids" not in labels:
        return vision_inputs(labels, prefix)
    return {
        "decoder_input_ids": labels[f"{prefix}decoder_input_ids"],
        "decoder_attention_mask": labels[f"{prefix}decoder_attention_mask"],
    }


class ReferenceLogps(NamedTuple):
    target: torch.Tensor | None  # (B,) the reference's log-probs of each row's own completion
    kl: torch.Tensor | None  # (B,) of the KL pairs, or None when not asked for
    target_tokens: torch.Tensor | None = None  # (B, T) per token, only `with_tokens`
    kl_tokens: torch.Tensor | None = None  # (B, T) per token of the KL pairs, only `with_tokens` and `with_kl`


class Passes:
    """Runs the no-grad passes for one attached trainer, with the log-prob paths chosen at attach."""

    def __init__(self, reference: ReferenceManager, loss_type: str) -> None:
        self.reference = reference
        self.loss_type = loss_type
        self.policy_path = LogpsPath(False)
        self.reference_path = LogpsPath(False)

    def policy_kl(
        self, model: Any, policy_head: Any, labels: Mapping[str, Any], with_tokens: bool = False
    ) -> SequenceLogps:
        """The policy's log-probs of the KL batch (prompt i, completion of its KL partner)."""
        return self.policy_path.forward(
            model, policy_head, labels["kl_input_ids"], labels["kl_attention_mask"], labels["kl_completion_labels"],
            with_tokens=with_tokens, **model_inputs(labels, "kl_"),
        )

    def reference_logps(
        self, trainer: Trainer, labels: Mapping[str, Any], with_kl: bool, with_target: bool = True,
        with_tokens: bool = False,
    ) -> ReferenceLogps:
        """The reference's log-probs of the target batch and (`with_kl`) the KL batch: precomputed when the batch
        carries them, else a no-grad pass each inside one switch into the reference. The precompute pass calls
        this too, so precomputed and live values come from the same code. `with_target=False` skips the target
        batch (its entry is then None). `with_tokens`: per-token values too (never precomputed; `KTOPlugin` refuses
        precomputed log-probs with a plugin that asks for them)."""
        if "ref_logps_bits" in labels:
            if with_tokens:
                raise ValueError(
                    "A registered plugin asked for per-token log-probs (kto_inputs), but the batch carries "
                    "precomputed reference log-probs, which are sums only. Set precompute_ref_log_probs=False."
                )
            target = bits_as_float32(labels["ref_logps_bits"]) if with_target else None
            return ReferenceLogps(target, self._precomputed_kl(labels, with_kl))
        with self.reference.activate(trainer) as module:
            head = lm_head_of(trainer.accelerator.unwrap_model(module))
            forward = self.reference_path.forward
            kl = target = None
            if with_kl:
                kl = forward(module, head, labels["kl_input_ids"], labels["kl_attention_mask"],
                             labels["kl_completion_labels"], with_tokens=with_tokens, **model_inputs(labels, "kl_"))
            if with_target:
                target = forward(module, head, labels["input_ids"], labels["attention_mask"],
                                 labels["completion_labels"], with_tokens=with_tokens, **model_inputs(labels))
        return ReferenceLogps(
            None if target is None else target.logps, None if kl is None else kl.logps,
            None if target is None else target.token_logps, None if kl is None else kl.token_logps,
        )

    def _precomputed_kl(self, labels: Mapping[str, Any], with_kl: bool) -> torch.Tensor | None:
        if not with_kl:
            return None
        if "ref_kl_logps_bits" not in labels:
            raise ValueError(
                "Precomputed reference log-probs lack 'ref_kl_logps' for "
                f"loss_type={self.loss_type!r}, which needs the KL term: precompute with that "
                "loss type (the column is computed only when the loss needs it)."
            )
        return bits_as_float32(labels["ref_kl_logps_bits"])

    def kl_logps(
        self, trainer: Trainer, labels: Mapping[str, Any], with_tokens: bool = False
    ) -> tuple[SequenceLogps, ReferenceLogps]:
        """The policy's and the reference's log-probs of the KL batch (all the window's z0 needs)."""
        model = trainer.model
        policy = self.policy_kl(model, lm_head_of(trainer.accelerator.unwrap_model(model)), labels, with_tokens)
        return policy, self.reference_logps(trainer, labels, with_kl=True, with_target=False, with_tokens=with_tokens)
