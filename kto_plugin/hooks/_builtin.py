"""The built-in losses, each an ordinary plugin registered `trylast` so a third-party plugin wins."""

from __future__ import annotations

import torch

from .. import loss
from ..config import KTOConfig
from ..hookspecs import hookimpl


class KTOLossPlugin:
    """`kto`: KTO paper eq. 7, with the KL reference point."""

    name = "kto"

    @hookimpl(trylast=True)
    def kto_loss_types(self) -> dict[str, bool]:
        return {self.name: True}

    @hookimpl(trylast=True)
    def kto_loss(
        self,
        loss_type: str,
        policy_logps: torch.Tensor,
        reference_logps: torch.Tensor,
        kl: torch.Tensor,
        labels: torch.Tensor,
        config: KTOConfig,
    ) -> torch.Tensor | None:
        if loss_type != self.name:
            return None
        return loss.kto_loss(policy_logps, reference_logps, labels, kl, config.beta).losses


class APOZeroUnpairedPlugin:
    """`apo_zero_unpaired`: the unpaired APO-zero loss; needs no KL pass."""

    name = "apo_zero_unpaired"

    @hookimpl(trylast=True)
    def kto_loss_types(self) -> dict[str, bool]:
        return {self.name: False}

    @hookimpl(trylast=True)
    def kto_loss(
        self,
        loss_type: str,
        policy_logps: torch.Tensor,
        reference_logps: torch.Tensor,
        labels: torch.Tensor,
        config: KTOConfig,
    ) -> torch.Tensor | None:
        if loss_type != self.name:
            return None
        return loss.apo_zero_unpaired_loss(policy_logps, reference_logps, labels, config.beta).losses


BUILTIN_PLUGINS = (KTOLossPlugin, APOZeroUnpairedPlugin)
