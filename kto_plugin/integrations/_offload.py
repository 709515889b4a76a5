"""`KTOConfig.activation_offloading`: keep the activations saved for backward in CPU memory, not on the accelerator.

TRL 1.16 wraps each `training_step` in a saved-tensor hook context that copies every activation autograd saves
(on the accelerator, at least 1 KiB, not a parameter or buffer) to (pinned) CPU memory and brings it back when
the backward needs it. `ActivationOffloader` does the same with `torch.autograd.graph.saved_tensors_hooks`, and
`attach()` wraps the trainer instance's `training_step` (`OffloadingTrainingStep`, restored by `detach()`).
Only the policy forward with gradient saves anything: the reference and KL passes run under `torch.no_grad()`.
Gradients are unchanged (the tensors are copied bit for bit). Tensors already in CPU memory are left alone (nothing to gain), so on a
CPU-only machine this is a no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

MIN_OFFLOAD_BYTES = 1024  # smaller tensors cost more in transfers than they save (TRL's default too)


class ActivationOffloader:
    """Saved-tensor hooks that move saved activations to the CPU and back.

    Attributes:
        offload_cpu_tensors: also copy tensors that are already in CPU memory (for tests: exercises the round
            trip on a CPU-only machine; it saves nothing).
        offloaded, offloaded_bytes: tensors (and bytes) moved to the CPU so far.
    """

    def __init__(self, min_bytes: int = MIN_OFFLOAD_BYTES) -> None:
        self.min_bytes = min_bytes
        self.offload_cpu_tensors = False
        self.offloaded = 0
        self.offloaded_bytes = 0
        self._weights: set[int] = set()

    @contextlib.contextmanager
    def __call__(self, model: nn.Module) -> Iterator[None]:
        """Offload what autograd saves while the context is open (the hooks stay with the saved tensors)."""
        # parameters and buffers stay where they are: autograd saves them by reference, copying them would cost
        # memory instead of saving it
        self._weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._weights = set()

    def _pack(self, tensor: torch.Tensor) -> Any:
        on_cpu = tensor.device.type == "cpu"
        size = tensor.numel() * tensor.element_size()
        if (
            (on_cpu and not self.offload_cpu_tensors)
            or size < self.min_bytes
            or tensor.layout is not torch.strided
            or tensor.untyped_storage().data_ptr() in self._weights
        ):
            return tensor
        pin = not on_cpu and torch.cuda.is_available()
        host = torch.empty_like(tensor, device="cpu", pin_memory=pin)
        host.copy_(tensor, non_blocking=pin)
        self.offloaded += 1
        self.offloaded_bytes += size
        return (tensor.device, host)

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=host.is_pinned())


class OffloadingTrainingStep:
    """The trainer's own `training_step`, run inside the offloader (an instance attribute set by `attach`)."""

    PARAMETERS = ("model", "inputs")  # what Trainer.training_step takes first (checked at attach)

    def __init__(self, original: Callable[..., Any], trainer: Any, offloader: ActivationOffloader) -> None:
        self.original = original
        self.trainer = trainer
        self.offloader = offloader

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.offloader(self.trainer.model):
            return self.original(*args, **kwargs)
