"""The compute-loss hook: what `Trainer.compute_loss_func` calls for every micro-batch, as one KTO step.

The Trainer has already run the policy on the target batch (`outputs`). `KTOComputeLoss.__call__` is the step in
the paper's order: the policy's log-probs from that forward, the no-grad passes (the policy on the KL batch, the
reference on both, switched in once), z0, each row's log-ratio, the loss through the `kto_loss` hook plus the
`kto_loss_terms`, the metrics. Everything it needs beyond `outputs` travels in `labels` (a `KTOLabels` dict from
the collator). Per-token log-probs are computed only when a plugin asked for them (`inputs`, from `kto_inputs`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..config import KTOConfig
from ..hooks import KTOPluginManager
from ..loss import weighted_mean
from ..reference import ReferenceManager
from ..reference._manager import lm_head_of
from ._collectives import gather, reduce_sum
from ._log_ratios import LogRatios
from ._metrics import SUM_KEYS, MetricsAccumulator, micro_batch_sums, record_micro_batch
from ._nonfinite import NonFiniteGuard
from ._passes import Passes
from ._reference_point import ReferencePoint, rows_of

if TYPE_CHECKING:
    from transformers import Trainer

    from ._logprobs import LogpsPath


@dataclasses.dataclass
class EvalBatch:
    """What the step keeps of the last evaluation micro-batch (for `compute_metrics`, see `kto_plugin.integrations`)."""

    policy_logps: torch.Tensor  # (B,) summed completion log-probs of the policy
    reference_logps: torch.Tensor  # (B,) the same for the reference
    rewards: torch.Tensor  # (B,) beta * (policy - reference), as logged
    outputs: Any  # the policy's model outputs (hidden states, or full logits on the logits path)
    lm_head: Any  # the policy's output embedding
    use_hidden: bool  # whether `outputs` come from the hidden-state path (`logits_to_keep=1`)
    seq_len: int  # T of the batch's input_ids

    @torch.no_grad()
    def full_logits(self) -> torch.Tensor:
        """`[B, T, V]` logits of the policy, as `model(input_ids, attention_mask).logits` returns them."""
        hidden_states = getattr(self.outputs, "hidden_states", None)
        if self.use_hidden and hidden_states is not None and self.lm_head is not None:
            return self.lm_head(hidden_states[-1][:, -self.seq_len :])
        return self.outputs.logits[:, -self.seq_len :]


class KTOComputeLoss:
    """Callable as ``(outputs, labels, num_items_in_batch=None) -> loss``, bound to one trainer by `bind`.

    `num_items_in_batch` is ignored: the loss is a mean over the micro-batch (as TRL), so `attach` sets
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
        self.plugins = plugins
        self.metrics = metrics
        self.guard = guard if guard is not None else NonFiniteGuard(config.on_nonfinite)
        self.passes = Passes(reference, config.loss_type)
        self.log_ratios = LogRatios(config, plugins)
        self.z0 = ReferencePoint(config, plugins, needs_kl, self.log_ratios)
        # the optional inputs registered plugins asked for (`kto_inputs`), set by `KTOPlugin`
        self.inputs: set[str] = set()
        self._trainer: Trainer | None = None
        # weight of the MoE router auxiliary loss, None when none is added (`kto_plugin.integrations`)
        self.router_aux_loss_coef: float | None = None
        # the last evaluation micro-batch, for `compute_metrics`; cleared after each prediction step
        self.eval_batch: EvalBatch | None = None

    @property
    def needs_kl(self) -> bool:
        return self.z0.needs_kl

    @needs_kl.setter
    def needs_kl(self, value: bool) -> None:
        self.z0.needs_kl = value

    @property
    def policy_path(self) -> LogpsPath:
        return self.passes.policy_path

    @property
    def reference_path(self) -> LogpsPath:
        return self.passes.reference_path

    def bind(self, trainer: Trainer | None, policy_path: LogpsPath | None = None,
             reference_path: LogpsPath | None = None) -> None:
        """Attach to `trainer` (None: detach) with the log-prob paths chosen for its models."""
        self._trainer = trainer
        if policy_path is not None:
            self.passes.policy_path = policy_path
        if reference_path is not None:
            self.passes.reference_path = reference_path

    @property
    def trainer(self) -> Trainer:
        if self._trainer is None:
            raise RuntimeError(
                "The KTO loss hook is not attached to a Trainer: call kto.attach(trainer) before trainer.train() "
                "(it installs the hook, rather than compute_loss_func=kto.loss_hook)."
            )
        return self._trainer

    def __call__(self, outputs: Any, labels: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        if not isinstance(labels, Mapping) or "completion_labels" not in labels:
            raise ValueError(
                "The KTO loss hook got no KTO labels: the batch was not built by KTOPlugin.collator. Pass "
                "data_collator=kto.collator to the Trainer and keep remove_unused_columns=False."
            )
        trainer = self.trainer
        model = trainer.model
        mode = "train" if model.training else "eval"
        policy_head = lm_head_of(trainer.accelerator.unwrap_model(model))
        label = labels["label"]
        tokens = "token_logps" in self.inputs
        training = mode == "train"
        reduce = reduce_sum(trainer.accelerator)

        # 1. the policy's log-probs of the target batch, from the Trainer's own forward (the gradient flows here)
        policy = self.policy_path.from_outputs(
            outputs, policy_head, labels["completion_labels"], with_stats=True, with_tokens=tokens
        )
        with torch.no_grad():
            # 2. the KL pass: the policy on (prompt i, completion of i's partner); not needed when the window's
            #    z0 applies or the loss has no KL term
            with_kl = self.needs_kl and not self.z0.uses_window(mode)
            policy_kl = (
                self.passes.policy_kl(model, policy_head, labels, outputs, with_tokens=tokens) if with_kl else None
            )
            # 3. the reference on both batches, switched in once
            reference = self.passes.reference_logps(trainer, labels, with_kl=with_kl, with_tokens=tokens)
            # 4. z0 (detached)
            kl = self.z0.for_micro_batch(trainer.accelerator, mode, policy_kl, reference, labels, policy.logps)
        # 5. each row's log-ratio r, as the losses, z0 and the metrics define it
        log_ratios = self.log_ratios(
            policy.logps, reference.target, policy.num_tokens, policy.token_logps, reference.target_tokens
        )
        # 6. the loss, through the kto_loss hook, then the desirable/undesirable weights, then any extra terms
        inputs = dict(
            policy_logps=policy.logps, reference_logps=reference.target, kl=kl, labels=label, config=self.config,
            log_ratios=log_ratios, num_tokens=policy.num_tokens, training=training, reduce_sum=reduce,
        )
        result = self.plugins.loss_result(
            loss_type=self.config.loss_type, policy_token_logps=policy.token_logps,
            reference_token_logps=reference.target_tokens, **inputs,
        )
        loss = weighted_mean(result.losses, label, self.config.desirable_weight, self.config.undesirable_weight)
        terms = self.plugins.loss_terms(**inputs)
        for term in terms.values():
            loss = loss + term
        if self.router_aux_loss_coef is not None:
            loss = loss + self._router_aux_loss(trainer, mode, outputs, loss.device)
        # 7. the metrics, from rewards computed once
        reference_point = kl if result.reference_point is None else result.reference_point.to(kl.device)
        rewards = self.config.beta * log_ratios.detach()
        self._record(trainer, mode, policy, reference.target, rewards, kl, result.losses, labels,
                     log_ratios.detach(), reference_point, {k: v.detach() for k, v in terms.items()})
        if mode == "eval":
            self.eval_batch = EvalBatch(
                policy.logps.detach(), reference.target, rewards, outputs, policy_head, self.policy_path.use_hidden,
                labels.get("decoder_input_ids", labels["input_ids"]).shape[1],
            )
        return loss

    def _record(
        self,
        trainer: Trainer,
        mode: str,
        policy: Any,
        reference_logps: torch.Tensor,
        rewards: torch.Tensor,
        kl: torch.Tensor,
        losses: torch.Tensor,
        labels: Mapping[str, Any],
        log_ratios: torch.Tensor,
        reference_point: torch.Tensor,
        terms: Mapping[str, torch.Tensor],
    ) -> None:
        """This micro-batch's metrics (the loss terms among them), reduced across processes in one all-reduce (every
        rank logs the same); then the non-finite guard, which every rank reaches together."""
        label = labels["label"]
        with torch.no_grad():
            logps = policy.logps.detach()
            # the offending rows: their own log-probs are not finite (or their loss, while z0 is finite: a
            # non-finite z0 makes every loss non-finite and is reported with its KL pairs' rows)
            bad = ~(torch.isfinite(logps) & torch.isfinite(reference_logps))
            kl_finite = bool(torch.isfinite(kl))
            if kl_finite:
                bad |= ~torch.isfinite(losses)
            stats = micro_batch_sums(
                logps, rewards, label, policy.num_tokens, policy.entropy_sum, policy.mean_logit_sum,
                labels["attention_mask"].sum(), bad.sum() + (0 if kl_finite else 1),
            )
            extra = self.plugins.metrics(
                policy_logps=logps, reference_logps=reference_logps, kl=kl, labels=label, losses=losses.detach(),
                config=self.config, log_ratios=log_ratios, reference_point=reference_point,
                num_tokens=policy.num_tokens, training=mode == "train",
            )
            extra.update({name: float(value) for name, value in terms.items() if name not in extra})
            extra_keys = sorted(extra)
            if extra_keys:
                stats = torch.cat([stats, stats.new_tensor([extra[k] for k in extra_keys])])
            accelerator = trainer.accelerator
            if accelerator.num_processes > 1:
                stats = accelerator.reduce(stats, "sum")
            sums = dict(zip(SUM_KEYS + tuple(extra_keys), stats.tolist()))
        if mode == "train":
            self.metrics.total_train_tokens += sums["input_tokens"]
        self.metrics.set_latest(mode, "num_tokens", self.metrics.total_train_tokens)
        record_micro_batch(
            self.metrics, mode, sums, float(kl),
            {key: sums[key] / accelerator.num_processes for key in extra_keys},
        )
        if sums["nonfinite"] > 0:
            kl_rows = list(self.z0.nonfinite_rows) if not kl_finite else []
            self.guard.gather_and_report(trainer, mode, rows_of(labels, bad), kl_rows, float(kl))

    def evaluation_metrics(self) -> dict[str, float]:
        """The plugins' metrics over the whole evaluation just run (`kto_evaluation_metrics`); every process calls
        this when the evaluation's metrics are logged."""
        return self.plugins.evaluation_metrics(config=self.config, gather=gather(self.trainer.accelerator))

    def _router_aux_loss(self, trainer: Trainer, mode: str, outputs: Any, device: torch.device) -> torch.Tensor:
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

    def window_reference_point(self, trainer: Trainer, batches: list[Any]) -> None:
        """z0 over a gradient-accumulation window's micro-batches, as the Trainer fetched them (``kl_estimate=
        "window"``; called by the wrapped `get_batch_samples` before the window's first micro-batch)."""
        model = trainer.model
        self.z0.window = None
        if not batches:
            return
        if not model.training:
            model.train()  # as `training_step` does right after: the KL pass sees the same dropout mode
        device = trainer.accelerator.device
        window = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b["labels"].items()}
                  for b in batches]
        tokens = "token_logps" in self.inputs
        accelerator = trainer.accelerator
        self.z0.start_window(accelerator, window, lambda labels: self.passes.kl_logps(trainer, labels, tokens))
