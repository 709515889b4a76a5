"""The Mixture-of-Experts router auxiliary (load-balancing) loss, as TRL 1.16's `KTOTrainer` adds it.

A model is a router-logit MoE when its (text) config has an ``output_router_logits`` attribute (Mixtral,
Qwen2-MoE, ...). Its coefficient is `KTOConfig.router_aux_loss_coef`, or when that is None the config's own
``router_aux_loss_coef`` (0.0 if it declares none). When the model is such an MoE and the coefficient is not 0,
the policy's training forward is called with ``output_router_logits=True``, the model computes its own
``aux_loss`` (its load-balancing function over the router logits of every layer, padding masked by the batch's
attention mask), and the step's loss is ``kto_loss + coef * aux_loss``; ``aux_loss`` is logged (mean over
processes). The reference and KL passes are not asked for router logits. Evaluation does the same (TRL adds it
to the evaluation loss too, and logs ``eval_aux_loss``).
"""

from __future__ import annotations

from typing import Any

from ..config import KTOConfig


def _text_config(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None:
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def router_aux_coef(config: KTOConfig, policy: Any) -> float | None:
    """The coefficient of the auxiliary loss for `policy` (unwrapped), or None when no auxiliary loss is added.

    Raises a ValueError when `router_aux_loss_coef` is set (non-zero) for a model that returns no router logits.
    """
    text_config = _text_config(policy)
    is_moe = text_config is not None and hasattr(text_config, "output_router_logits")
    coef = config.router_aux_loss_coef
    if coef and not is_moe:
        raise ValueError(
            f"KTOConfig.router_aux_loss_coef={coef}, but {type(policy).__name__} is not a Mixture-of-Experts model "
            "that returns router logits (its config has no output_router_logits), so there is no auxiliary loss to "
            "weight. Leave router_aux_loss_coef=None (or 0.0) for this model."
        )
    if not is_moe:
        return None
    effective = getattr(text_config, "router_aux_loss_coef", 0.0) if coef is None else coef
    return float(effective) if effective else None
