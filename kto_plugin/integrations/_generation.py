"""`generate_during_eval`: completions from the policy and the reference, side by side, at every evaluation.

The documented `KTOTrainer` API (TRL <= 0.x; TRL 1.16 dropped it) sampled a batch of eval prompts, generated
from the policy and the reference and logged a W&B table ``game_log`` with columns Prompt / Policy /
Ref Model.
Here it is a `TrainerCallback` (`on_evaluate`) that `KTOPlugin.attach` inserts when
`KTOConfig.generate_during_eval` is set:

* prompts: the first `generate_num_prompts` *distinct* `prompt_ids` of the dataset just evaluated (the same
  prompts at every evaluation, so rows can be compared across steps; a paired dataset repeats each prompt);
* decoding: greedy, at most `generate_max_new_tokens` new tokens, stopping at EOS; left-padded batch;
* the reference: the same context the loss uses (`ReferenceManager.activate`: separate model, frozen copy,
  adapter off or the reference adapter), so at step 0 both columns are identical;
* output: appended to ``OUTPUT_DIR/kto_generations.jsonl`` (one JSON object per prompt per evaluation:
  ``step``, ``split``, ``prompt``, ``policy``, ``reference``), and logged as a table to every `report_to`
  tracker that holds tables (W&B, trackio, MLflow, TensorBoard: `kto_plugin.integrations._trackers`). Only the
  main process writes.

The model's train/eval mode, every parameter's `requires_grad` and the active adapter are restored exactly.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers import GenerationConfig, TrainerCallback

from ..reference import ReferenceManager
from ..reference._manager import preserved_state
from ._trackers import log_tables

logger = logging.getLogger("kto_plugin")

GENERATIONS_FILE = "kto_generations.jsonl"


def distinct_prompts(dataset: Any, n: int) -> list[list[int]]:
    """The first `n` distinct `prompt_ids` of a prepared dataset, in dataset order.

    Reads rows one at a time, so only as many rows as needed are decoded (an eval set can be large).
    """
    if dataset is None:
        return []
    seen: set[tuple[int, ...]] = set()
    prompts: list[list[int]] = []
    rows = (dataset[i] for i in range(len(dataset))) if hasattr(dataset, "__len__") else iter(dataset)
    for row in rows:
        if "prompt_ids" not in row:
            raise KeyError(
                f"generate_during_eval needs prepared eval rows with a 'prompt_ids' column; the eval dataset "
                f"has "
                f"{sorted(row)}. Pass it through KTOPlugin.prepare_dataset(raw, name='eval')."
            )
        key = tuple(int(t) for t in row["prompt_ids"])
        if key in seen:
            continue
        seen.add(key)
        prompts.append(list(key))
        if len(prompts) == n:
            break
    return prompts


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS ids: the model's generation config (chat models stop at end-of-turn) plus the tokenizer's."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if value is None:
            continue
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i not in ids:
                ids.append(int(i))
    return ids


@torch.no_grad()
def greedy_completions(
    model: Any, prompts: Sequence[Sequence[int]], tokenizer: Any, max_new_tokens: int
) -> list[list[int]]:
    """Greedy continuations of `prompts` (lists of token ids) by `model` (an LM, or a PEFT wrapper of one).

    Prompts are left-padded into one batch; returns the new token ids of each row, cut after the first EOS.
    """
    if not prompts:
        return []
    pad_id = tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        attention_mask[i, width - len(p) :] = 1
    eos = _eos_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=eos or None,
        use_cache=True,
    )
    output = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
    )
    # decoder-only models return prompt + new tokens; encoder-decoder ones a decoder start token + new tokens
    is_encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    new_tokens = output[:, 1:] if is_encoder_decoder else output[:, width:]
    completions = []
    for row in new_tokens.tolist():
        cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
        completions.append(row[:cut])
    return completions


def append_jsonl(path: str, rows: Sequence[dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _split_of(metrics: dict[str, float] | None) -> str:
    # evaluate(metric_key_prefix=p) reports f"{p}_runtime"; eval sets given as a dict get "eval_<name>"
    for key in metrics or {}:
        if key.endswith("_runtime") and not key.startswith("train"):
            return key[: -len("_runtime")]
    return "eval"


class KTOGenerationCallback(TrainerCallback):
    """Generates from the policy and the reference on `on_evaluate` (see the module docstring).

    Args:
        trainer: the Trainer the plugin is attached to (its live `model` is read at every evaluation).
        reference: the plugin's `ReferenceManager`, whose `activate` gives the reference the loss uses.
        tokenizer: the policy's tokenizer (pad and EOS ids, decoding).
        num_prompts, max_new_tokens: `KTOConfig.generate_num_prompts`, `KTOConfig.generate_max_new_tokens`.
    """

    def __init__(
        self, trainer: Any, reference: ReferenceManager, tokenizer: Any, num_prompts: int, max_new_tokens: int
    ) -> None:
        self.trainer = trainer
        self.reference = reference
        self.tokenizer = tokenizer
        self.num_prompts = num_prompts
        self.max_new_tokens = max_new_tokens

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        loader = kwargs.get("eval_dataloader")
        dataset = getattr(loader, "dataset", None)
        if dataset is None:
            return
        started = time.perf_counter()
        # re-read every time (a few rows): the same prompts at every evaluation of the same dataset
        rows = self.generate(distinct_prompts(dataset, self.num_prompts), step=state.global_step)
        if not state.is_world_process_zero or not rows:
            return
        split = _split_of(metrics)
        path = os.path.join(args.output_dir, GENERATIONS_FILE)
        append_jsonl(path, [{"split": split, **r} for r in rows])
        trackers = log_tables(rows, split, args, state.global_step, self.trainer.callback_handler.callbacks)
        logger.info(
            "kto_plugin: %s generations at step %d: %d prompts x (policy, reference), up to %d new tokens, "
            "in %.1f s; appended to %s%s", split, state.global_step, len(rows), self.max_new_tokens,
            time.perf_counter() - started, path, f" and logged to {', '.join(trackers)}" if trackers else "",
        )

    def generate(self, prompts: list[list[int]], step: int) -> list[dict[str, Any]]:
        """One row per prompt: ``{step, prompt, policy, reference}`` (decoded text, special tokens skipped).

        Every process generates (ZeRO-3 needs all ranks in each forward); the caller writes on the main one.
        """
        trainer = self.trainer
        policy = trainer.accelerator.unwrap_model(trainer.model)
        with preserved_state(policy):
            policy.eval()
            policy_ids = greedy_completions(policy, prompts, self.tokenizer, self.max_new_tokens)
            with self.reference.activate(trainer) as ref_module:
                reference = trainer.accelerator.unwrap_model(ref_module)
                with preserved_state(reference):
                    reference.eval()
                    reference_ids = greedy_completions(
                        reference, prompts, self.tokenizer, self.max_new_tokens
                    )
        decode = self.tokenizer.decode
        return [
            {
                "step": step,
                "prompt": decode(p, skip_special_tokens=True),
                "policy": decode(a, skip_special_tokens=True),
                "reference": decode(b, skip_special_tokens=True),
            }
            for p, a, b in zip(prompts, policy_ids, reference_ids, strict=True)
        ]
