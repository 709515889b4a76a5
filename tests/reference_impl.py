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


# --- the KTO family (kto_plugin.loss, docs/losses.md), one example at a time ---


def naive_token_logps(model, prompt_ids, completion_ids) -> torch.Tensor:
    """(n,) log pi(c_t | prompt, c_<t) of each completion token of one unpadded row, from full-vocabulary logits."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    start = len(prompt_ids)
    return torch.stack([log_probs[t - 1, ids[0, t]] for t in range(start, ids.shape[1])])


def naive_log_ratio(policy_tokens, reference_tokens, clamp=None, normalize=False):
    """r of one row from its per-token log-probs: the plain sum, or humanline's sum of clamped token ratios;
    divided by the token count when length-normalised."""
    total = policy_tokens.new_zeros(())
    for p, q in zip(policy_tokens, reference_tokens):
        ratio = p - q
        if clamp is not None:
            ratio = torch.clamp(ratio, clamp[0], clamp[1])
        total = total + ratio
    return total / max(len(policy_tokens), 1) if normalize else total


def naive_positive_mean(kl_ratios):
    """Mean over the positive mismatched-pair log-ratios only; 0 when none is positive."""
    positive = [float(r) for r in kl_ratios if float(r) > 0]
    return math.fsum(positive) / len(positive) if positive else 0.0


def naive_bco_losses(log_ratios, labels, delta, beta):
    """-log sigmoid(beta r - delta) for desirable rows, -log sigmoid(-(beta r - delta)) for undesirable ones."""
    out = []
    for i in range(log_ratios.shape[0]):
        logit = beta * log_ratios[i] - delta
        out.append(torch.log(1 + torch.exp(-logit)) if bool(labels[i]) else torch.log(1 + torch.exp(logit)))
    return torch.stack(out)


def naive_sft_term(policy_logps, num_tokens, labels, weight):
    """weight * mean over desirable rows of -log pi(y|x) / |y|."""
    terms = [-policy_logps[i] / num_tokens[i] for i in range(len(labels)) if bool(labels[i])]
    return weight * (sum(terms) / len(terms)) if terms else policy_logps.sum() * 0.0


def naive_reward_accuracy(log_ratios, labels, reference_point):
    right = [(float(r) > reference_point) if bool(d) else (float(r) < reference_point)
             for r, d in zip(log_ratios, labels)]
    return sum(right) / len(right)


def naive_auroc(scores, labels):
    """Pairs (desirable, undesirable) where the desirable row scores higher, ties counting 1/2, over all pairs."""
    pos = [float(s) for s, d in zip(scores, labels) if bool(d)]
    neg = [float(s) for s, d in zip(scores, labels) if not bool(d)]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))
