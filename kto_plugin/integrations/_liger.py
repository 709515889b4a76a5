"""``TrainingArguments.use_liger_kernel`` with KTO: Liger's layer kernels yes, its fused losses no (see
`check_liger`)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback
from transformers.utils import is_liger_kernel_available


def check_liger(args: Any) -> dict[str, Any] | None:
    """The `liger_kernel_config` to train with, or None when `use_liger_kernel` is off.

    The stock Trainer applies Liger's kernels to the policy in `train()`. kto_plugin keeps Liger's layer
    kernels (RMSNorm, RoPE, SwiGLU, ...) and turns off its fused linear cross-entropy, which replaces the
    model's forward: it computes a token-mean cross-entropy whose gradient is fixed inside the forward, while
    KTO's per-token gradient depends on the whole batch's summed log-probs and z0; kto_plugin's own
    completion-only chunked LM head already avoids the `[B, T, V]` logits. Liger's fused KTO loss is not used
    either: it projects every position (prompt included), has no desirable/undesirable weights, and returns
    only sums, so the `kto_loss`/`kto_metrics` hooks and the per-example metrics would need a second pass.
    """
    if not getattr(args, "use_liger_kernel", False):
        return None
    if not is_liger_kernel_available():
        raise ImportError(
            "TrainingArguments.use_liger_kernel=True, but liger-kernel is not installed (it needs Triton "
            "and a CUDA GPU): `pip install liger-kernel`, or set use_liger_kernel=False. kto_plugin does not "
            "need Liger to save memory: its chunked, completion-only LM head never materialises [B, T, V] "
            "logits."
        )
    config = dict(args.liger_kernel_config or {})
    if config.get("fused_linear_cross_entropy"):
        raise ValueError(
            'liger_kernel_config={"fused_linear_cross_entropy": True} is not supported with KTO: it replaces '
            "the model's forward with a token-mean cross-entropy whose gradient is fixed in the forward, and "
            "KTO's is not. Leave it unset: kto_plugin's chunked LM head gives the same memory saving, and "
            "Liger's layer kernels still apply."
        )
    config["fused_linear_cross_entropy"] = False
    return config


class LigerReferenceCallback(TrainerCallback):
    """Gives a frozen-copy reference the Liger kernels the Trainer gives the policy in `train()`."""

    def __init__(self, plugin: Any) -> None:
        self.plugin = plugin

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        reference = self.plugin.reference
        if not args.use_liger_kernel or reference.ref_model is None or reference.given_ref_model is not None:
            return
        # The Trainer has just patched the policy with Liger's kernels; the frozen copy must compute the same
        # function as the initial policy, so it gets the same kernels (a separate ref_model is left as given).
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(
            self.plugin.trainer.accelerator.unwrap_model(reference.ref_model), args.liger_kernel_config
        )


def install_liger(plugin: Any, trainer: Any) -> None:
    config = check_liger(trainer.args)
    if config is None:
        return
    plugin.ledger.setattr(trainer.args, "liger_kernel_config", config)
    plugin.ledger.add_callback(trainer, LigerReferenceCallback(plugin), index=1)
