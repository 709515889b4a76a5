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
- The specs evolve additively: a new argument is optional to take, a new hook optional to implement, so a plugin
  written against an earlier version keeps working. Arguments added after the first release: ``log_ratios``,
  ``num_tokens``, the per-token log-probs, ``training``, ``reduce_sum`` (`kto_loss`); ``kl_log_ratios``,
  ``kl_num_tokens``, ``training``, ``reduce_sum`` (`kto_reference_point`); ``log_ratios``, ``reference_point``,
  ``num_tokens``, ``training`` (`kto_metrics`). Hooks added: `kto_inputs`, `kto_log_ratios`, `kto_loss_terms`,
  `kto_evaluation_metrics`, `kto_state_dict`, `kto_load_state_dict`.

Arguments shared by several hooks:

- ``log_ratios``: (B,) float32, each row's log-ratio ``r`` as the losses use it: `kto_log_ratios`'s answer or
  ``policy_logps - reference_logps``, divided by ``num_tokens`` with ``KTOConfig.length_normalize``. It carries
  the gradient in training. Built-in losses take it; a loss of yours that computes ``policy_logps -
  reference_logps`` itself is refused with ``length_normalize`` (it would silently ignore it).
- ``num_tokens``: (B,) float32, completion tokens per row.
- ``policy_token_logps``, ``reference_token_logps``: (B, T) float32 per-token log-probs (entry t is the log-prob
  of token t of the batch where it is a completion token, 0 elsewhere), or None unless a registered plugin asked
  for ``"token_logps"`` in `kto_inputs` (they cost a (B, T) tensor per pass).
- ``training``: True in a training micro-batch, False in evaluation. Keep state (running means) unchanged when
  False, so that evaluating never changes training.
- ``reduce_sum``: a function that sums a tensor over every process (identity on one process), for state that
  must agree across processes. Every process calls the hooks for every micro-batch, so call it the same number of
  times on each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from .config import KTOConfig
    from .loss import KTOLossOutput

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


@hookspec
def kto_inputs(config: KTOConfig) -> Iterable[str] | None:
    """Optional inputs this plugin needs under `config`: ``{"token_logps"}`` for the per-token log-probs
    (``policy_token_logps``, ``reference_token_logps``, and for the KL pairs in `kto_log_ratios`), or None.

    Called at `KTOPlugin(...)` and `attach`; what no plugin asks for is never computed. Per-token values are not
    precomputed: asking for them with ``precompute_ref_log_probs=True`` is refused at `KTOPlugin(...)`.
    """


@hookspec(firstresult=True)
def kto_log_ratios(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    num_tokens: torch.Tensor,
    policy_token_logps: torch.Tensor | None,
    reference_token_logps: torch.Tensor | None,
    config: KTOConfig,
) -> torch.Tensor | None:
    """Each row's log-ratio ``r`` (B,), or None for the default ``policy_logps - reference_logps``.

    Called for the target rows (the gradient flows through `policy_logps` / `policy_token_logps`) and, without
    gradient, for the mismatched KL pairs, so that the losses and z0 use one definition. With
    ``KTOConfig.length_normalize`` the result is then divided by `num_tokens`. Built-in: humanline's per-token
    clamp (``loss_type="humanline"``).
    """


@hookspec(firstresult=True)
def kto_loss(
    loss_type: str,
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    kl: torch.Tensor,
    labels: torch.Tensor,
    config: KTOConfig,
    log_ratios: torch.Tensor,
    num_tokens: torch.Tensor,
    policy_token_logps: torch.Tensor | None,
    reference_token_logps: torch.Tensor | None,
    training: bool,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor | KTOLossOutput | None:
    """Per-example losses for `loss_type`, or None to leave it to another plugin.

    :param loss_type: `config.loss_type`.
    :param policy_logps: (B,) float32, summed completion log-probs under the policy (carries the gradient in
        training).
    :param reference_logps: (B,) float32, the same under the reference (no gradient).
    :param kl: () float32, the detached reference point z0, already reduced across processes (0 for losses
        that declared needs_kl=False).
    :param labels: (B,) bool, True for desirable examples.
    :param config: the `KTOConfig` (``config.beta`` etc.).
    :param log_ratios: (B,) each row's ``r`` (see the module docstring); use it rather than ``policy_logps -
        reference_logps`` so that `kto_log_ratios` and ``length_normalize`` apply.
    :return: (B,) unweighted losses in batch order, differentiable with respect to `policy_logps`;
        kto_plugin multiplies by desirable_weight / undesirable_weight and takes the mean over the batch. Or a
        `kto_plugin.loss.KTOLossOutput`, as the functions of `kto_plugin.loss` return: its `kl` then tells which
        reference point the losses compared log-ratios with (BCO's running mean), which `kto_metrics` receives
        as ``reference_point`` (the reward accuracy compares with it).
    """


@hookspec(firstresult=True)
def kto_reference_point(
    policy_kl_logps: torch.Tensor,
    reference_kl_logps: torch.Tensor,
    config: KTOConfig,
    kl_log_ratios: torch.Tensor,
    kl_num_tokens: torch.Tensor,
    training: bool,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor | None:
    """An alternate reference point z0 (a scalar tensor), or None for the default.

    Called only for loss types that declared needs_kl=True: once per micro-batch, or once per gradient-accumulation
    window in training with ``kl_estimate="window"`` (then over the whole window's pairs). The default is
    ``clamp(sum(kl_log_ratios) / count, min=0)`` with the sum and count taken over all processes (KTO paper
    section 4.1). A value returned here is detached and averaged across processes (a value already equal on every
    process, reduced with `reduce_sum`, stays as it is), but not clamped; it reaches `kto_loss` and `kto_metrics`
    as `kl` and is logged as ``kl``. Built-in: ``KTOConfig.reference_point`` ``"positive_mean"`` and ``"ema"``.

    :param policy_kl_logps: (B,) float32, policy log-probs of the mismatched (prompt i, completion i-1) pairs
        (computed without gradient).
    :param reference_kl_logps: (B,) float32, the same under the reference.
    :param kl_log_ratios: (B,) the pairs' log-ratios as the losses define them (`kto_log_ratios`,
        ``length_normalize``); ``policy_kl_logps - reference_kl_logps`` by default.
    :param kl_num_tokens: (B,) completion tokens of each pair.
    """


@hookspec
def kto_loss_terms(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    log_ratios: torch.Tensor,
    num_tokens: torch.Tensor,
    kl: torch.Tensor,
    labels: torch.Tensor,
    config: KTOConfig,
    training: bool,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor],
) -> Mapping[str, torch.Tensor] | None:
    """Extra terms of the micro-batch loss, as ``{name: scalar tensor}``; merged from every plugin.

    Each term is added to the weighted mean of the `kto_loss` losses (it carries a gradient in training) and its
    value is logged under its name like a `kto_metrics` value (so return the same names on every call).
    Built-in: ``sft_loss``, the SFT term of ``KTOConfig.sft_weight``.
    """


@hookspec
def kto_metrics(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    kl: torch.Tensor,
    labels: torch.Tensor,
    losses: torch.Tensor,
    config: KTOConfig,
    log_ratios: torch.Tensor,
    reference_point: torch.Tensor,
    num_tokens: torch.Tensor,
    training: bool,
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
    :param log_ratios: (B,) each row's log-ratio as the loss used it, detached (``beta * log_ratios`` is what is
        logged as ``rewards/*``).
    :param reference_point: () the reference point the loss compared log-ratios with: `kl`, or the `kl` of a
        `KTOLossOutput` the loss returned (BCO's running mean).
    """


@hookspec
def kto_evaluation_metrics(
    config: KTOConfig, gather: Callable[[torch.Tensor], torch.Tensor]
) -> Mapping[str, float] | None:
    """Metrics over a whole evaluation (``trainer.evaluate()`` or ``predict()``), as ``{name: number}``, logged once
    with the evaluation's prefix; merged from every plugin. Called on every process when the evaluation's metrics
    are logged; collect what you need in `kto_metrics` (``training=False``) and reset it here.

    :param gather: concatenates a 1-D tensor from every process, in rank order (sizes may differ); call it the
        same number of times on each process. Built-in: ``rewards/auroc``.
    """


@hookspec
def kto_state_dict() -> Mapping[str, Any] | None:
    """This plugin's state that must survive a checkpoint (running means, moving averages), as JSON-serialisable
    values (numbers, strings, lists, dicts), or None for none.

    Saved with every checkpoint under ``TrainerState.stateful_callbacks["kto_plugin"]["plugins"][<plugin name>]``
    (Python floats round-trip exactly through JSON). Keep it equal on every process (reduce with ``reduce_sum``).
    """


@hookspec
def kto_load_state_dict(state: Mapping[str, Any] | None) -> None:
    """Restore what `kto_state_dict` returned, at the start of `trainer.train()`: the checkpoint's state when
    resuming, None for a run that starts afresh (forget any state of an earlier run)."""
