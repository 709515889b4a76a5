"""The compute-loss hook: what `Trainer.compute_loss_func` calls for every micro-batch.

The Trainer has already run the policy on the target batch (`outputs`); this hook adds, under no-grad, the
policy on the KL batch and the reference on both, then the loss via the `kto_loss` plugin hook, and records
the metrics. Everything it needs beyond `outputs` travels in `labels` (a `KTOLabels` dict from the collator).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from .collator import bits_as_float32
from .compat import EvalBatch
from .config import KTOConfig
from .logprobs import LogpsPath, SequenceLogps
from .loss import kl_reference_point, weighted_mean
from .metrics import MetricsAccumulator
from .plugin_manager import KTOPluginManager
from .reference import ReferenceManager, lm_head_of

# order of the per-micro-batch sums that are all-reduced in one call
_SUM_KEYS = (
    "n_chosen",
    "n_rejected",
    "reward_chosen",
    "reward_rejected",
    "logps_chosen",
    "logps_rejected",
    "tokens_chosen",
    "tokens_rejected",
    "logit_chosen",
    "logit_rejected",
    "entropy",
    "tokens",
    "input_tokens",
)


def decoder_inputs(labels: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The decoder inputs of an encoder-decoder batch (`prefix` "kl_" for the KL batch); empty otherwise."""
    if f"{prefix}decoder_input_ids" not in labels:
        return {}
    return {
        "decoder_input_ids": labels[f"{prefix}decoder_input_ids"],
        "decoder_attention_mask": labels[f"{prefix}decoder_attention_mask"],
    }


class KTOComputeLoss:
    """Callable as ``(outputs, labels, num_items_in_batch=None) -> loss``, bound to one trainer.

    `num_items_in_batch` is ignored: the loss is a mean over the micro-batch (as TRL), so the plugin sets
    ``trainer.loss_is_scaled_for_ga = False`` and the Trainer divides by the accumulation steps.
    """

    def __init__(
        self,
        config: KTOConfig,
        plugins: KTOPluginManager,
        reference: ReferenceManager,
        metrics: MetricsAccumulator,
        needs_kl: bool,
    ) -> None:
        self.config = config
        self.plugins = plugins
        self.reference = reference
        self.metrics = metrics
        self.needs_kl = needs_kl
        self.policy_path = LogpsPath(False)
        self.reference_path = LogpsPath(False)
        self._trainer: Any = None
        self.total_train_tokens = 0.0
        # the last evaluation micro-batch, for `compat.EvalPredictions` (compute_metrics); cleared after each step
        self.eval_batch: EvalBatch | None = None

    def bind(self, trainer: Any, policy_path: LogpsPath, reference_path: LogpsPath) -> None:
        self._trainer = weakref.ref(trainer)
        self.policy_path = policy_path
        self.reference_path = reference_path

    @property
    def trainer(self) -> Any:
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is None:
            raise RuntimeError("The KTO loss hook is not attached to a live Trainer: call KTOPlugin.attach(trainer).")
        return trainer

    def __call__(self, outputs: Any, labels: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        if labels is None or "completion_labels" not in labels:
            raise ValueError(
                "The KTO loss hook got no KTO labels: the batch was not built by KTOPlugin.collator. Pass "
                "data_collator=kto.collator to the Trainer and keep remove_unused_columns=False."
            )
        trainer = self.trainer
        model = trainer.model
        mode = "train" if model.training else "eval"
        policy_head = lm_head_of(trainer.accelerator.unwrap_model(model))
        label = labels["label"]

        policy = self.policy_path.from_outputs(outputs, policy_head, labels["completion_labels"], with_stats=True)
        reference_logps, policy_kl, reference_kl = self._no_grad_passes(trainer, model, policy_head, labels)

        if self.needs_kl:
            kl = self._reference_point(trainer, policy_kl, reference_kl)
        else:
            kl = policy.logps.new_zeros(())
        losses = self.plugins.loss(
            loss_type=self.config.loss_type,
            policy_logps=policy.logps,
            reference_logps=reference_logps,
            kl=kl,
            labels=label,
            config=self.config,
        )
        loss = weighted_mean(losses, label, self.config.desirable_weight, self.config.undesirable_weight)
        self._record(trainer, mode, policy, reference_logps, kl, label, losses, labels)
        if mode == "eval":
            self.eval_batch = EvalBatch(
                policy.logps.detach(), reference_logps.detach(), outputs, policy_head, self.policy_path.use_hidden,
                labels.get("decoder_input_ids", labels["input_ids"]).shape[1],
            )
        return loss

    def _no_grad_passes(
        self, trainer: Any, model: Any, policy_head: Any, labels: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Reference log-probs of the target batch, and policy/reference log-probs of the KL batch."""
        policy_kl = reference_kl = None
        with torch.no_grad():
            if self.needs_kl:
                policy_kl = self.policy_path.forward(
                    model, policy_head, labels["kl_input_ids"], labels["kl_attention_mask"],
                    labels["kl_completion_labels"], **decoder_inputs(labels, "kl_"),
                ).logps
            if "ref_logps_bits" in labels:
                reference_logps = bits_as_float32(labels["ref_logps_bits"])
                if self.needs_kl and "ref_kl_logps_bits" not in labels:
                    raise ValueError(
                        "Precomputed reference log-probs lack 'ref_kl_logps' for "
                        f"loss_type={self.config.loss_type!r}, which needs the KL term: precompute with that "
                        "loss type (the column is computed only when the loss needs it)."
                    )
                if self.needs_kl:
                    reference_kl = bits_as_float32(labels["ref_kl_logps_bits"])
                return reference_logps, policy_kl, reference_kl
            reference_logps, reference_kl = self.reference_logps(trainer, labels)
        return reference_logps, policy_kl, reference_kl

    def reference_logps(self, trainer: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The reference's summed log-probs of the target batch (B,) and, for KL, of the KL batch (B,).

        Call under `torch.no_grad()`; `labels` is a collated `KTOLabels` on the device. Also used by the
        precompute pass, so precomputed and live reference log-probs come from the same code.
        """
        reference_kl = None
        with self.reference.activate(trainer) as ref_module:
            ref_head = lm_head_of(trainer.accelerator.unwrap_model(ref_module))
            reference_logps = self.reference_path.forward(
                ref_module, ref_head, labels["input_ids"], labels["attention_mask"],
                labels["completion_labels"], **decoder_inputs(labels),
            ).logps
            if self.needs_kl:
                reference_kl = self.reference_path.forward(
                    ref_module, ref_head, labels["kl_input_ids"], labels["kl_attention_mask"],
                    labels["kl_completion_labels"], **decoder_inputs(labels, "kl_"),
                ).logps
        return reference_logps, reference_kl

    def _reference_point(self, trainer: Any, policy_kl: torch.Tensor, reference_kl: torch.Tensor) -> torch.Tensor:
        """z0: the detached, clamped mean log-ratio of mismatched pairs over all processes (paper section 4.1)."""
        custom = self.plugins.reference_point(
            policy_kl_logps=policy_kl, reference_kl_logps=reference_kl, config=self.config
        )
        accelerator = trainer.accelerator
        if custom is not None:
            value = custom.detach().float().reshape(1)
            if accelerator.num_processes > 1:
                value = accelerator.reduce(value, "mean")
            return value.reshape(())
        total, count = kl_reference_point(policy_kl, reference_kl)
        stats = torch.stack([total, count])
        if accelerator.num_processes > 1:
            stats = accelerator.reduce(stats, "sum")
        return (stats[0] / stats[1].clamp(min=1)).clamp(min=0)

    def _record(
        self,
        trainer: Any,
        mode: str,
        policy: SequenceLogps,
        reference_logps: torch.Tensor,
        kl: torch.Tensor,
        label: torch.Tensor,
        losses: torch.Tensor,
        labels: Any,
    ) -> None:
        """Per-micro-batch metrics, reduced across processes in one all-reduce (every rank logs the same)."""
        with torch.no_grad():
            logps = policy.logps.detach()
            rewards = self.config.beta * (logps - reference_logps)
            chosen, rejected = label, ~label
            f = logps.new_tensor
            values = {
                "n_chosen": chosen.sum().float(),
                "n_rejected": rejected.sum().float(),
                "reward_chosen": rewards[chosen].nansum(),
                "reward_rejected": rewards[rejected].nansum(),
                "logps_chosen": logps[chosen].nansum(),
                "logps_rejected": logps[rejected].nansum(),
                "tokens_chosen": policy.num_tokens[chosen].sum(),
                "tokens_rejected": policy.num_tokens[rejected].sum(),
                "logit_chosen": policy.mean_logit_sum[chosen].sum(),
                "logit_rejected": policy.mean_logit_sum[rejected].sum(),
                "entropy": policy.entropy_sum.sum(),
                "tokens": policy.num_tokens.sum(),
                "input_tokens": labels["attention_mask"].sum().float(),
            }
            stats = torch.stack([values[k].float().to(logps.device) for k in _SUM_KEYS])
            extra = self.plugins.metrics(
                policy_logps=policy.logps.detach(),
                reference_logps=reference_logps,
                kl=kl,
                labels=label,
                losses=losses.detach(),
                config=self.config,
            )
            extra_keys = sorted(extra)
            if extra_keys:
                stats = torch.cat([stats, f([extra[k] for k in extra_keys])])
            accelerator = trainer.accelerator
            if accelerator.num_processes > 1:
                stats = accelerator.reduce(stats, "sum")
            s = dict(zip(_SUM_KEYS + tuple(extra_keys), stats.tolist()))
        add = self.metrics.add
        add(mode, "kl", float(kl))
        if s["tokens"] > 0:
            add(mode, "entropy", s["entropy"] / s["tokens"])
        else:
            add(mode, "entropy", 0.0)
        if mode == "train":
            self.total_train_tokens += s["input_tokens"]
        self.metrics.set_latest(mode, "num_tokens", self.total_train_tokens)
        if s["tokens_chosen"] > 0:
            add(mode, "logits/chosen", s["logit_chosen"] / s["tokens_chosen"])
        if s["tokens_rejected"] > 0:
            add(mode, "logits/rejected", s["logit_rejected"] / s["tokens_rejected"])
        if s["n_chosen"] > 0:
            add(mode, "rewards/chosen", s["reward_chosen"] / s["n_chosen"])
            add(mode, "logps/chosen", s["logps_chosen"] / s["n_chosen"])
        if s["n_rejected"] > 0:
            add(mode, "rewards/rejected", s["reward_rejected"] / s["n_rejected"])
            add(mode, "logps/rejected", s["logps_rejected"] / s["n_rejected"])
        if s["n_chosen"] > 0 and s["n_rejected"] > 0:
            add(
                mode,
                "rewards/margins",
                s["reward_chosen"] / s["n_chosen"] - s["reward_rejected"] / s["n_rejected"],
            )
        for key in extra_keys:
            add(mode, key, s[key] / accelerator.num_processes)
