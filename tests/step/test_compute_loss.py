"""The loss hook's cross-process pieces, with a stand-in accelerator: z0 is a weighted mean over processes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kto_plugin import KTOConfig, KTOPlugin

from helpers import kto_trainer


class TwoRankAccelerator:
    """Plays rank 0 of two: `reduce(x, "sum")` adds the other rank's tensor, `"mean"` averages with it."""

    num_processes = 2
    device = torch.device("cpu")

    def __init__(self, other: torch.Tensor) -> None:
        self.other = other

    def reduce(self, x, reduction):
        return x + self.other if reduction == "sum" else (x + self.other) / 2


def test_z0_is_weighted_by_each_rank_pair_count(tokenizer):
    hook = KTOPlugin(KTOConfig(), tokenizer=tokenizer).loss_hook
    # rank 0: 2 pairs with log-ratio 1; rank 1: 6 pairs with log-ratio 3 (sum 18, count 6)
    trainer = SimpleNamespace(accelerator=TwoRankAccelerator(torch.tensor([18.0, 6.0])))
    policy, reference = torch.tensor([1.0, 1.0]), torch.zeros(2)
    z0 = hook.z0.estimate(trainer.accelerator, True, policy, reference, policy - reference, torch.ones(2), {})
    assert z0.item() == pytest.approx((2 + 18) / 8)  # not the mean of the ranks' means, (1 + 3) / 2


def test_z0_clamped_at_zero_after_reduction(tokenizer):
    hook = KTOPlugin(KTOConfig(), tokenizer=tokenizer).loss_hook
    trainer = SimpleNamespace(accelerator=TwoRankAccelerator(torch.tensor([-10.0, 2.0])))
    policy, reference = torch.tensor([2.0, 2.0]), torch.zeros(2)
    z0 = hook.z0.estimate(trainer.accelerator, True, policy, reference, policy - reference, torch.ones(2), {})
    assert z0.item() == 0.0  # (4 - 10) / 4 < 0


def test_window_estimate_wraps_and_detach_restores_get_batch_samples(model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, kto_kwargs={"kl_estimate": "window"})
    original = trainer.get_batch_samples
    kto.attach(trainer)
    assert "get_batch_samples" in trainer.__dict__
    kto.detach()
    assert "get_batch_samples" not in trainer.__dict__
    assert trainer.get_batch_samples == original


def test_window_estimate_not_installed_without_kl(model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path,
                               kto_kwargs={"kl_estimate": "window", "loss_type": "apo_zero_unpaired"})
    kto.attach(trainer)
    assert "get_batch_samples" not in trainer.__dict__


@pytest.mark.slow
def test_window_estimate_with_precomputed_reference_equals_live(base_model, tokenizer, rows, tmp_path):
    import copy

    runs = []
    desirable = [r for r in rows if r["label"]]  # the policy raises completion log-probs: z0 leaves 0
    for precompute in (False, True):
        kto, trainer = kto_trainer(
            copy.deepcopy(base_model), tokenizer, desirable, tmp_path / str(precompute),
            kto_kwargs={"kl_estimate": "window", "precompute_ref_log_probs": precompute, "precompute_cache": False,
                        "warn_guidance": False},
            gradient_accumulation_steps=2, max_steps=3,
        )
        kto.attach(trainer)
        trainer.train()
        runs.append(trainer.state.log_history)
    live, pre = ([h["kl"] for h in log if "kl" in h and "loss" in h] for log in runs)
    assert len(live) == 3 and any(k > 0 for k in live), live
    assert pre == pytest.approx(live, rel=1e-5, abs=1e-7)
