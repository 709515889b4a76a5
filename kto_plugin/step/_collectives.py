"""The two collectives plugins are handed (``reduce_sum``, ``gather``), bound to a Trainer's accelerator.

Both are the identity on one process; on several, every process must call them the same number of times in the
same order (they are collectives), which holds for hooks every process calls for every micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def reduce_sum(accelerator: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(tensor)``: the element-wise sum of `tensor` over every process, on `tensor`'s device."""
    if accelerator.num_processes == 1:
        return lambda tensor: tensor

    def summed(tensor: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(tensor.to(accelerator.device), "sum").to(tensor.device)

    return summed


def gather(accelerator: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(tensor)``: the 1-D `tensor` of every process concatenated in rank order (sizes may differ), on the CPU."""
    if accelerator.num_processes == 1:
        return lambda tensor: tensor.cpu()

    def gathered(tensor: torch.Tensor) -> torch.Tensor:
        from accelerate.utils import gather_object

        parts = gather_object([tensor.detach().cpu()])
        return torch.cat(parts)

    return gathered
