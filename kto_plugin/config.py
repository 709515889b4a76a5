"""`KTOConfig`: every KTO setting, as a dataclass that `HfArgumentParser` parses next to `TrainingArguments`.

Field names and defaults follow TRL 1.16's `KTOConfig` where the two overlap, so a TRL config carries over;
`max_prompt_length`, `truncation_mode`, `kl_estimate` and the KTO family's options (`length_normalize`,
`reference_point`, `sft_weight`, humanline's clamp) are ours.

Why one module over 400 lines: `HfArgumentParser` parses one dataclass, and each field's help and its check in
`__post_init__` read best side by side; splitting the class would split both.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field, fields
from typing import Any

TRUNCATION_MODES = ("keep_start", "keep_end")
PEFT_REFERENCES = ("auto", "initial_adapter", "base")
KL_ESTIMATES = ("batch", "window")
REFERENCE_POINTS = ("mean", "positive_mean", "ema")
NONFINITE_POLICIES = ("warn", "raise", "skip")
BAD_ROW_POLICIES = ("raise", "skip")
LENGTH_BUCKETS = ("auto", "on", "off")

PAIRED_ORDERS = ("trl", "interleaved")


@dataclass
class KTOConfig:
    """KTO-specific settings. Training settings (batch size, learning rate, ...) stay in `TrainingArguments`."""

    # --- the loss (KTO paper eq. 7) ---
    beta: float = field(
        default=0.1,
        metadata={"help": "Reward scale beta: higher beta keeps the policy closer to the reference. Paper: 0.1."},
    )
    loss_type: str = field(
        default="kto",
        metadata={
            "help": "Loss: 'kto', 'apo_zero_unpaired', 'bco' (binary classifier optimisation, running-mean delta), "
            "'humanline' (KTO with per-token log-ratios clamped), or any name a registered plugin implements "
            "(see `kto_plugin.hookspecs.kto_loss` and docs/losses.md)."
        },
    )
    desirable_weight: float = field(
        default=1.0,
        metadata={"help": "Weight lambda_D of desirable examples' losses (paper eq. 8)."},
    )
    undesirable_weight: float = field(
        default=1.0,
        metadata={"help": "Weight lambda_U of undesirable examples' losses (paper eq. 8)."},
    )
    length_normalize: bool = field(
        default=False,
        metadata={
            "help": "Length-normalised rewards: each row's log-ratio (and each KL pair's) is divided by its number "
            "of completion tokens, an average rather than a sum (kto, bco, humanline, apo_zero_unpaired)."
        },
    )
    reference_point: str = field(
        default="mean",
        metadata={
            "help": "The reference point z0 of losses with a KL term: 'mean' (KTO paper: the mean mismatched-pair "
            "log-ratio, clamped at 0), 'positive_mean' (the mean over positive log-ratios only) or 'ema' (an "
            "exponential moving average of 'mean' across steps, reference_point_ema_decay).",
            "choices": list(REFERENCE_POINTS),
        },
    )
    reference_point_ema_decay: float = field(
        default=0.9,
        metadata={
            "help": "With reference_point='ema': z0 = decay * previous + (1 - decay) * this estimate, updated once "
            "per training micro-batch (kl_estimate='window': once per optimizer step). In [0, 1)."
        },
    )
    sft_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight gamma of an SFT term added to any loss: gamma * mean over the micro-batch's desirable "
            "rows of the per-token negative log-likelihood (LLaMA-Factory's pref_ftx). 0: off; logged as sft_loss."
        },
    )
    humanline_min_log_ratio: float = field(
        default=-1.0,
        metadata={"help": "loss_type='humanline': lower clamp of each token's log-ratio (HALOs log_epsilon_P)."},
    )
    humanline_max_log_ratio: float = field(
        default=1.5,
        metadata={"help": "loss_type='humanline': upper clamp of each token's log-ratio (HALOs log_epsilon_R)."},
    )
    kl_estimate: str = field(
        default="batch",
        metadata={
            "help": "Scope of the reference point z0: 'batch' (one micro-batch across processes, as TRL) or "
            "'window' (every micro-batch of the gradient-accumulation window, across processes).",
            "choices": list(KL_ESTIMATES),
        },
    )
    on_nonfinite: str = field(
        default="warn",
        metadata={
            "help": "What a non-finite loss or z0 does (reported with the step and the rows' indices): 'warn', "
            "'raise' (stop training), or 'skip' (drop that optimizer step's update; not under DeepSpeed).",
            "choices": list(NONFINITE_POLICIES),
        },
    )

    # --- data ---
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Maximum tokens of prompt+completion. Longer sequences are truncated (see truncation_mode); rows "
            "whose prompt alone reaches it are dropped at preparation and counted. None: no limit."
        },
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Maximum prompt tokens; longer prompts keep their last tokens. Must be < max_length. "
            "None: no separate prompt limit (TRL 1.16 behaviour)."
        },
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={
            "help": "How prompt+completion is cut to max_length: 'keep_start' (TRL 1.16: drop the end) or "
            "'keep_end' (keep the completion and the end of the prompt).",
            "choices": list(TRUNCATION_MODES),
        },
    )
    max_completion_length: int | None = field(
        default=None,
        metadata={
            "help": "Maximum completion tokens (documented KTOTrainer API): longer completions keep their first "
            "tokens, cut at preparation and counted. None: no separate completion limit."
        },
    )
    paired_order: str = field(
        default="trl",
        metadata={
            "help": "Order of the unpaired rows made from paired data: 'trl' (TRL 1.16: the chosen rows of each "
            "block of 1000 pairs, then their rejected rows) or 'interleaved' (chosen, rejected, chosen, ...: "
            "every sequential batch holds both labels).",
            "choices": list(PAIRED_ORDERS),
        },
    )
    pad_to_multiple_of: int | None = field(
        default=None,
        metadata={"help": "Pad every batch to a multiple of this many tokens. None: pad to the longest row."},
    )
    label_pad_token_id: int = field(
        default=-100,
        metadata={
            "help": "Value of the batch's completion labels at non-completion positions (prompt and padding), as in "
            "the documented KTOTrainer API. Must be negative, so it can never equal a real token id."
        },
    )
    padding_value: int | None = field(
        default=None,
        metadata={
            "help": "Token id that pads input_ids (documented KTOTrainer API; masked out by the attention mask). "
            "None: the tokenizer's pad token."
        },
    )
    dataset_num_proc: int | None = field(
        default=None,
        metadata={"help": "Processes for dataset preparation (`datasets.map(num_proc=...)`)."},
    )
    on_bad_row: str = field(
        default="raise",
        metadata={
            "help": "What a malformed text row (None or empty text, a label that is not a bool, mixed formats, a "
            "completion with no token) does in prepare_dataset, also when a stream is read during training: 'raise' "
            "(a ValueError naming the row and the dataset) or 'skip' (left out, counted in "
            "kto.data_reports[name].skipped_bad_rows with the first rows and reason, and logged).",
            "choices": list(BAD_ROW_POLICIES),
        },
    )

    # --- reference model ---
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference log-probs once before training and keep no reference model in memory."
        },
    )
    precompute_ref_batch_size: int | None = field(
        default=None,
        metadata={"help": "Batch size of the precomputation pass. None: the per-device train/eval batch size."},
    )
    precompute_cache: bool = field(
        default=True,
        metadata={
            "help": "Cache precomputed reference log-probs on disk, keyed by dataset content, reference "
            "weights and settings, and reuse them in later runs."
        },
    )
    precompute_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Directory of that cache. None: $KTO_PLUGIN_CACHE/ref_logps, else "
            "~/.cache/kto_plugin/ref_logps."
        },
    )
    peft_reference: str = field(
        default="auto",
        metadata={
            "help": "Reference of a PEFT policy given no ref_model, no ref_adapter_name and no adapter "
            "named 'ref': 'auto' (the initial policy: the base model when the adapter is still a no-op, "
            "e.g. a fresh LoRA, else a frozen copy of the adapter named 'ref'), 'initial_adapter' (always "
            "that copy, as TRL 1.16 does for a PeftModel) or 'base' (always the base model, adapters off).",
            "choices": list(PEFT_REFERENCES),
        },
    )
    is_encoder_decoder: bool | None = field(
        default=None,
        metadata={
            "help": "Whether the model is an encoder-decoder (T5, BART): the prompt goes to the encoder, the "
            "completion is the decoder's labels (documented KTOTrainer API). None: read from "
            "model.config.is_encoder_decoder at attach(). True also makes prepare_dataset tokenize plain-text "
            "prompts and completions separately (each with the tokenizer's special tokens, e.g. T5's EOS)."
        },
    )
    model_adapter_name: str | None = field(
        default=None,
        metadata={
            "help": "With several PEFT adapters loaded: the one to train (documented KTOTrainer API). It is made the "
            "active, trainable adapter at attach() and is active for every policy forward. None: the active one."
        },
    )
    ref_adapter_name: str | None = field(
        default=None,
        metadata={
            "help": "A PEFT adapter of the policy that is the reference, active only for reference passes (same as "
            "KTOPlugin(ref_adapter_name=...)). None: an adapter named 'ref', else see peft_reference."
        },
    )
    sync_ref_model: bool = field(
        default=False,
        metadata={"help": "TR-DPO style: mix the policy into the reference every ref_model_sync_steps steps."},
    )
    ref_model_mixup_alpha: float = field(
        default=0.6,
        metadata={"help": "TR-DPO alpha: ref = alpha * policy + (1 - alpha) * ref."},
    )
    ref_model_sync_steps: int = field(
        default=512,
        metadata={"help": "TR-DPO tau: optimizer steps between reference updates."},
    )

    # --- model ---
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Set every dropout probability of the policy and reference to 0 while attached."},
    )
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments (dict or JSON string) for `from_pretrained` when a model is named."},
    )
    ref_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments (dict or JSON string) for `from_pretrained` when ref_model is given as a name "
            "or path (documented KTOTrainer API), e.g. {\"torch_dtype\": \"bfloat16\"}. None: model_init_kwargs, "
            "with the policy's dtype unless a dtype is named."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow models and tokenizers with custom code from the Hub."},
    )
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={
            "help": "Weight of a Mixture-of-Experts model's router (load-balancing) auxiliary loss, added to the "
            "loss and logged as aux_loss. None: the model config's router_aux_loss_coef; 0.0: off."
        },
    )
    activation_offloading: bool = field(
        default=False,
        metadata={"help": "Keep the activations saved for backward in CPU memory during each training step."},
    )
    reuse_prompt_cache: bool = field(
        default=True,
        metadata={
            "help": "Compute each prompt once per model per step: the policy's KL pass scores the KL completions "
            "against the keys and values of its own forward's prompts, and the reference runs the prompts once for "
            "both completion sets. Same log-probs up to float rounding. Used where the model allows it (see "
            "docs/performance.md; the attach log says why not otherwise). False: every pass runs full rows."
        },
    )
    length_buckets: str = field(
        default="auto",
        metadata={
            "help": "Run the rows of the no-grad passes (policy KL, reference) in groups of similar length, each "
            "padded to its own longest row, so little compute goes to padding: 'auto' (on the CPU, where it was "
            "measured to pay off, see docs/performance.md; off on accelerators, where it was not measured), 'on', "
            "'off'. Same log-probs up to float rounding.",
            "choices": list(LENGTH_BUCKETS),
        },
    )

    # --- evaluation ---
    generate_during_eval: bool = field(
        default=False,
        metadata={
            "help": "At every evaluation, greedily generate completions from the policy and the reference "
            "for the first generate_num_prompts distinct eval prompts; log them as a table to W&B (when "
            "reported to) and append them to OUTPUT_DIR/kto_generations.jsonl."
        },
    )
    generate_num_prompts: int = field(
        default=4,
        metadata={"help": "Distinct eval prompts to generate from when generate_during_eval is set."},
    )
    generate_max_new_tokens: int = field(
        default=64,
        metadata={"help": "Maximum new tokens per generated completion when generate_during_eval is set."},
    )

    # --- feedback ---
    warn_guidance: bool = field(
        default=True,
        metadata={
            "help": "Warn once when a setting lies outside the KTO paper's guidance, or a dataset holds one label only."
        },
    )

    def __new__(cls, *args: Any, **kwargs: Any) -> KTOConfig:
        # before the dataclass __init__'s bare "unexpected keyword argument": say where a migrated field belongs
        unknown = [name for name in kwargs if name not in {f.name for f in fields(cls)}]
        if unknown:
            raise TypeError(unknown_fields_message(cls, unknown))
        return super().__new__(cls)

    def __post_init__(self) -> None:
        for name in ("model_init_kwargs", "ref_model_init_kwargs"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"KTOConfig.{name} must be a dict or a JSON object string, got {value!r} ({err})."
                    ) from None
                setattr(self, name, value)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"KTOConfig.{name} must be a dict or a JSON object string, got {value!r}.")
        if not isinstance(self.loss_type, str) or not self.loss_type:
            raise ValueError(f"KTOConfig.loss_type must be a non-empty string, got {self.loss_type!r}.")
        if not self.beta > 0:
            raise ValueError(f"KTOConfig.beta must be > 0, got {self.beta}. The paper uses beta=0.1.")
        for name in ("desirable_weight", "undesirable_weight"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"KTOConfig.{name} must be >= 0, got {value}.")
        if self.desirable_weight == 0 and self.undesirable_weight == 0:
            raise ValueError("KTOConfig.desirable_weight and undesirable_weight are both 0: nothing would train.")
        for name in (
            "max_length", "max_prompt_length", "max_completion_length", "pad_to_multiple_of",
            "precompute_ref_batch_size",
        ):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"KTOConfig.{name} must be a positive integer or None, got {value!r}.")
        if self.max_prompt_length is not None:
            if self.max_length is None:
                raise ValueError("KTOConfig.max_prompt_length needs max_length to be set as well.")
            if self.max_prompt_length >= self.max_length:
                raise ValueError(
                    f"KTOConfig.max_prompt_length ({self.max_prompt_length}) must be smaller than max_length "
                    f"({self.max_length}), or no completion token would fit."
                )
        if isinstance(self.label_pad_token_id, bool) or not isinstance(self.label_pad_token_id, int) or (
            self.label_pad_token_id >= 0
        ):
            raise ValueError(
                f"KTOConfig.label_pad_token_id must be a negative integer, got {self.label_pad_token_id!r}: a value "
                ">= 0 is a real token id, and completion tokens with that id would be dropped from the loss. The "
                "documented default is -100."
            )
        if self.padding_value is not None and (
            isinstance(self.padding_value, bool) or not isinstance(self.padding_value, int) or self.padding_value < 0
        ):
            raise ValueError(
                f"KTOConfig.padding_value must be a token id (an integer >= 0) or None for the tokenizer's pad "
                f"token, got {self.padding_value!r}."
            )
        for name in ("model_adapter_name", "ref_adapter_name"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"KTOConfig.{name} must be an adapter name (a non-empty string) or None, got {value!r}.")
        if self.model_adapter_name is not None and self.model_adapter_name == self.ref_adapter_name:
            raise ValueError(
                f"KTOConfig.model_adapter_name and ref_adapter_name are both {self.model_adapter_name!r}: the trained "
                "adapter cannot also be the fixed reference. Name two different adapters."
            )
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(
                f"KTOConfig.truncation_mode must be one of {TRUNCATION_MODES}, got {self.truncation_mode!r}."
            )
        if self.paired_order not in PAIRED_ORDERS:
            raise ValueError(f"KTOConfig.paired_order must be one of {PAIRED_ORDERS}, got {self.paired_order!r}.")
        if self.peft_reference not in PEFT_REFERENCES:
            raise ValueError(
                f"KTOConfig.peft_reference must be one of {PEFT_REFERENCES}, got {self.peft_reference!r}."
            )
        if self.length_buckets not in LENGTH_BUCKETS:
            raise ValueError(
                f"KTOConfig.length_buckets must be one of {LENGTH_BUCKETS}, got {self.length_buckets!r}."
            )
        if self.reference_point not in REFERENCE_POINTS:
            raise ValueError(
                f"KTOConfig.reference_point must be one of {REFERENCE_POINTS}, got {self.reference_point!r}."
            )
        if not 0.0 <= self.reference_point_ema_decay < 1.0:
            raise ValueError(
                f"KTOConfig.reference_point_ema_decay must be in [0, 1), got {self.reference_point_ema_decay}: 1 would "
                "never move z0 from its first estimate."
            )
        if not self.sft_weight >= 0:
            raise ValueError(f"KTOConfig.sft_weight must be >= 0 (0: no SFT term), got {self.sft_weight}.")
        if not self.humanline_min_log_ratio < 0 < self.humanline_max_log_ratio:
            raise ValueError(
                "KTOConfig.humanline_min_log_ratio must be < 0 and humanline_max_log_ratio > 0 (a token whose policy "
                f"equals the reference must stay unclamped), got {self.humanline_min_log_ratio} and "
                f"{self.humanline_max_log_ratio}. Humanline's defaults are -1.0 and 1.5."
            )
        if self.kl_estimate not in KL_ESTIMATES:
            raise ValueError(f"KTOConfig.kl_estimate must be one of {KL_ESTIMATES}, got {self.kl_estimate!r}.")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"KTOConfig.on_nonfinite must be one of {NONFINITE_POLICIES}, got {self.on_nonfinite!r}."
            )
        if self.on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(f"KTOConfig.on_bad_row must be one of {BAD_ROW_POLICIES}, got {self.on_bad_row!r}.")
        for name in ("generate_num_prompts", "generate_max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KTOConfig.{name} must be a positive integer, got {value!r}.")
        if self.dataset_num_proc is not None and self.dataset_num_proc < 1:
            raise ValueError(f"KTOConfig.dataset_num_proc must be >= 1 or None, got {self.dataset_num_proc}.")
        if not 0.0 <= self.ref_model_mixup_alpha <= 1.0:
            raise ValueError(
                f"KTOConfig.ref_model_mixup_alpha must be in [0, 1], got {self.ref_model_mixup_alpha}."
            )
        if self.ref_model_sync_steps < 1:
            raise ValueError(f"KTOConfig.ref_model_sync_steps must be >= 1, got {self.ref_model_sync_steps}.")
        if self.router_aux_loss_coef is not None and not self.router_aux_loss_coef >= 0:
            raise ValueError(
                f"KTOConfig.router_aux_loss_coef must be >= 0 or None (the model config's), got "
                f"{self.router_aux_loss_coef}: a negative weight would reward unbalanced experts."
            )
        if self.sync_ref_model and self.precompute_ref_log_probs:
            raise ValueError(
                "KTOConfig.sync_ref_model=True cannot be combined with precompute_ref_log_probs=True: a reference "
                "that moves during training makes precomputed log-probs stale. Turn one of them off."
            )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for logs, model cards and cache keys)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# TRL KTOConfig fields kto_plugin does not support (docs/migrating-from-trl.md says why)
UNSUPPORTED_TRL_FIELDS = ("use_liger_loss", "base_model_attribute_name")


def unknown_fields_message(cls: type, unknown: list[str]) -> str:
    """Where each keyword `KTOConfig` does not take belongs: `TrainingArguments` (TRL's KTOConfig holds both), no
    support, or a close field name."""
    from transformers import TrainingArguments

    training = {f.name for f in fields(TrainingArguments)}
    ours = [f.name for f in fields(cls)]
    parts = []
    moved = [name for name in unknown if name in training]
    if moved:
        given = ", ".join(f"{name}=..." for name in moved)
        parts.append(
            f"KTOConfig got {', '.join(moved)}: "
            f"{'a TrainingArguments field' if len(moved) == 1 else 'TrainingArguments fields'}. Unlike TRL's KTOConfig, "
            "KTOConfig holds only the KTO settings (beta, loss_type, max_length, ...): give "
            f"{'it' if len(moved) == 1 else 'them'} to TrainingArguments({given}), which goes to Trainer(args=...) "
            "(docs/migrating-from-trl.md shows a TRL script before and after)."
        )
    for name in unknown:
        if name in UNSUPPORTED_TRL_FIELDS:
            parts.append(f"{name} is a TRL KTOConfig field kto_plugin does not support (docs/migrating-from-trl.md "
                         "says why); remove it.")
        elif name not in training:
            match = difflib.get_close_matches(name, ours, n=1, cutoff=0.6)
            hint = f" Did you mean {match[0]!r}?" if match else " Its fields are listed in docs/configuration.md."
            parts.append(f"KTOConfig has no field {name!r}.{hint}")
    return " ".join(parts)
