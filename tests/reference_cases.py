"""Builders for the reference-model tests: LoRA policies held every way a user holds them, and TRL 1.16 runs.

Parity tolerance (`parity_problems`): every logged metric within 2e-4 relative (1e-6 absolute, as
`trl_oracle.compare_logs`), except that the metrics which are differences of two summed log-probs also pass
within their float32 noise floor. A completion of ~100-300 tokens sums to ~-300..-600 nats, which float32
resolves to 3e-5..6e-5 (one ulp), and TRL's fused LM head sums in another order than our chunked one; so `kl`
(a batch mean of such differences, in nats) carries up to ~1e-4 of rounding noise and `rewards/*` (beta = 0.1
times one) up to ~1e-5, whatever their size. Measured worst cases: 3e-5 (kl), 1.5e-5 (rewards). A small
reward (|r| < 0.1) therefore cannot be compared to 2e-4 relative; a disagreement of the code would show as
an error many times that floor.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments
from trl_oracle import _SKIP, beyond_trl, training_args

from kto_plugin import KTOConfig, KTOPlugin

PARITY_REL = 2e-4
# metric-name part -> absolute float32 noise floor of a difference of two summed log-probs (see above)
NOISE_FLOORS = {"kl": 1e-4, "rewards/": 2e-5}
# a large SGD step so a LoRA that starts at B = 0 moves visibly within 6 steps (rewards ~0.05-0.2)
LORA_LR = 64.0


def lora_config(init: bool = True, bias: str = "none", alpha: int = 16) -> LoraConfig:
    """Small LoRA on q_proj/v_proj; ``init=False`` gives random non-zero B, i.e. an adapter that already
    changes the model (stands for a loaded SFT adapter)."""
    return LoraConfig(
        r=4,
        lora_alpha=alpha,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        init_lora_weights=init,
        bias=bias,
    )


def peft_policy(base, trained: bool, seed: int = 5, **config_kwargs: Any):
    torch.manual_seed(seed)
    return get_peft_model(copy.deepcopy(base), lora_config(init=not trained, **config_kwargs))


def integration_policy(base, adapter_dir: str):
    """A plain `PreTrainedModel` with the adapter injected by transformers' integration (no PeftModel)."""
    model = copy.deepcopy(base)
    model.load_adapter(adapter_dir, is_trainable=True)
    return model


def parity_args(output_dir: str, lora: bool, **overrides: Any) -> dict[str, Any]:
    return training_args(output_dir, **({"learning_rate": LORA_LR} if lora else {}), **overrides)


def run_trl(model, rows, tokenizer, kto_kwargs, args, eval_rows=None, ref_model=None, peft_config=None):
    """TRL 1.16's KTOTrainer exactly as a user would call it (no reference is supplied unless given)."""
    from trl import KTOConfig as TRLKTOConfig
    from trl import KTOTrainer

    return KTOTrainer(
        model=model,
        ref_model=ref_model,
        args=TRLKTOConfig(**args, **kto_kwargs, gradient_checkpointing=False),
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def run_ours(model, rows, tokenizer, kto_kwargs, args, eval_rows=None, **plugin_kwargs):
    kto = KTOPlugin(KTOConfig(**kto_kwargs), tokenizer=tokenizer, **plugin_kwargs)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**args),
        train_dataset=kto.prepare_dataset(rows),
        eval_dataset=kto.prepare_dataset(eval_rows, name="eval") if eval_rows else None,
        data_collator=kto.collator,
    )
    kto.attach(trainer)
    return trainer, kto


def parity_problems(expected: list[dict], actual: list[dict]) -> list[str]:
    """`trl_oracle.compare_logs` at 2e-4 relative, each log-prob difference within its noise floor; returns
    the mismatches (empty when equal)."""
    problems = [] if len(expected) == len(actual) else [f"{len(expected)} log entries vs {len(actual)}"]
    for a, b in zip(expected, actual, strict=False):  # a length mismatch is reported above
        for key in sorted(set(a) | set(b)):
            if any(s in key for s in _SKIP) or beyond_trl(key, a):
                continue
            if key not in a or key not in b:
                problems.append(f"step {a.get('step')}: {key!r} only in {'TRL' if key in a else 'ours'}")
                continue
            x, y = float(a[key]), float(b[key])
            floor = next((v for part, v in NOISE_FLOORS.items() if part in key), 1e-6)
            if not math.isclose(x, y, rel_tol=PARITY_REL, abs_tol=floor):
                problems.append(f"step {a.get('step')}: {key} TRL={x!r} ours={y!r} diff={abs(x - y):.1e}")
    return problems


def train_and_evaluate(*trainers) -> None:
    for trainer in trainers:
        trainer.train()
        trainer.evaluate()


def state_of(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
