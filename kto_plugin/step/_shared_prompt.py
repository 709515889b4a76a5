"""Each prompt computed once per model per step: completions scored against the prompt's keys and values.

Row i of the target batch is (prompt i, completion i) and row i of the KL batch (prompt i, the completion of
i's KL partner): both rows start with the same prompt tokens, so one model's keys and values of prompt i serve
both rows.

* The policy: the Trainer's own forward of the target batch runs with ``use_cache=True`` and so returns the keys
  and values of every position; the KL pass runs the KL completions only, against the prompt part of that cache
  (detached: the KL term carries no gradient).
* The reference: one pass over the prompts, then one over the target and the KL completions together (2B rows),
  against the prompts' cache. Two passes over 2B rows of prompt + completion become one over B prompts and one
  over 2B completions.

Layout. Batches are right-padded, so row i's prompt fills positions ``0 .. P_i - 1`` of the cache and positions
``P_i ..`` of the cache hold row i's own completion and padding (or nothing). Completion token j of row i gets
position id ``P_i + j`` (its rotary position, as in the full row), and the attention mask is the prompt's mask
(1 on ``0 .. P_i - 1``, 0 on the rest of the cache) followed by the completion's, so each completion token sees
exactly the tokens it sees in the full row. The first completion token is predicted by the last prompt position:
its hidden state comes from the prompt pass (or the Trainer's forward), and is put in front of the completion's
hidden states, so the log-prob code scores ``[last prompt position, completion positions]`` against
``[-, completion tokens]`` as it scores a full row. A row with an empty prompt scores its first completion token
from nothing, as the full row does not either.

A non-finite value anywhere in the policy's forward of target row i reaches the KL pair of prompt i: SDPA with
a padding mask turns a masked-out NaN key into NaN scores, so a NaN in row i's completion already reaches its
prompt positions in the Trainer's forward, and from there the shared keys and values. The step then reports z0 as
non-finite as well (`on_nonfinite`); a full recompute of the KL row would not see row i's completion.

What the result equals: the full recompute's log-probs up to float rounding (the same arithmetic on the same
keys and values, summed in another order); `tests/step/test_shared_prompt.py` compares both on Llama, Qwen2,
Mistral and GQA models, with empty prompts, prompts filling `max_length` and truncated KL rows.

Where it is not used (`choose_sharing` at attach, logged once; `SharedLayout.of` per batch), the passes run as
full rows:

* at attach: `KTOConfig.reuse_prompt_cache=False`; log-probs from the model's logits (FSDP/ZeRO-3 sharding, logit
  soft-capping, an adapter on the LM head, encoder-decoder models; see `_logprobs.choose_path`); vision-language
  models; prompt-learning adapters (their virtual tokens live in the cache); attention implementations and model
  types not verified here (`VERIFIED_ATTENTION`, `VERIFIED_MODEL_TYPES`: MoE, hybrid and multimodal
  architectures are not); for the policy, gradient checkpointing (its forward keeps no cache);
* per batch: a KL row whose prompt was cut differently from its target row (``truncation_mode="keep_end"`` cuts
  the prompt by the completion's length), image inputs, rows reaching a sliding attention window (the window
  counts cache slots, and the cache has holes), a batch whose prompts are all empty.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from ._buckets import row_groups, run_grouped
from ._logprobs import LogpsPath, SequenceLogps

# model types whose shared-prompt log-probs are tested against the full recompute (tests/step/test_shared_prompt.py)
VERIFIED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# attention implementations tested with a cache that has holes (masked slots between prompt and completion)
VERIFIED_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class PromptSharing:
    """Whether one model's passes share prompts, and what they need to (decided at attach by `choose_sharing`)."""

    on: bool
    reason: str = ""  # why not, when off
    cache_kwarg: str = "cache"  # the forward's keyword for a key/value cache (`past_key_values` before 5.2x)
    window: int | None = None  # sliding attention window: batches whose rows reach it run in full

    def describe(self) -> str:
        return "on" if self.on else f"off ({self.reason})"


OFF = PromptSharing(False, "not attached")


def choose_sharing(
    model: nn.Module, path: LogpsPath, enabled: bool = True, kl_pass: bool = True, gradient_checkpointing: bool = False,
    role: str = "policy",
) -> PromptSharing:
    """Whether `model` (unwrapped policy or reference) can score completions against a prompt's cache, exactly.

    `enabled`: `KTOConfig.reuse_prompt_cache`. `kl_pass`: the model scores the KL batch next to the target batch
    in a step (no: a loss without KL term; for the policy also ``kl_estimate="window"``, whose KL passes run
    before the Trainer's forward). `gradient_checkpointing`: the model's layers are checkpointed in training mode:
    the policy's forward (with grad) then keeps no cache; a reference that runs through the policy's module (an
    adapter reference, `role="reference"`) loses it only under transformers < 5.24, whose checkpointed layers drop
    the cache in training mode also without grad (a separate reference model runs in eval mode: pass False).
    """
    if not enabled:
        return PromptSharing(False, "KTOConfig.reuse_prompt_cache=False")
    if not kl_pass:
        return PromptSharing(False, "no KL pass next to the target batch, so no prompt is computed twice")
    if not path.use_hidden:
        return PromptSharing(False, f"log-probs come from the model's logits: {path.reason}")
    if gradient_checkpointing and role == "policy":
        return PromptSharing(False, "gradient checkpointing: the policy's forward keeps no key/value cache")
    if gradient_checkpointing and _checkpointing_drops_cache_without_grad():
        return PromptSharing(
            False, "gradient checkpointing: transformers < 5.24 drops the key/value cache of a checkpointed model in "
            "training mode, also without gradient"
        )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    peft_config = getattr(model, "peft_config", None) or getattr(base, "peft_config", None) or {}
    for name, adapter in peft_config.items():
        if getattr(adapter, "is_prompt_learning", False) or getattr(adapter, "is_adaption_prompt", False):
            return PromptSharing(False, f"adapter {name!r} is a prompt-learning adapter (virtual tokens)")
    config = base.config
    if getattr(config, "vision_config", None) is not None:
        return PromptSharing(False, "a vision-language model")
    model_type = getattr(config, "model_type", None)
    if model_type not in VERIFIED_MODEL_TYPES:
        return PromptSharing(
            False, f"model type {model_type!r} is not verified for it (verified: {', '.join(VERIFIED_MODEL_TYPES)})"
        )
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in VERIFIED_ATTENTION:
        return PromptSharing(
            False, f"attention implementation {attention!r} is not verified for it "
            f"(verified: {', '.join(VERIFIED_ATTENTION)})"
        )
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        params = {}
    kwarg = next((k for k in ("cache", "past_key_values") if k in params), None)
    if kwarg is None or "position_ids" not in params:
        return PromptSharing(False, f"{type(base).__name__}.forward takes no key/value cache or position ids")
    return PromptSharing(True, cache_kwarg=kwarg, window=getattr(config, "sliding_window", None))


def _checkpointing_drops_cache_without_grad() -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) < Version("5.24")


class CompletionPart(NamedTuple):
    """Completions cut out of their rows and right-padded, each continuing the prompt `prompt_rows` names.

    `labels` is (R, 1 + C): column 0 is never scored, column j + 1 is completion token j (`ignore_index` on padding,
    and on token 0 of a row with an empty prompt), so hidden states ``[last prompt position, completion positions]``
    score it as the log-prob code scores a full row (position t scores label t + 1).
    """

    input_ids: torch.Tensor  # (R, C)
    attention_mask: torch.Tensor  # (R, C)
    labels: torch.Tensor  # (R, 1 + C)
    prompt_rows: torch.Tensor  # (R,) the row of the prompt each completion follows

    def rows(self, index: slice) -> CompletionPart:
        return CompletionPart(*(t[index] for t in self))


def _prompt_lengths(completion_labels: torch.Tensor, attention_mask: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """(B,) tokens before each row's first completion token (the whole row when it keeps no completion token)."""
    is_completion = completion_labels != ignore_index
    return torch.where(is_completion.any(1), is_completion.int().argmax(1), attention_mask.sum(1))


def _completion_part(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_labels: torch.Tensor,
    prompt_lengths: torch.Tensor, width: int, ignore_index: int,
) -> CompletionPart:
    offsets = torch.arange(width, device=input_ids.device)
    valid = offsets < (attention_mask.sum(1) - prompt_lengths)[:, None]
    index = (prompt_lengths[:, None] + offsets).clamp(max=input_ids.shape[1] - 1)
    labels = completion_labels.gather(1, index).masked_fill(~valid, ignore_index)
    if width:
        labels[:, 0] = labels[:, 0].masked_fill(prompt_lengths == 0, ignore_index)
    labels = torch.cat([labels.new_full((labels.shape[0], 1), ignore_index), labels], 1)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return CompletionPart(input_ids.gather(1, index), valid.to(attention_mask.dtype), labels, rows)


class SharedLayout(NamedTuple):
    """A micro-batch cut into its B prompts and its 2B completions: the target batch's, then the KL batch's."""

    prompt_lengths: torch.Tensor  # (B,) P_i
    width: int  # the longest prompt: every cache is cut to it
    completions: CompletionPart  # 2B rows: row i is completion i, row B + i the completion of i's KL partner
    longest_row: int  # the most key/value slots any pass of this batch attends over (full or shared)

    @property
    def target(self) -> CompletionPart:
        return self.completions.rows(slice(None, len(self.prompt_lengths)))

    @property
    def kl(self) -> CompletionPart:
        return self.completions.rows(slice(len(self.prompt_lengths), None))

    @classmethod
    def of(cls, labels: Any, ignore_index: int) -> SharedLayout | None:
        """The layout of a KTO batch (`KTOLabels` with a KL batch), or None when its KL rows do not start with
        exactly their target rows' prompts, or every prompt is empty."""
        ids, mask, comp = labels["input_ids"], labels["attention_mask"], labels["completion_labels"]
        kl_ids, kl_mask, kl_comp = labels["kl_input_ids"], labels["kl_attention_mask"], labels["kl_completion_labels"]
        lengths = _prompt_lengths(comp, mask, ignore_index)
        if not torch.equal(lengths, _prompt_lengths(kl_comp, kl_mask, ignore_index)):
            return None
        width, completion_width = torch.stack(
            [lengths.max(), torch.maximum(mask.sum(1), kl_mask.sum(1)).sub(lengths).max()]
        ).tolist()
        if width == 0:
            return None
        in_prompt = torch.arange(width, device=ids.device) < lengths[:, None]
        if not bool(((ids[:, :width] == kl_ids[:, :width]) | ~in_prompt).all()):
            return None
        target = _completion_part(ids, mask, comp, lengths, completion_width, ignore_index)
        kl = _completion_part(kl_ids, kl_mask, kl_comp, lengths, completion_width, ignore_index)
        return cls(
            lengths, width, CompletionPart(*(torch.cat(pair) for pair in zip(target, kl, strict=True))),
            max(ids.shape[1], kl_ids.shape[1], width + completion_width),
        )


def fits_window(layout: SharedLayout, sharing: PromptSharing) -> bool:
    """Whether no pass of this batch reaches the model's sliding attention window (if it has one)."""
    return sharing.window is None or layout.longest_row < sharing.window


class PromptState(NamedTuple):
    """What scoring completions needs of a model's pass over the prompts."""

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer (keys, values), (B, heads, width, d)
    last_hidden: torch.Tensor  # (B, H) final hidden state of each row's last prompt token


def _prompt_mask(prompt_lengths: torch.Tensor, width: int) -> torch.Tensor:
    return (torch.arange(width, device=prompt_lengths.device) < prompt_lengths[:, None]).long()


def _last_prompt_hidden(hidden: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, (prompt_lengths - 1).clamp(min=0)]


def _kv_of(outputs: Any, sharing: PromptSharing, width: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Each layer's keys and values of the first `width` positions of a forward's cache (None: it kept none)."""
    cache = outputs.get(sharing.cache_kwarg) if hasattr(outputs, "get") else None
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    kv = []
    for layer in layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None or keys.dim() != 4 or keys.shape[-2] < width:
            return None
        kv.append((keys[:, :, :width], values[:, :, :width]))
    return kv


def prompt_state_of(outputs: Any, layout: SharedLayout, sharing: PromptSharing) -> PromptState | None:
    """The prompts' cache and last hidden states from a forward of the target batch (the Trainer's, run with
    ``use_cache=True``), detached; None when the forward kept no cache (e.g. gradient checkpointing)."""
    kv = _kv_of(outputs, sharing, layout.width)
    hidden_states = getattr(outputs, "hidden_states", None)
    if kv is None or hidden_states is None:
        return None
    return PromptState(
        tuple((k.detach(), v.detach()) for k, v in kv),
        _last_prompt_hidden(hidden_states[-1].detach(), layout.prompt_lengths),
    )


def prompt_pass(
    module: nn.Module, input_ids: torch.Tensor, layout: SharedLayout, sharing: PromptSharing, bucketed: bool = False
) -> PromptState | None:
    """Run `module` over the prompts only (the target batch's first `layout.width` columns), in groups of similar
    prompt length when `bucketed` (`_buckets`); call under no_grad. None when the model kept no cache (a setting
    `choose_sharing` did not foresee): the caller runs full rows.

    An empty prompt runs as one (masked-out) token: a query that may attend to nothing makes SDPA return NaN,
    which would enter the cache; the completions never see that slot.
    """
    lengths = layout.prompt_lengths.clamp(min=1)
    mask = _prompt_mask(lengths, layout.width)
    layers: list[tuple[torch.Tensor, torch.Tensor]] = []
    last_hidden = None
    for rows, width in row_groups(lengths, bucketed):
        outputs = module(
            input_ids=input_ids[rows, :width], attention_mask=mask[rows, :width], use_cache=True,
            output_hidden_states=True, logits_to_keep=1,
        )
        kv = _kv_of(outputs, sharing, width)
        if kv is None:
            return None
        hidden = _last_prompt_hidden(outputs.hidden_states[-1], layout.prompt_lengths[rows])
        if isinstance(rows, slice):
            return PromptState(tuple(kv), hidden)
        if last_hidden is None:  # the first group: allocate the batch's cache (unused slots stay 0, finite)
            last_hidden = hidden.new_zeros(input_ids.shape[0], hidden.shape[-1])
            layers = [tuple(t.new_zeros(input_ids.shape[0], t.shape[1], layout.width, t.shape[3]) for t in pair)
                      for pair in kv]
        last_hidden[rows] = hidden
        for (keys, values), (k, v) in zip(layers, kv, strict=True):
            keys[rows, :, :width] = k
            values[rows, :, :width] = v
    return PromptState(tuple(layers), last_hidden)


def score_completions(
    module: nn.Module, lm_head: nn.Module, path: LogpsPath, prompt: PromptState, layout: SharedLayout,
    part: CompletionPart, sharing: PromptSharing, bucketed: bool = False, token_width: int | None = None,
) -> SequenceLogps:
    """Summed log-probs of `part`'s completions, each after its prompt: `module` runs over the completion tokens
    only, against the prompts' cache (copied: the model appends to it), in groups of similar completion length when
    `bucketed`. With `token_width`, also the per-token log-probs, laid out as in the full rows (R, token_width):
    completion token j of a row at column ``P + j``, where the full row's completion labels hold it. Call under
    no_grad."""
    from transformers import DynamicCache

    def run(rows: torch.Tensor | slice, width: int) -> SequenceLogps:
        prompt_rows = part.prompt_rows[rows]
        prompt_lengths = layout.prompt_lengths[prompt_rows]
        if width == 0:  # no completion token left in these rows (a prompt filling max_length)
            zeros = prompt.last_hidden.new_zeros(prompt_rows.shape[0], dtype=torch.float32)
            tokens = None if token_width is None else zeros.new_zeros(prompt_rows.shape[0], token_width)
            return SequenceLogps(zeros, zeros.clone(), token_logps=tokens)
        # the group's longest prompt (at least one slot: an empty prompt's slot is masked out)
        prompt_width = max(int(prompt_lengths.max()), 1)
        cache = DynamicCache(ddp_cache_data=[(k[prompt_rows, :, :prompt_width], v[prompt_rows, :, :prompt_width])
                                             for k, v in prompt.layers])
        offsets = torch.arange(width, device=prompt_lengths.device)
        outputs = module(
            input_ids=part.input_ids[rows, :width],
            attention_mask=torch.cat([_prompt_mask(prompt_lengths, prompt_width), part.attention_mask[rows, :width]], 1),
            position_ids=prompt_lengths[:, None] + offsets, **{sharing.cache_kwarg: cache}, use_cache=True,
            output_hidden_states=True, logits_to_keep=1,
        )
        completion_hidden = outputs.hidden_states[-1]
        first = prompt.last_hidden[prompt_rows][:, None].to(completion_hidden.dtype)
        result = path.from_hidden(
            torch.cat([first, completion_hidden], 1), lm_head, part.labels[rows, : 1 + width],
            with_tokens=token_width is not None,
        )
        if token_width is not None:
            # column 1 + j holds token j's value; in the full row that token sits at column P + j (the scatter's
            # extra `width` columns take the padding's zeros, then are cut off)
            full = result.token_logps.new_zeros(prompt_rows.shape[0], token_width + width)
            result.token_logps = full.scatter_(1, prompt_lengths[:, None] + offsets, result.token_logps[:, 1:])[
                :, :token_width
            ]
        return result

    return run_grouped(part.attention_mask.sum(1), bucketed, run)
