"""End-to-end parity with TRL 1.16's KTOTrainer: same tiny Llama, tokenizer, rows and sampler; 6 steps + eval.

Every logged metric (loss, grad_norm, kl, rewards/*, logps/*, logits/*, entropy, num_tokens and the eval_
ones) must agree within 2e-4 relative.
"""

from __future__ import annotations

import pytest

from trl_oracle import compare_logs, run_ours, run_trl, training_args

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_logged_metrics_match_trl(loss_type, base_model, tokenizer, rows, tmp_path):
    kto_kwargs = dict(beta=0.1, loss_type=loss_type, max_length=128, desirable_weight=1.2, undesirable_weight=0.9)
    args = training_args(str(tmp_path))
    eval_rows = rows[-16:]
    trl = run_trl(base_model, rows, tokenizer, kto_kwargs, args, eval_rows=eval_rows)
    ours, kto = run_ours(base_model, rows, tokenizer, kto_kwargs, args, eval_rows=eval_rows)
    # the prepared token ids are identical
    assert trl.train_dataset["prompt_ids"] == ours.train_dataset["prompt_ids"]
    assert trl.train_dataset["completion_ids"] == ours.train_dataset["completion_ids"]
    assert trl.train_dataset["label"] == ours.train_dataset["label"]

    trl.train()
    trl.evaluate()
    ours.train()
    ours.evaluate()

    expected, actual = trl.state.log_history, ours.state.log_history
    assert len(expected) == 8  # 6 training steps, the train summary, the evaluation
    for key in ("kl", "rewards/chosen", "rewards/margins", "logps/rejected", "logits/chosen", "entropy",
                "num_tokens", "eval_rewards/chosen", "eval_kl"):
        assert any(key in entry for entry in actual), key
    assert compare_logs(expected, actual, rel=2e-4) == []
    # the run moved the policy: rewards are far from their initial 0
    assert max(abs(e.get("rewards/chosen", 0.0)) for e in actual) > 0.05
