"""Each row's log-ratio ``r``, the one definition the losses, z0 and the metrics share.

``r = log pi(y|x) - log pi_ref(y|x)`` summed over completion tokens, unless a plugin's `kto_log_ratios` defines it
otherwise (humanline's per-token clamp); then, with ``KTOConfig.length_normalize``, divided by the completion's
token count (`kto_plugin.loss.length_normalized`). The same rule applies to the target rows (with gradient) and to
the mismatched KL pairs (without).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..config import KTOConfig
from ..loss import length_normalized

if TYPE_CHECKING:
    from ..hooks import KTOPluginManager


class LogRatios:
    """Callable as ``(policy_logps, reference_logps, num_tokens, policy_tokens, reference_tokens) -> r`` (B,)."""

    def __init__(self, config: KTOConfig, plugins: KTOPluginManager) -> None:
        self.config = config
        self.plugins = plugins

    def __call__(
        self,
        policy_logps: torch.Tensor,
        reference_logps: torch.Tensor,
        num_tokens: torch.Tensor,
        policy_tokens: torch.Tensor | None = None,
        reference_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ratios = self.plugins.log_ratios(
            policy_logps=policy_logps, reference_logps=reference_logps, num_tokens=num_tokens,
            policy_token_logps=policy_tokens, reference_token_logps=reference_tokens, config=self.config,
        )
        if ratios is None:
            ratios = policy_logps - reference_logps
        if self.config.length_normalize:
            ratios = length_normalized(ratios, num_tokens)
        return ratios
