"""Hook specifications: the contract between kto_plugin and third-party plugins.

Implement any of these as functions of a module or methods of an object, mark each with
`kto_plugin.hookimpl`, and pass the module or object as ``KTOPlugin(plugins=[...])``, or ship it in a package
with an entry point in group ``kto_plugin`` (loaded automatically unless ``KTO_PLUGIN_DISABLE_AUTOLOAD=1``).

The contract:

- Hooks are called with keywords, so an implementation takes any subset of the arguments, in any order
  (``def kto_loss(self, loss_type, policy_logps, labels)`` is fine); an argument not in the spec is an error
  at registration, and a misspelled hook name is an error when the plugin is registered or attached.
- Order: plugins passed to `KTOPlugin(plugins=...)` are called first, in list order, then entry-point
  plugins, then the built-ins, which are ``trylast``. ``tryfirst``/``trylast`` on an
  implementation move it. Wrappers (``wrapper=True``, ``hookwrapper=True``) are refused.
- ``firstresult`` hooks stop at the first implementation that returns something other than None, so return
  None for cases you do not handle (e.g. another `loss_type`).
- Shapes use B for the per-device micro-batch; log-probs are float32 on the model's device. Hooks run on
  every process, on that process's micro-batch, in training and in evaluation (no gradient there).
- An exception, a wrong type or shape, or a NaN is reported as a `kto_plugin.PluginError` naming the plugin
  and the hook.
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
    """Declare the loss types this plugin implements, as ``{loss_type: needs_kl}``.

    Called once, when `KTOPlugin` is built (and again at `attach`): a `KTOConfig.loss_type` that no plugin
    declares fails there, listing the declared ones. ``needs_kl`` (a bool) says whether `kto_loss` uses the
    reference point `kl`; when False the KL batch is neither built nor run through the policy and reference,
    `kto_reference_point` is not called, and `kl` is 0. Results of all plugins are merged; the first plugin
    called wins a name (so a third-party plugin may redeclare a built-in one).
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

    :param loss_type: `config.loss_type`.
    :param policy_logps: (B,) float32, summed completion log-probs under the policy (carries the gradient in
        training).
    :param reference_logps: (B,) float32, the same under the reference (no gradient).
    :param kl: () float32, the detached reference point z0, already reduced across processes (0 for losses
        that declared needs_kl=False).
    :param labels: (B,) bool, True for desirable examples.
    :param config: the `KTOConfig` (``config.beta`` etc.).
    :return: (B,) unweighted losses in batch order, differentiable with respect to `policy_logps`;
        kto_plugin multiplies by desirable_weight / undesirable_weight and takes the mean over the batch.
    """


@hookspec(firstresult=True)
def kto_reference_point(
    policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor, config: KTOConfig
) -> torch.Tensor | None:
    """An alternate reference point z0 (a scalar tensor), or None for the default.

    Called only for loss types that declared needs_kl=True. The default is
    ``clamp(sum(policy_kl_logps - reference_kl_logps) / count, min=0)`` with the sum and count taken over all
    processes (KTO paper section 4.1). A value returned here is detached and averaged across processes, but
    not clamped; it reaches `kto_loss` and `kto_metrics` as `kl` and is logged as ``kl``.

    :param policy_kl_logps: (B,) float32, policy log-probs of the mismatched (prompt i, completion i-1) pairs
        (computed without gradient).
    :param reference_kl_logps: (B,) float32, the same under the reference.
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

    Each value (a finite float, int or one-element tensor) is averaged across processes and over the
    logging interval, then logged under its name (``eval_`` or your `metric_key_prefix` in evaluation) to
    `trainer.state.log_history` and every `report_to` integration. Return the same names on every call
    (use 0.0 where a value is undefined, e.g. a batch without desirable rows): the values of all processes
    are reduced in one all-reduce. Names kto_plugin or the Trainer already log (``kl``, ``loss``,
    ``rewards/chosen``, ...) are refused; prefix yours.

    :param policy_logps: (B,) float32, detached.
    :param reference_logps: (B,) float32.
    :param kl: () float32, the reference point z0 used for this micro-batch.
    :param labels: (B,) bool, True for desirable examples.
    :param losses: (B,) the unweighted per-example losses `kto_loss` returned, detached.
    """
