"""Slow, obvious plain-PyTorch references the tests compare kto_plugin against.

Written from the KTO paper (eq. 7) and the APO paper, one example at a time, with full-vocabulary
log-softmax: no chunking, no tricks.
"""

from __future__ import annotations

import math

import torch


def naive_completion_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """sum_t log softmax(logits[t-1])[input_ids[t]] over positions t with completion_mask[t] == 1."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # full (B, T, V) float32
    out = []
    for b in range(input_ids.shape[0]):
        total = logits.new_zeros((), dtype=torch.float32)
        for t in range(1, input_ids.shape[1]):
            if completion_mask[b, t]:
                total = total + log_probs[b, t - 1, input_ids[b, t]]
        out.append(total)
    return torch.stack(out)


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-x))


def naive_kto_losses(policy, reference, labels, kl, beta):
    """Per-example KTO losses (paper eq. 7), one example at a time."""
    z0 = kl.detach()
    out = []
    for i in range(policy.shape[0]):
        r = policy[i] - reference[i]
        if bool(labels[i]):
            out.append(1 - _sigmoid(beta * (r - z0)))
        else:
            out.append(1 - _sigmoid(beta * (z0 - r)))
    return torch.stack(out)


def naive_apo_zero_unpaired_losses(policy, reference, labels, beta):
    out = []
    for i in range(policy.shape[0]):
        r = policy[i] - reference[i]
        out.append(1 - _sigmoid(beta * r) if bool(labels[i]) else _sigmoid(beta * r))
    return torch.stack(out)


def naive_weighted_mean(losses, labels, desirable_weight, undesirable_weight):
    total = 0.0
    for i in range(losses.shape[0]):
        total = total + (desirable_weight if bool(labels[i]) else undesirable_weight) * losses[i]
    return total / losses.shape[0]


def naive_z0(policy_kl, reference_kl):
    """max(0, mean of mismatched-pair log-ratios), no gradient."""
    diffs = [(float(p) - float(r)) for p, r in zip(policy_kl, reference_kl)]
    return max(0.0, math.fsum(diffs) / len(diffs))


def naive_kto_logsigmoid_losses(policy, reference, labels, kl, beta):
    """Per-example log-sigmoid KTO losses (HALOs legacy `KTOLogSigmoidTrainer`), one example at a time:
    log(1 + exp(-beta * (r - z0))) for desirable, log(1 + exp(-beta * (z0 - r))) for undesirable rows."""
    z0 = kl.detach()
    out = []
    for i in range(policy.shape[0]):
        r = policy[i] - reference[i]
        margin = beta * (r - z0) if bool(labels[i]) else beta * (z0 - r)
        out.append(torch.log(1 + torch.exp(-margin)))
    return torch.stack(out)


def naive_seq2seq_completion_logps(model, prompt_ids, completion_ids) -> torch.Tensor:
    """sum_t log p(c_t | prompt, c_<t) for an encoder-decoder model, one unpadded row at a time.

    The model builds its decoder inputs from `labels` itself (shifted right after its decoder start token),
    so nothing of kto_plugin's batch layout is involved.
    """
    out = []
    for prompt, completion in zip(prompt_ids, completion_ids):
        labels = torch.tensor([completion])
        logits = model(input_ids=torch.tensor([prompt]), labels=labels).logits[0]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        out.append(log_probs.gather(-1, labels[0, :, None]).sum())  # position t predicts completion token t
    return torch.stack(out)
