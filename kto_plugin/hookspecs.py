"""Hook specifications: the contract between kto_plugin and third-party plugins.

Implement any of these in a module or class, mark it with `kto_plugin.hookimpl`, and pass it as
`KTOPlugin(plugins=[...])` or ship it as an entry point in group ``kto_plugin``. Hooks are called with
keywords, so an implementation may take any subset of the arguments. Shapes use B for the per-device batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import torch

    from .config import KTOConfig

PROJECT = "kto_plugin"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kto_loss_types(config: KTOConfig) -> Mapping[str, bool] | None:
    """Declare the loss types this plugin implements: ``{loss_type: needs_kl}``.

    `needs_kl` says whether `kto_loss` uses the reference point `kl`; when False the KL batch is neither
    built nor run through the model. Results of all plugins are merged; the first plugin called wins a
    name (third-party plugins are called before the built-ins).
    """


@hookspec(firstresult=True)
def kto_loss(
    loss_type: str,
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    kl: torch.Tensor,
    labels: torch.Tensor,
    config: KTOConfig,
) -> torch.Tensor | None:
    """Per-example losses for `loss_type`, or None to leave it to another plugin.

    :param policy_logps: (B,) summed completion log-probs under the policy (carries the gradient).
    :param reference_logps: (B,) the same under the reference (no gradient).
    :param kl: () the detached reference point z0 (0 for losses that declared needs_kl=False).
    :param labels: (B,) bool, True for desirable examples.
    :return: (B,) unweighted losses in batch order; kto_plugin applies desirable_weight /
        undesirable_weight and takes the mean.
    """


@hookspec(firstresult=True)
def kto_reference_point(
    policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor, config: KTOConfig
) -> torch.Tensor | None:
    """An alternate reference point z0 (a scalar tensor), or None for the default.

    The default is ``clamp(mean(policy_kl_logps - reference_kl_logps), min=0)`` with the mean taken over all
    processes. A value returned here is averaged across processes and detached, but not clamped.

    :param policy_kl_logps: (B,) policy log-probs of the mismatched (prompt i, completion i-1) pairs.
    :param reference_kl_logps: (B,) the same under the reference.
    """


@hookspec
def kto_metrics(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    kl: torch.Tensor,
    labels: torch.Tensor,
    losses: torch.Tensor,
    config: KTOConfig,
) -> Mapping[str, float] | None:
    """Extra metrics for this micro-batch, as ``{name: number}``; merged from every plugin.

    Each value is averaged across processes and over the logging interval, then logged under its name
    (``eval_`` prefixed in evaluation) to `trainer.state.log_history` and every `report_to` integration.

    :param losses: (B,) the unweighted per-example losses.
    """

