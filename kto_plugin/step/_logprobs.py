"""Summed completion log-probs without materialising a full-vocabulary float32 log-softmax.

Two paths, chosen once per model at attach (`LogpsPath`):

* ``hidden`` (default): the model runs with ``output_hidden_states=True, logits_to_keep=1`` so its LM head
  projects one position only; we project the final hidden states of *completion positions only*, in
  token chunks sized so one float32 chunk of logits stays under a fixed budget, inside a custom autograd
  function that recomputes each chunk in the backward. Peak memory of this step is flat in vocabulary size.
* ``logits``: for models whose LM head we cannot reproduce exactly (logit soft-capping or scaling, an
  adapter on the LM head, FSDP-sharded weights, models without `logits_to_keep`): the model's own logits,
  log-softmaxed a chunk of completion positions at a time.

Both give ``sum_t log pi(y_t | x, y_<t)`` over completion tokens (KTO paper eq. 7 uses the sum, not the mean), and,
only when asked (``with_tokens=True``: a registered plugin asked for per-token values through `kto_inputs`), the
per-token log-probs as a (B, T) tensor laid out like the completion labels.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data._collator import IGNORE_INDEX
# float32 elements of one chunk of logits, whatever the vocabulary size: 16 MiB on the CPU (measured: smaller
# chunks cost step time, larger ones RSS), 256 MiB on accelerators, where small matmuls waste the device
CHUNK_ELEMENTS = 2**22
ACCELERATOR_CHUNK_ELEMENTS = 2**26
# config attributes that change logits after the LM head; with any of them set we use the model's own logits
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


@dataclass
class SequenceLogps:
    """Per-sequence results of one forward.

    `logps` (and `token_logps`) carry the gradient; the statistics are detached and only filled when asked for.
    """

    logps: torch.Tensor  # (B,) float32: summed completion log-probs
    num_tokens: torch.Tensor  # (B,) completion tokens scored per row
    entropy_sum: torch.Tensor | None = None  # (B,) summed per-token entropy
    mean_logit_sum: torch.Tensor | None = None  # (B,) summed per-token mean logit (over the vocabulary)
    # (B, T) float32, only with `with_tokens`: entry t is log pi(token t | tokens < t) where token t is a completion
    # token (completion_labels[b, t] != ignore index), 0 elsewhere; `logps` is its sum over t
    token_logps: torch.Tensor | None = None


def _chunk_tokens(vocab_size: int, device: torch.device) -> int:
    budget = CHUNK_ELEMENTS if device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    return max(1, budget // max(vocab_size, 1))


def _project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logits.float()


class _ChunkedCompletionLogps(torch.autograd.Function):
    """log_softmax(hidden @ weight.T + bias)[target], computed and differentiated chunk by chunk.

    forward:  hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) -> logps (N,) float32,
              and, when `with_stats`, entropy (N,) and mean logit (N,) as non-differentiable outputs.
    backward: d logp_i / d logits_ij = 1[j = target_i] - softmax_ij, recomputed per chunk, so no (N, V)
              tensor is ever kept.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, with_stats):  # type: ignore[override]
        n_tokens = hidden.shape[0]
        step = _chunk_tokens(weight.shape[0], hidden.device)
        logps = hidden.new_empty(n_tokens, dtype=torch.float32)
        log_z = hidden.new_empty(n_tokens, dtype=torch.float32)
        entropy = hidden.new_empty(n_tokens if with_stats else 0, dtype=torch.float32)
        mean_logit = hidden.new_empty(n_tokens if with_stats else 0, dtype=torch.float32)
        for start in range(0, n_tokens, step):
            end = min(start + step, n_tokens)
            logits = _project(hidden[start:end], weight, bias)
            lz = torch.logsumexp(logits, dim=-1)
            log_z[start:end] = lz
            logps[start:end] = logits.gather(-1, targets[start:end, None]).squeeze(-1) - lz
            if with_stats:
                probs = torch.exp(logits - lz[:, None])
                entropy[start:end] = lz - (probs * logits).sum(-1)
                mean_logit[start:end] = logits.mean(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, log_z)
        ctx.mark_non_differentiable(entropy, mean_logit)
        return logps, entropy, mean_logit

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy, _grad_mean_logit):  # type: ignore[override]
        hidden, weight, bias, targets, log_z = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # accumulate weight/bias gradients in float32 across chunks, cast once at the end
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = (
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
            if need_bias and bias is not None
            else None
        )
        if grad_logps is None:
            grad_logps = torch.zeros_like(log_z)
        step = _chunk_tokens(weight.shape[0], hidden.device)
        for start in range(0, hidden.shape[0], step):
            end = min(start + step, hidden.shape[0])
            h = hidden[start:end]
            g = grad_logps[start:end].float()
            logits = _project(h, weight, bias)
            grad_logits = torch.exp(logits - log_z[start:end, None]).mul_(-g[:, None])
            grad_logits.scatter_add_(-1, targets[start:end, None], g[:, None])
            if grad_hidden is not None:
                grad_hidden[start:end] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), h.float())
            if grad_bias is not None:
                grad_bias.add_(grad_logits.sum(0))
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def completion_index(
    completion_labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows, positions and targets of every scored token.

    `completion_labels` is (B, T) with the token id where the token is a completion token and `ignore_index`
    (`KTOConfig.label_pad_token_id`, -100) elsewhere. The logits at position t predict token t + 1, so position t
    is scored when label t + 1 is not `ignore_index`. Returns `(rows, positions, targets)`, each (N,).
    """
    shifted = completion_labels[:, 1:]
    rows, positions = (shifted != ignore_index).nonzero(as_tuple=True)
    return rows, positions, shifted[rows, positions]


def completion_token_counts(completion_labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(B,) float32: completion tokens scored per row, the `num_tokens` of `SequenceLogps` (from labels alone, so
    also for batches whose log-probs were precomputed)."""
    return (completion_labels[:, 1:] != ignore_index).sum(-1).float()


def _per_row(values: torch.Tensor, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    return values.new_zeros(batch_size).index_add(0, rows, values)


def _per_token(values: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # position p scores token p + 1 (`completion_index`): the value goes where that token's label is
    return values.new_zeros(shape).index_put((rows, positions + 1), values)


def logps_from_hidden(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    completion_labels: torch.Tensor,
    with_stats: bool = False,
    ignore_index: int = IGNORE_INDEX,
    with_tokens: bool = False,
) -> SequenceLogps:
    """Summed completion log-probs from final hidden states (B, T', H); T' >= T keeps the last T positions."""
    batch_size, seq_len = completion_labels.shape
    hidden = hidden[:, -seq_len:]  # prompt-learning adapters prepend virtual tokens
    rows, positions, targets = completion_index(completion_labels, ignore_index)
    weight = lm_head.weight
    bias = getattr(lm_head, "bias", None)
    token_hidden = hidden[rows, positions].to(weight.device)
    token_logps, entropy, mean_logit = _ChunkedCompletionLogps.apply(
        token_hidden, weight, bias, targets.to(weight.device), with_stats
    )
    out = _assemble(token_logps, entropy, mean_logit, rows.to(weight.device), batch_size, with_stats)
    if with_tokens:
        device = weight.device
        out.token_logps = _per_token(token_logps, rows.to(device), positions.to(device), completion_labels.shape)
    return out


def logps_from_logits(
    logits: torch.Tensor, completion_labels: torch.Tensor, with_stats: bool = False,
    ignore_index: int = IGNORE_INDEX, with_tokens: bool = False,
) -> SequenceLogps:
    """Summed completion log-probs from the model's own logits (B, T', V), a chunk of positions at a time."""
    batch_size, seq_len = completion_labels.shape
    logits = logits[:, -seq_len:]
    rows, positions, targets = completion_index(completion_labels, ignore_index)
    step = _chunk_tokens(logits.shape[-1], logits.device)
    parts, entropies, means = [], [], []
    for start in range(0, rows.numel(), step):
        chunk = logits[rows[start : start + step], positions[start : start + step]].float()
        log_probs = chunk.log_softmax(-1)
        parts.append(log_probs.gather(-1, targets[start : start + step, None]).squeeze(-1))
        if with_stats:
            with torch.no_grad():
                entropies.append(-(log_probs.exp() * log_probs).sum(-1))
                means.append(chunk.mean(-1))
    empty = logits.new_zeros(0, dtype=torch.float32)
    token_logps = torch.cat(parts) if parts else empty
    entropy = torch.cat(entropies) if entropies else empty
    mean_logit = torch.cat(means) if means else empty
    out = _assemble(token_logps, entropy, mean_logit, rows, batch_size, with_stats)
    if with_tokens:
        out.token_logps = _per_token(token_logps, rows, positions, completion_labels.shape)
    return out


def _assemble(token_logps, entropy, mean_logit, rows, batch_size, with_stats) -> SequenceLogps:
    ones = torch.ones_like(token_logps, dtype=torch.float32).detach()
    out = SequenceLogps(
        logps=_per_row(token_logps, rows, batch_size),
        num_tokens=_per_row(ones, rows, batch_size),
    )
    if with_stats:
        out.entropy_sum = _per_row(entropy.detach(), rows, batch_size)
        out.mean_logit_sum = _per_row(mean_logit.detach(), rows, batch_size)
    return out


class LogpsPath:
    """How log-probs are read from a given model: decided once per model, then applied to every forward."""

    def __init__(self, use_hidden: bool, reason: str = "") -> None:
        self.use_hidden = use_hidden
        self.reason = reason
        # the completion labels' value at non-completion positions (`KTOConfig.label_pad_token_id`)
        self.ignore_index = IGNORE_INDEX

    @property
    def name(self) -> str:
        return "hidden" if self.use_hidden else "logits"

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the model call (the collator puts them at the top level of the batch)."""
        if self.use_hidden:
            return {"use_cache": False, "output_hidden_states": True, "logits_to_keep": 1}
        return {"use_cache": False}

    def from_outputs(
        self, outputs: Any, lm_head: nn.Module | None, completion_labels: torch.Tensor, with_stats: bool = False,
        with_tokens: bool = False,
    ) -> SequenceLogps:
        """`with_tokens`: also the (B, T) per-token log-probs (`SequenceLogps.token_logps`)."""
        hidden_states = getattr(outputs, "hidden_states", None)
        if self.use_hidden and hidden_states is not None and lm_head is not None:
            return self.from_hidden(hidden_states[-1], lm_head, completion_labels, with_stats, with_tokens)
        return logps_from_logits(outputs.logits, completion_labels, with_stats, self.ignore_index, with_tokens)

    def from_hidden(
        self, hidden: torch.Tensor, lm_head: nn.Module, completion_labels: torch.Tensor, with_stats: bool = False,
        with_tokens: bool = False,
    ) -> SequenceLogps:
        """Summed completion log-probs from final hidden states (B, T, H) whose position t scores label t + 1."""
        return logps_from_hidden(hidden, lm_head, completion_labels, with_stats, self.ignore_index, with_tokens)

    def forward(
        self,
        module: nn.Module,
        lm_head: nn.Module | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_labels: torch.Tensor,
        with_stats: bool = False,
        with_tokens: bool = False,
        **extra: Any,
    ) -> SequenceLogps:
        """Run `module` on a batch and return its summed completion log-probs (`with_tokens`: per token too)."""
        outputs = module(input_ids=input_ids, attention_mask=attention_mask, **self.model_kwargs(), **extra)
        return self.from_outputs(outputs, lm_head, completion_labels, with_stats, with_tokens)


def choose_path(model: nn.Module, sharded: bool = False) -> LogpsPath:
    """Pick the hidden-state path when it reproduces `model`'s logits exactly, else the logits path.

    `model` is the unwrapped policy or reference (a `PreTrainedModel` or a PEFT wrapper of one).
    """
    if sharded:
        return LogpsPath(False, "parameters are sharded (FSDP/ZeRO-3): the LM head runs inside the model")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return LogpsPath(False, "encoder-decoder or config-less model")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in _LOGIT_TRANSFORMS:
        if getattr(text_config, attr, None) is not None:
            return LogpsPath(False, f"the model config sets {attr}, which transforms logits after the LM head")
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "logits_to_keep" not in params:
        return LogpsPath(False, f"{type(base).__name__}.forward takes no logits_to_keep")
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return LogpsPath(False, f"the output embedding is a {type(head).__name__}, not a plain nn.Linear")
    return LogpsPath(True)
