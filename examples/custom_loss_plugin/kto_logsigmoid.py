"""`kto_logsigmoid`: KTO with a log-sigmoid value function, shipped as a kto_plugin plugin.

Source: the paper-era code of the KTO authors, ContextualAI/HALOs, ``legacy`` branch, ``trainers.py``,
``KTOLogSigmoidTrainer`` (loss config ``kto-logsigmoid``), written to study the convexity of the value
function in Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization", ICML 2024
(arXiv 2402.01306). It keeps KTO's reference point z0 and replaces ``1 - sigmoid(m)`` by ``-log sigmoid(m)``:

    desirable y:    loss = -log sigmoid(beta * (r - z0))
    undesirable y:  loss = -log sigmoid(beta * (z0 - r))      r = log pi(y|x) - log pi_ref(y|x)

so the loss no longer saturates for examples the policy already gets wrong by a wide margin. The HALOs
authors kept it as an ablation, not a recommended default. At initialisation (pi = pi_ref, so r = 0 and
z0 = 0) every example's loss is log 2 = 0.6931 and its gradient d loss / d r is -beta/2 (desirable) or +beta/2
(undesirable): twice KTO's beta/4.

Metric ``kto_logsigmoid/grad_weight``: the mean over the micro-batch of ``sigmoid(-m_i)``, where m_i is the
example's margin above (``beta * (r - z0)`` or ``beta * (z0 - r)``). It is ``|d loss_i / d m_i|``, how hard
each example still pushes the policy: 0.5 at initialisation, falling towards 0 as examples are learnt.

Use: install this package (``pip install ./examples/custom_loss_plugin``) and set
``KTOConfig(loss_type="kto_logsigmoid")``; or, without installing, pass the module:
``KTOPlugin(config, tokenizer=tok, plugins=[kto_logsigmoid])``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kto_plugin import KTOConfig, hookimpl

LOSS_TYPE = "kto_logsigmoid"


def margins(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    kl: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """(B,) margins m: ``beta * (r - z0)`` for desirable rows, ``beta * (z0 - r)`` for undesirable ones."""
    r = policy_logps - reference_logps
    return beta * torch.where(labels, r - kl, kl - r)


@hookimpl
def kto_loss_types() -> dict[str, bool]:
    return {LOSS_TYPE: True}  # uses the KL reference point z0


@hookimpl
def kto_loss(
    loss_type: str,
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    kl: torch.Tensor,
    labels: torch.Tensor,
    config: KTOConfig,
) -> torch.Tensor | None:
    """(B,) ``-log sigmoid(m)``; None for other loss types."""
    if loss_type != LOSS_TYPE:
        return None
    return -F.logsigmoid(margins(policy_logps, reference_logps, kl, labels, config.beta))


@hookimpl
def kto_metrics(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    kl: torch.Tensor,
    labels: torch.Tensor,
    config: KTOConfig,
) -> dict[str, torch.Tensor] | None:
    if config.loss_type != LOSS_TYPE:
        return None
    m = margins(policy_logps, reference_logps, kl, labels, config.beta)
    return {"kto_logsigmoid/grad_weight": torch.sigmoid(-m).mean()}
