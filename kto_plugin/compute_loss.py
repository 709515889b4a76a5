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
from .nonfinite import NonFiniteGuard
from .plugin_manager import KTOPluginManager
from .reference import ReferenceManager, lm_head_of
from .vision import vision_inputs

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
    "nonfinite",
)


def decoder_inputs(labels: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The model inputs beyond ids and mask (`prefix` "kl_" for the KL batch): an encoder-decoder batch's decoder
    inputs, a vision batch's image inputs (`kto_plugin.vision`); empty for a text batch of a decoder-only model."""
    if f"{prefix}decoder_input_ids" not in labels:
        return vision_inputs(labels, prefix)
    return {
        "decoder_input_ids": labels[f"{prefix}decoder_input_ids"],
        "decoder_attention_mask": labels[f"{prefix}decoder_attention_mask"],
    }


def _to_device(labels: Any, device: Any) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in labels.items()}


def _rows(labels: Any, mask: torch.Tensor) -> list[int]:
    """Row indices (the ``row_index`` column, else positions in the micro-batch) where `mask` is True."""
    positions = mask.nonzero().flatten()
    if "row_index" in labels:
        return labels["row_index"].to(positions.device)[positions].tolist()
    return positions.tolist()


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
        guard: NonFiniteGuard | None = None,
    ) -> None:
        self.config = config
        self.guard = guard if guard is not None else NonFiniteGuard(config.on_nonfinite)
        # kl_estimate="window": z0 of the current gradient-accumulation window, set by `window_reference_point`
        self.window_kl: torch.Tensor | None = None
        self._kl_rows: list[int] = []  # local rows whose KL pair was non-finite (for the report)
        self.plugins = plugins
        self.reference = reference
        self.metrics = metrics
        self.needs_kl = needs_kl
        self.policy_path = LogpsPath(False)
        self.reference_path = LogpsPath(False)
        self._trainer: Any = None
        self.total_train_tokens = 0.0
        # weight of the MoE router auxiliary loss, None when none is added (`kto_plugin.router`)
        self.router_aux_loss_coef: float | None = None
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
        use_window = self.needs_kl and mode == "train" and self.window_kl is not None
        with torch.no_grad():
            if self.needs_kl and not use_window:
                policy_kl, reference_kl = self.kl_logps(trainer, model, policy_head, labels)
                kl = self._reference_point(trainer, policy_kl, reference_kl, labels)
            reference_logps = self._reference_target(trainer, labels)
        if use_window:
            kl = self.window_kl.to(policy.logps.device)
        elif not self.needs_kl:
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
        if self.router_aux_loss_coef is not None:
            loss = loss + self._router_aux_loss(trainer, mode, outputs, loss.device)
        # the offending rows: their own log-probs are not finite (or their loss, while z0 is finite: a
        # non-finite z0 makes every loss non-finite and is reported with its own rows)
        bad = ~(torch.isfinite(policy.logps) & torch.isfinite(reference_logps))
        if bool(torch.isfinite(kl)):
            bad |= ~torch.isfinite(losses)
        n_nonfinite = self._record(trainer, mode, policy, reference_logps, kl, label, losses, labels, bad)
        if n_nonfinite > 0:
            self._report_nonfinite(trainer, mode, labels, bad, kl)
        if mode == "eval":
            self.eval_batch = EvalBatch(
                policy.logps.detach(), reference_logps.detach(), outputs, policy_head, self.policy_path.use_hidden,
                labels.get("decoder_input_ids", labels["input_ids"]).shape[1],
            )
        return loss

    def kl_logps(self, trainer: Any, model: Any, policy_head: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy and reference log-probs (B,) of the KL (mismatched) batch; call under no-grad."""
        policy_kl = self.policy_path.forward(
            model, policy_head, labels["kl_input_ids"], labels["kl_attention_mask"], labels["kl_completion_labels"],
            **decoder_inputs(labels, "kl_"),
        ).logps
        if "ref_logps_bits" in labels:
            if "ref_kl_logps_bits" not in labels:
                raise ValueError(
                    "Precomputed reference log-probs lack 'ref_kl_logps' for "
                    f"loss_type={self.config.loss_type!r}, which needs the KL term: precompute with that "
                    "loss type (the column is computed only when the loss needs it)."
                )
            return policy_kl, bits_as_float32(labels["ref_kl_logps_bits"])
        with self.reference.activate(trainer) as ref_module:
            ref_head = lm_head_of(trainer.accelerator.unwrap_model(ref_module))
            reference_kl = self.reference_path.forward(
                ref_module, ref_head, labels["kl_input_ids"], labels["kl_attention_mask"],
                labels["kl_completion_labels"], **decoder_inputs(labels, "kl_"),
            ).logps
        return policy_kl, reference_kl

    def _router_aux_loss(self, trainer: Any, mode: str, outputs: Any, device: torch.device) -> torch.Tensor:
        """`coef * aux_loss` of the policy forward (the model's own load-balancing loss); logs `aux_loss`."""
        aux = getattr(outputs, "aux_loss", None)
        if aux is None:
            raise ValueError(
                "The policy is a Mixture-of-Experts model with a router auxiliary loss (coefficient "
                f"{self.router_aux_loss_coef}), but its forward returned no aux_loss although the batch asked for "
                "output_router_logits=True. Pass data_collator=kto.collator to the Trainer, or set "
                "KTOConfig(router_aux_loss_coef=0.0) to train without it."
            )
        aux = aux.to(device)
        value = aux.detach().float().reshape(1)
        accelerator = trainer.accelerator
        if accelerator.num_processes > 1:
            value = accelerator.reduce(value, "mean")
        self.metrics.add(mode, "aux_loss", value.item())
        return self.router_aux_loss_coef * aux

    def _reference_target(self, trainer: Any, labels: Any) -> torch.Tensor:
        """The reference's log-probs (B,) of the target batch: precomputed, or a no-grad pass."""
        if "ref_logps_bits" in labels:
            return bits_as_float32(labels["ref_logps_bits"])
        return self.reference_logps(trainer, labels, with_kl=False)[0]

    def window_reference_point(self, trainer: Any, batches: list[Any]) -> None:
        """z0 over a whole gradient-accumulation window (``kl_estimate="window"``), before its first micro-batch.

        `batches`: the window's micro-batches as the Trainer fetched them (`Trainer.get_batch_samples`). The KL
        pass is no-grad and the weights do not change within a window, so the policy's KL log-probs computed
        here are those the per-micro-batch pass would compute; the sums and counts of every micro-batch on
        every process then give one z0 for the window.
        """
        model = trainer.model
        if not model.training:
            model.train()  # as `training_step` does right after: the KL pass sees the same dropout mode
        policy_head = lm_head_of(trainer.accelerator.unwrap_model(model))
        device = trainer.accelerator.device
        policy_kls, reference_kls, row_labels = [], [], []
        with torch.no_grad():
            for batch in batches:
                labels = _to_device(batch["labels"], device)
                policy_kl, reference_kl = self.kl_logps(trainer, model, policy_head, labels)
                policy_kls.append(policy_kl.float())
                reference_kls.append(reference_kl.float())
                row_labels.append(labels)
            policy_kl, reference_kl = torch.cat(policy_kls), torch.cat(reference_kls)
            merged = {}
            if all("row_index" in labels for labels in row_labels):
                merged["row_index"] = torch.cat([labels["row_index"] for labels in row_labels])
            self.window_kl = self._reference_point(trainer, policy_kl, reference_kl, merged)

    def reference_logps(
        self, trainer: Any, labels: Any, with_kl: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
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
            if self.needs_kl and with_kl:
                reference_kl = self.reference_path.forward(
                    ref_module, ref_head, labels["kl_input_ids"], labels["kl_attention_mask"],
                    labels["kl_completion_labels"], **decoder_inputs(labels, "kl_"),
                ).logps
        return reference_logps, reference_kl

    def _reference_point(
        self, trainer: Any, policy_kl: torch.Tensor, reference_kl: torch.Tensor, labels: Any
    ) -> torch.Tensor:
        """z0: the detached, clamped mean log-ratio of mismatched pairs over all processes (paper section 4.1).

        A weighted mean: the sum of the log-ratios and their count are all-reduced, then divided, so a rank
        holding fewer pairs weighs less.
        """
        self._kl_rows = _rows(labels, ~torch.isfinite(policy_kl - reference_kl))
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
        bad: torch.Tensor,
    ) -> float:
        """Per-micro-batch metrics, reduced across processes in one all-reduce (every rank logs the same).

        Returns the number of non-finite rows (plus one per rank if z0 is not finite) over all processes.
        """
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
                "nonfinite": bad.sum().float() + (0.0 if bool(torch.isfinite(kl)) else 1.0),
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
        return s["nonfinite"]

    def _report_nonfinite(self, trainer: Any, mode: str, labels: Any, bad: torch.Tensor, kl: torch.Tensor) -> None:
        """Every rank reaches this together (the count was all-reduced): gather the rows, apply the policy."""
        rows = _rows(labels, bad)
        kl_rows = list(self._kl_rows) if not bool(torch.isfinite(kl)) else []
        if trainer.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            gathered = gather_object([(rows, kl_rows)])
            rows = [r for part in gathered for r in part[0]]
            kl_rows = [r for part in gathered for r in part[1]]
        self.guard.report(trainer, mode, rows, kl_rows, float(kl))
