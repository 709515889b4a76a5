"""The metrics TRL 1.16 logs beyond rewards/logps/logits/kl: `entropy` and `num_tokens` (and their `eval_` twins).

Meaning (TRL 1.16 `KTOTrainer._compute_loss`): `entropy` is the per-token entropy of the policy's next-token
distribution, averaged over the completion tokens of a micro-batch (token-weighted), then averaged over the
micro-batches of the logging interval; `num_tokens` is the running count of `attention_mask` ones (prompt +
completion, target batch only, not the KL batch) of every training micro-batch so far, logged as is. Evaluation
logs the same training count as `eval_num_tokens` and counts nothing itself.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from helpers import kto_trainer
from reference_cases import parity_problems, train_and_evaluate
from trl_oracle import run_ours, run_trl, training_args


def _reference_entropy(model, batch) -> float:
    """Token-weighted mean entropy over completion tokens, from the model's full logits (plain PyTorch)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    scored = batch["labels"]["completion_labels"][:, 1:] != -100  # position t predicts token t + 1
    log_probs = logits[:, :-1].log_softmax(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return (entropy[scored].sum() / scored.sum()).item()


def test_entropy_and_num_tokens_match_a_plain_reference(model, tokenizer, rows, tmp_path):
    # lr 0: the policy stays the initial model, so the reference entropies come from `model` itself
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, max_steps=3, optim="sgd", learning_rate=0.0,
                               eval_rows=rows[-8:])
    kto.attach(trainer)
    batches = list(itertools.islice(iter(trainer.get_train_dataloader()), 3))
    eval_batches = list(trainer.get_eval_dataloader())
    reference = copy.deepcopy(model).eval()
    trainer.train()
    metrics = trainer.evaluate()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    tokens = [b["attention_mask"].sum().item() for b in batches]
    assert len({*tokens}) > 1  # batches differ, so a per-batch count would be caught
    for i, (entry, batch) in enumerate(zip(logs, batches)):
        assert entry["entropy"] == pytest.approx(_reference_entropy(reference, batch), rel=1e-5)
        assert entry["num_tokens"] == sum(tokens[: i + 1])  # running count of prompt+completion tokens
    # the KL batch is not counted
    assert sum(tokens) < sum(b["attention_mask"].sum().item() + b["labels"]["kl_attention_mask"].sum().item()
                             for b in batches)
    expected_eval = sum(_reference_entropy(reference, b) for b in eval_batches) / len(eval_batches)
    assert metrics["eval_entropy"] == pytest.approx(expected_eval, rel=1e-5)
    assert metrics["eval_num_tokens"] == sum(tokens)  # the training count; evaluation adds nothing


@pytest.mark.slow
def test_entropy_and_num_tokens_match_trl_with_gradient_accumulation(base_model, tokenizer, rows, tmp_path):
    """Several micro-batches per optimizer step and per log: TRL averages `entropy` per micro-batch and counts
    `num_tokens` per micro-batch; ours must log the same numbers."""
    kto_kwargs = dict(beta=0.1, loss_type="kto", max_length=128)
    args = training_args(str(tmp_path), max_steps=3, gradient_accumulation_steps=2, logging_steps=2)
    eval_rows = rows[-8:]
    trl = run_trl(base_model, rows, tokenizer, kto_kwargs, args, eval_rows=eval_rows)
    ours, _ = run_ours(base_model, rows, tokenizer, kto_kwargs, args, eval_rows=eval_rows)
    train_and_evaluate(trl, ours)
    expected, actual = trl.state.log_history, ours.state.log_history
    assert any("entropy" in e for e in actual) and any("eval_num_tokens" in e for e in actual)
    # 2e-4 relative; kl and rewards also within their float32 noise floor (see reference_cases)
    assert parity_problems(expected, actual) == []
