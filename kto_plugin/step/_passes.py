"""The no-grad forward passes of a KTO step besides the Trainer's own policy forward.

* the policy on the KL (mismatched) batch;
* the reference on the target batch and, for losses with a KL term, on the KL batch: one switch into the
  reference per micro-batch (`ReferenceManager.activate`), or the precomputed log-probs the batch carries.

Where the model and the batch allow it (`_shared_prompt`), each prompt is computed once per model: the policy's KL
pass scores the KL completions against the Trainer's forward's cache of the prompts, and the reference runs the
prompts once and both completion sets against them. Otherwise every pass runs full rows. On the CPU the rows of
these passes run in groups of similar length (`_buckets`).

Call them under `torch.no_grad()`; every result holds (B,) float32 summed completion log-probs and, when asked
(``with_tokens``: a plugin asked for per-token values), the (B, T) per-token log-probs (`SequenceLogps.token_logps`),
laid out like the batch's completion labels whichever way they were computed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from ..data._collator import bits_as_float32
from ..data._vision import vision_inputs
from ..reference import ReferenceManager
from ..reference._manager import lm_head_of
from ._buckets import run_grouped
from ._logprobs import LogpsPath, SequenceLogps
from ._shared_prompt import (
    OFF, PromptSharing, SharedLayout, fits_window, prompt_pass, prompt_state_of, score_completions,
)

if TYPE_CHECKING:
    from transformers import Trainer

logger = logging.getLogger("kto_plugin")


def model_inputs(labels: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """The model inputs beyond ids and mask (`prefix` "kl_" for the KL batch): an encoder-decoder batch's decoder
    inputs, a vision batch's image inputs; empty for a text batch of a decoder-only model."""
    if f"{prefix}decoder_input_ids" not in labels:
        return vision_inputs(labels, prefix)
    return {
        "decoder_input_ids": labels[f"{prefix}decoder_input_ids"],
        "decoder_attention_mask": labels[f"{prefix}decoder_attention_mask"],
    }


def _no_cache(module: Any, what: str) -> PromptSharing:
    """Sharing off from now on, said once: a forward asked for a cache returned none (a setting `choose_sharing`
    did not foresee)."""
    reason = f"{type(module).__name__} returned no key/value cache for use_cache=True"
    logger.warning("kto_plugin: the %s full rows from now on: %s", what, reason)
    return PromptSharing(False, reason)


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
        # whether each model's passes compute each prompt once (`_shared_prompt.choose_sharing`, set at attach)
        self.policy_sharing: PromptSharing = OFF
        self.reference_sharing: PromptSharing = OFF
        # whether the passes run their rows in groups of similar length (`_buckets.use_buckets`, set at attach)
        self.bucketed = False

    def policy_kl(
        self, model: Any, policy_head: Any, labels: Mapping[str, Any], outputs: Any = None, with_tokens: bool = False
    ) -> SequenceLogps:
        """The policy's log-probs of the KL batch (prompt i, completion of its KL partner). `outputs`: the Trainer's
        forward of the target batch; where it holds the prompts' cache, only the KL completions are computed."""
        sharing, path = self.policy_sharing, self.policy_path
        layout = self._layout(labels, sharing, path) if outputs is not None else None
        prompt = prompt_state_of(outputs, layout, sharing) if layout is not None else None
        if layout is not None and prompt is None:
            self.policy_sharing = _no_cache(model, "policy's KL pass runs")
        if prompt is not None:
            return score_completions(
                model, policy_head, path, prompt, layout, layout.kl, sharing, self.bucketed,
                labels["kl_completion_labels"].shape[1] if with_tokens else None,
            )
        return self._full_rows(model, policy_head, path, labels, "kl_", with_tokens)

    def reference_logps(
        self, trainer: Trainer, labels: Mapping[str, Any], with_kl: bool, with_target: bool = True,
        with_tokens: bool = False,
    ) -> ReferenceLogps:
        """The reference's log-probs of the target batch and (`with_kl`) the KL batch: precomputed when the batch
        carries them, else no-grad passes inside one switch into the reference (the prompts once and both
        completion sets against them, or each batch in full rows). The precompute pass calls this too, so
        precomputed and live values come from the same code. `with_target=False` skips the target batch (its entry
        is then None). `with_tokens`: per-token values too (never precomputed; `KTOPlugin` refuses precomputed
        log-probs with a plugin that asks for them)."""
        if "ref_logps_bits" in labels:
            if with_tokens:
                raise ValueError(
                    "A registered plugin asked for per-token log-probs (kto_inputs), but the batch carries "
                    "precomputed reference log-probs, which are sums only. Set precompute_ref_log_probs=False."
                )
            target = bits_as_float32(labels["ref_logps_bits"]) if with_target else None
            return ReferenceLogps(target, self._precomputed_kl(labels, with_kl))
        sharing, path = self.reference_sharing, self.reference_path
        layout = self._layout(labels, sharing, path) if with_kl and with_target else None
        with self.reference.activate(trainer) as module:
            head = lm_head_of(trainer.accelerator.unwrap_model(module))
            shared = None if layout is None else self._shared_reference(module, head, labels, layout, with_tokens)
            if shared is not None:
                return shared
            kl = self._full_rows(module, head, path, labels, "kl_", with_tokens) if with_kl else None
            target = self._full_rows(module, head, path, labels, "", with_tokens) if with_target else None
        return ReferenceLogps(
            None if target is None else target.logps, None if kl is None else kl.logps,
            None if target is None else target.token_logps, None if kl is None else kl.token_logps,
        )

    def _shared_reference(
        self, module: Any, head: Any, labels: Mapping[str, Any], layout: SharedLayout, with_tokens: bool
    ) -> ReferenceLogps | None:
        """Both batches' reference log-probs from one pass over the prompts and one over both completion sets; None
        (and full rows from then on, with a warning) when the module kept no cache."""
        sharing, path = self.reference_sharing, self.reference_path
        prompt = prompt_pass(module, labels["input_ids"], layout, sharing, self.bucketed)
        if prompt is None:
            self.reference_sharing = _no_cache(module, "reference's passes run")
            return None
        widths = labels["completion_labels"].shape[1], labels["kl_completion_labels"].shape[1]
        both = score_completions(
            module, head, path, prompt, layout, layout.completions, sharing, self.bucketed,
            max(widths) if with_tokens else None,
        )
        target, kl = both.logps.chunk(2)
        if not with_tokens:
            return ReferenceLogps(target, kl)
        target_tokens, kl_tokens = both.token_logps.chunk(2)
        return ReferenceLogps(target, kl, target_tokens[:, : widths[0]], kl_tokens[:, : widths[1]])

    def _layout(self, labels: Mapping[str, Any], sharing: PromptSharing, path: LogpsPath) -> SharedLayout | None:
        """The batch cut into prompts and completions, or None where its passes run full rows."""
        if not sharing.on or "kl_input_ids" not in labels or model_inputs(labels):
            return None
        layout = SharedLayout.of(labels, path.ignore_index)
        return layout if layout is not None and fits_window(layout, sharing) else None

    def _full_rows(
        self, module: Any, head: Any, path: LogpsPath, labels: Mapping[str, Any], prefix: str = "",
        with_tokens: bool = False,
    ) -> SequenceLogps:
        """`module`'s log-probs of the target batch (`prefix` "") or the KL batch ("kl_"), full rows (right-padded,
        so a group of rows is cut to its longest, and its per-token values padded back to the batch's width)."""
        ids, mask = labels[f"{prefix}input_ids"], labels[f"{prefix}attention_mask"]
        completion_labels = labels[f"{prefix}completion_labels"]
        extra = model_inputs(labels, prefix)
        if extra:  # decoder or image inputs: one call over the whole batch
            return path.forward(module, head, ids, mask, completion_labels, with_tokens=with_tokens, **extra)

        def run(rows: torch.Tensor | slice, width: int) -> SequenceLogps:
            out = path.forward(
                module, head, ids[rows, :width], mask[rows, :width], completion_labels[rows, :width],
                with_tokens=with_tokens,
            )
            if out.token_logps is not None:
                out.token_logps = torch.nn.functional.pad(out.token_logps, (0, ids.shape[1] - width))
            return out

        return run_grouped(mask.sum(1), self.bucketed, run)

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
        policy = self.policy_kl(model, lm_head_of(trainer.accelerator.unwrap_model(model)), labels,
                                with_tokens=with_tokens)
        return policy, self.reference_logps(trainer, labels, with_kl=True, with_target=False, with_tokens=with_tokens)
