"""kto_plugin.step._logprobs: the chunked log-prob path equals the naive full log-softmax, values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kto_plugin.step import _logprobs as logprobs
from kto_plugin.step._logprobs import IGNORE_INDEX, LogpsPath, choose_path, logps_from_hidden, logps_from_logits
from reference_impl import naive_completion_logps


def _batch(vocab=50, batch=3, seq=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    mask[0, 4:] = 1
    mask[1, 2:6] = 1  # padding after the completion
    if batch > 2:
        mask[2, seq - 1 :] = 1  # one completion token
    labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
    return input_ids, mask, labels


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk_elements", [2**23, 3 * 50])  # one chunk / 3 tokens per chunk
@pytest.mark.parametrize("with_bias", [False, True])
def test_hidden_path_matches_naive(monkeypatch, dtype, tol, chunk_elements, with_bias):
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", chunk_elements)
    vocab, hidden_size = 50, 16
    input_ids, mask, labels = _batch(vocab)
    head = nn.Linear(hidden_size, vocab, bias=with_bias).to(dtype)
    hidden = torch.randn(3, 9, hidden_size, dtype=dtype, requires_grad=True)

    ours = logps_from_hidden(hidden, head, labels, with_stats=True)
    ours.logps.sum().backward()
    g_ours = [hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if with_bias else [])

    head2 = copy.deepcopy(head)
    head2.zero_grad()
    hidden2 = hidden.detach().clone().requires_grad_()
    naive = naive_completion_logps(head2(hidden2), input_ids, mask)
    naive.sum().backward()
    g_naive = [hidden2.grad, head2.weight.grad] + ([head2.bias.grad] if with_bias else [])

    assert ours.logps.dtype == torch.float32
    assert torch.allclose(ours.logps, naive, rtol=tol, atol=tol)
    for a, b in zip(g_ours, g_naive):
        assert a.dtype == b.dtype
        assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * 0.1)
    assert ours.num_tokens.tolist() == [5.0, 4.0, 1.0]
    # stats: entropy and mean logit of the scored positions, from the same full softmax
    full = head2(hidden2).detach().float()[:, :-1]
    scored = mask[:, 1:].bool()
    lp = full.log_softmax(-1)
    entropy = -(lp.exp() * lp).sum(-1)
    assert torch.allclose(ours.entropy_sum, (entropy * scored).sum(-1), rtol=tol, atol=tol)
    assert torch.allclose(ours.mean_logit_sum, (full.mean(-1) * scored).sum(-1), rtol=tol, atol=tol)


def test_frozen_head_gets_no_weight_gradient():
    # LoRA leaves the LM head frozen: the backward must not build a (V, H) gradient for it
    head = nn.Linear(8, 30, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    _, _, labels = _batch(30, batch=2, seq=5)
    logps_from_hidden(hidden, head, labels).logps.sum().backward()
    assert head.weight.grad is None and hidden.grad is not None


def test_logits_path_matches_naive(monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 2 * 50)
    input_ids, mask, labels = _batch(50)
    logits = torch.randn(3, 9, 50, requires_grad=True)
    ours = logps_from_logits(logits, labels, with_stats=True)
    (g_ours,) = torch.autograd.grad(ours.logps.sum(), logits)
    naive = naive_completion_logps(logits, input_ids, mask)
    (g_naive,) = torch.autograd.grad(naive.sum(), logits)
    assert torch.allclose(ours.logps, naive, atol=1e-5)
    assert torch.allclose(g_ours, g_naive, atol=1e-6)


def test_virtual_token_prefix_is_skipped():
    # prompt-learning adapters prepend virtual tokens: only the last T positions belong to the input
    input_ids, mask, labels = _batch(20)
    logits = torch.randn(3, 9, 20)
    prefixed = torch.cat([torch.randn(3, 4, 20), logits], dim=1)
    assert torch.allclose(logps_from_logits(prefixed, labels).logps, naive_completion_logps(logits, input_ids, mask))


def test_empty_completion_gives_zero_and_keeps_graph():
    head = nn.Linear(4, 10)
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    labels = torch.full((2, 3), IGNORE_INDEX)
    out = logps_from_hidden(hidden, head, labels)
    assert out.logps.tolist() == [0.0, 0.0]
    out.logps.sum().backward()  # must not fail


def test_tiny_llama_hidden_path_equals_full_logits(model, tokenizer):
    input_ids, mask, labels = _batch(len(tokenizer), batch=2, seq=12)
    attention = torch.ones_like(input_ids)
    path = choose_path(model)
    assert path.use_hidden
    ours = path.forward(model, model.get_output_embeddings(), input_ids, attention, labels)
    full = model(input_ids=input_ids, attention_mask=attention).logits
    assert torch.allclose(ours.logps, naive_completion_logps(full, input_ids, mask), atol=1e-4)
    assert LogpsPath(False).forward(model, None, input_ids, attention, labels).logps.allclose(ours.logps, atol=1e-4)


def test_choose_path_falls_back_to_logits(model):
    model.config.final_logit_softcapping = 30.0
    path = choose_path(model)
    assert not path.use_hidden and "final_logit_softcapping" in path.reason
    assert not choose_path(model, sharded=True).use_hidden


def test_choose_path_lm_head_adapter(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "lm_head"], r=2))
    path = choose_path(peft_model)
    assert not path.use_hidden and "not a plain nn.Linear" in path.reason


def test_no_chunk_exceeds_the_budget(monkeypatch):
    # the float32 logits of one chunk never exceed CHUNK_ELEMENTS, in the forward and the recomputing backward
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 4 * 1000)
    seen = []
    original = logprobs._project

    def recording(hidden, weight, bias):
        out = original(hidden, weight, bias)
        seen.append(out.numel())
        return out

    monkeypatch.setattr(logprobs, "_project", recording)
    head = nn.Linear(8, 1000)
    hidden = torch.randn(2, 20, 8, requires_grad=True)
    labels = torch.randint(0, 1000, (2, 20))
    logps_from_hidden(hidden, head, labels).logps.sum().backward()
    assert len(seen) == 2 * 10  # 38 scored tokens in chunks of 4: 10 forward + 10 backward chunks
    assert max(seen) == 4 * 1000
