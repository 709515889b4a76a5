"""kto_plugin.step._shared_prompt and _buckets: completions scored against the prompt's keys and values, and rows
run in groups of similar length, give the log-probs of the full recompute (each row run whole, naive
log-softmax of the model's own logits: `reference_impl.naive_completion_logps`).

Models from config: Llama (GQA), Qwen2 (GQA, biased projections), Mistral (sliding-window config), Qwen3 with one
key/value head (MQA). Batches with the edge cases: an empty prompt, a prompt filling max_length (no completion
token left), a prompt one token short of it, a completion cut by max_length, extra padding (pad_to_multiple_of).
"""

from __future__ import annotations

import copy
import itertools
import logging

import pytest
import torch

from kto_plugin.data import KTOCollator
from kto_plugin.step import _buckets
from kto_plugin.step._buckets import length_groups, use_buckets
from kto_plugin.step._logprobs import LogpsPath
from kto_plugin.step._shared_prompt import (
    SharedLayout, choose_sharing, fits_window, prompt_pass, prompt_state_of, score_completions,
)
from helpers import kto_trainer
from reference_impl import naive_completion_logps

VOCAB, MAX_LENGTH, PAD = 96, 24, 0


def _config(kind):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, tie_word_embeddings=False)
    if kind == "llama":
        return LlamaConfig(num_key_value_heads=2, **common)
    if kind == "qwen2":
        return Qwen2Config(num_key_value_heads=2, **common)
    if kind == "mistral":
        return MistralConfig(num_key_value_heads=2, sliding_window=4096, **common)
    return Qwen3Config(num_key_value_heads=1, head_dim=8, **common)  # "qwen3-mqa"


def _model(kind, attention="sdpa"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_config(kind), attn_implementation=attention).eval()


def _rows():
    """(prompt, completion) token rows; the KL batch pairs prompt i with completion i - 1 (row 0: the last's)."""
    g = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    return [
        {"prompt_ids": ids(5), "completion_ids": ids(7), "label": True},
        {"prompt_ids": [], "completion_ids": ids(6), "label": False},  # empty prompt
        {"prompt_ids": ids(MAX_LENGTH), "completion_ids": ids(4), "label": True},  # fills max_length: no completion
        {"prompt_ids": ids(MAX_LENGTH - 1), "completion_ids": ids(3), "label": False},  # one completion token left
        {"prompt_ids": ids(2), "completion_ids": ids(30), "label": True},  # completion cut by max_length
        {"prompt_ids": ids(11), "completion_ids": ids(1), "label": False},
    ]


def _batch(rows=None, **collator_kwargs):
    collator = KTOCollator(pad_token_id=PAD, max_length=MAX_LENGTH, **collator_kwargs)
    return collator(rows if rows is not None else _rows())["labels"]


@torch.no_grad()
def _full(model, labels, prefix=""):
    ids, mask = labels[f"{prefix}input_ids"], labels[f"{prefix}attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits
    return naive_completion_logps(logits, ids, labels[f"{prefix}completion_labels"] != -100)


@torch.no_grad()
def _full_tokens(model, labels, prefix=""):
    """(B, T): log pi(token t | tokens < t) where token t is a completion token, 0 elsewhere (full rows)."""
    ids, mask = labels[f"{prefix}input_ids"], labels[f"{prefix}attention_mask"]
    log_probs = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    out = torch.zeros(ids.shape)
    for b, t in (labels[f"{prefix}completion_labels"] != -100).nonzero().tolist():
        if t > 0:
            out[b, t] = log_probs[b, t - 1, ids[b, t]]
    return out


def _close(ours, full):
    # float32 sums of up to 23 log-probs of ~-4.6 each: a few ulps of ~100
    assert torch.allclose(ours, full, rtol=1e-5, atol=1e-4), (ours, full)


@pytest.fixture(params=[False, True], ids=["one-group", "buckets"])
def bucketed(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(_buckets, "CPU_CALL_OVERHEAD", 0)  # a group per distinct length
    return request.param


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "qwen3-mqa"])
@pytest.mark.parametrize("pad_to_multiple_of", [None, 16])
def test_reference_route_equals_full_recompute(kind, pad_to_multiple_of, bucketed):
    model = _model(kind)
    labels = _batch(pad_to_multiple_of=pad_to_multiple_of)
    path = LogpsPath(True)
    sharing = choose_sharing(model, path)
    layout = SharedLayout.of(labels, path.ignore_index)
    assert sharing.on and layout is not None and fits_window(layout, sharing)
    assert layout.prompt_lengths.tolist() == [5, 0, MAX_LENGTH, MAX_LENGTH - 1, 2, 11]
    with torch.no_grad():
        prompt = prompt_pass(model, labels["input_ids"], layout, sharing, bucketed)
        both = score_completions(model, model.lm_head, path, prompt, layout, layout.completions, sharing, bucketed)
    target, kl = both.logps.chunk(2)
    _close(target, _full(model, labels))
    _close(kl, _full(model, labels, "kl_"))
    assert target[2] == 0  # the prompt filling max_length scores nothing
    # the empty prompt's first completion token has no predecessor in the full row either; row 4 keeps 22 of its
    # 30 completion tokens
    assert both.num_tokens[:6].tolist() == [7, 5, 0, 1, 22, 1]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "qwen3-mqa"])
def test_policy_route_from_the_trainers_forward_equals_full_recompute(kind, bucketed):
    """The KL completions scored against the cache of a forward of the target batch in training mode (grad on),
    as the Trainer runs it; that forward's gradients are unchanged by keeping the cache."""
    model = _model(kind).train()
    labels = _batch()
    path = LogpsPath(True)
    sharing = choose_sharing(model, path)
    layout = SharedLayout.of(labels, path.ignore_index)
    outputs = model(input_ids=labels["input_ids"], attention_mask=labels["attention_mask"], use_cache=True,
                    output_hidden_states=True, logits_to_keep=1)
    prompt = prompt_state_of(outputs, layout, sharing)
    assert prompt is not None and not any(k.requires_grad for pair in prompt.layers for k in pair)
    with torch.no_grad():
        kl = score_completions(model, model.lm_head, path, prompt, layout, layout.kl, sharing, bucketed)
    _close(kl.logps, _full(model, labels, "kl_"))

    # gradients of the target log-probs: the same with and without the cache kept
    def grads(use_cache):
        model.zero_grad()
        out = model(input_ids=labels["input_ids"], attention_mask=labels["attention_mask"], use_cache=use_cache,
                    output_hidden_states=True, logits_to_keep=1)
        path.from_outputs(out, model.lm_head, labels["completion_labels"]).logps.sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    for with_cache, without in zip(grads(True), grads(False)):
        assert torch.allclose(with_cache, without, rtol=1e-5, atol=1e-6)


def test_per_token_values_are_laid_out_as_the_full_rows(bucketed):
    """Per-token log-probs (asked for by per-token losses, e.g. humanline) at the columns of the batch's completion
    labels, whether the completions ran after the prompts' cache or as full rows."""
    model = _model("llama")
    labels = _batch(pad_to_multiple_of=16)
    path = LogpsPath(True)
    sharing = choose_sharing(model, path)
    layout = SharedLayout.of(labels, path.ignore_index)
    width = max(labels["completion_labels"].shape[1], labels["kl_completion_labels"].shape[1])
    with torch.no_grad():
        prompt = prompt_pass(model, labels["input_ids"], layout, sharing, bucketed)
        both = score_completions(model, model.lm_head, path, prompt, layout, layout.completions, sharing, bucketed,
                                 token_width=width)
    target, kl = both.token_logps.chunk(2)
    assert torch.allclose(target[:, : labels["completion_labels"].shape[1]], _full_tokens(model, labels), atol=1e-5)
    assert torch.allclose(kl[:, : labels["kl_completion_labels"].shape[1]], _full_tokens(model, labels, "kl_"),
                          atol=1e-5)
    assert torch.allclose(both.token_logps.sum(1), both.logps, atol=1e-4)


def test_eager_attention_equals_full_recompute():
    model = _model("llama", attention="eager")
    labels = _batch()
    path = LogpsPath(True)
    sharing = choose_sharing(model, path)
    layout = SharedLayout.of(labels, path.ignore_index)
    with torch.no_grad():
        prompt = prompt_pass(model, labels["input_ids"], layout, sharing)
        kl = score_completions(model, model.lm_head, path, prompt, layout, layout.kl, sharing)
    _close(kl.logps, _full(model, labels, "kl_"))


def test_keep_end_cuts_a_kl_prompt_differently_so_that_batch_runs_full_rows():
    """keep_end keeps the completion whole and cuts the prompt's start by the completion's length: the KL row of
    prompt 0 (with the 10-token completion) starts later than its target row (3-token completion)."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, VOCAB, (20,), generator=g).tolist()
    rows = [{"prompt_ids": prompt, "completion_ids": [5, 6, 7], "label": True},
            {"prompt_ids": [9, 9], "completion_ids": list(range(10, 20)), "label": False}]
    assert SharedLayout.of(_batch(rows, truncation_mode="keep_end"), -100) is None
    assert SharedLayout.of(_batch(rows, truncation_mode="keep_start"), -100) is not None
    short = [dict(r, prompt_ids=r["prompt_ids"][-8:]) for r in rows]  # nothing cut: the prompts agree
    assert SharedLayout.of(_batch(short, truncation_mode="keep_end"), -100) is not None


def test_rows_reaching_a_sliding_window_run_full_rows():
    from transformers import AutoModelForCausalLM

    config = _config("mistral")
    config.sliding_window = 8  # the rows here are up to 24 tokens: the window binds
    model = AutoModelForCausalLM.from_config(config)
    sharing = choose_sharing(model, LogpsPath(True))
    assert sharing.on and sharing.window == 8
    assert not fits_window(SharedLayout.of(_batch(), -100), sharing)


@pytest.mark.parametrize("lengths", [[10, 300, 12, 290], [5, 5, 5], [1, 2, 3, 50, 51, 400, 7, 9], [0, 0, 30]])
@pytest.mark.parametrize("overhead", [0, 8, 64, 1000])
def test_length_groups_is_the_cheapest_split(lengths, overhead):
    """Brute force over every partition of the rows sorted by length (contiguous runs)."""
    groups = length_groups(lengths, overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))

    def cost(gs):
        return sum(overhead + len(g) * max(lengths[i] for i in g) for g in gs)

    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = min(
        cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))])
        for k in range(len(order))
        for cuts in itertools.combinations(range(1, len(order)), k)
    )
    assert cost(groups) == best


def test_length_groups_worked_example():
    # sorted 10, 12 | 290, 300: 64 + 2 * 12 + 64 + 2 * 300 = 752 < one group 64 + 4 * 300 = 1264
    assert length_groups([10, 300, 12, 290], overhead=64) == [[0, 2], [3, 1]]
    assert length_groups([10, 300, 12, 290], overhead=10_000) == [[0, 2, 3, 1]]


def test_use_buckets_auto_is_cpu_only():
    assert use_buckets("auto", torch.device("cpu"))
    assert not use_buckets("auto", torch.device("cuda"))
    assert use_buckets("on", torch.device("cuda")) and not use_buckets("off", torch.device("cpu"))


def test_choose_sharing_says_why_not(base_model):
    path = LogpsPath(True)
    assert choose_sharing(base_model, path).on
    assert "reuse_prompt_cache=False" in choose_sharing(base_model, path, enabled=False).reason
    assert "no KL pass" in choose_sharing(base_model, path, kl_pass=False).reason
    assert "gradient checkpointing" in choose_sharing(base_model, path, gradient_checkpointing=True).reason
    assert "soft" in choose_sharing(base_model, LogpsPath(False, "the model config sets final_logit_softcapping")).reason

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    assert "model type 'gpt2' is not verified" in choose_sharing(gpt2, path).reason


def test_prompt_learning_adapters_are_refused(base_model):
    from peft import PrefixTuningConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base_model), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert "prompt-learning" in choose_sharing(peft_model, LogpsPath(True)).reason


class _CacheCalls:
    """Counts a module's forward calls that pass a key/value cache (the completion passes)."""

    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:  # transformers < 5.25
            self.calls += 1


@pytest.mark.parametrize(
    "loss_type,lora", [("kto", False), ("kto", True), ("humanline", False)],
    ids=["full-ft-frozen-copy", "lora-null-reference", "humanline-per-token"],
)
def test_training_with_and_without_the_prompt_cache_agrees(loss_type, lora, base_model, tokenizer, rows, tmp_path,
                                                           caplog):
    """Three SGD steps: the same logged metrics and the same weights, with each prompt computed once or per pass
    (humanline: per-token log-ratios, so per-token reference values from the shared passes)."""
    runs = {}
    for reuse in (True, False):
        model = copy.deepcopy(base_model)
        if lora:
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(0)  # the same random lora_A in both runs
            model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
        kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path / str(reuse), max_steps=3, optim="sgd",
                                   kto_kwargs={"reuse_prompt_cache": reuse, "warn_guidance": False,
                                               "loss_type": loss_type})
        with caplog.at_level(logging.INFO, logger="kto_plugin"):
            kto.attach(trainer)
        passes = kto.loss_hook.passes
        assert passes.policy_sharing.on is reuse and passes.reference_sharing.on is reuse
        spy = _CacheCalls(model)
        trainer.train()
        # with the cache, per step: the policy's KL completions and (null reference: the same module) the reference's
        # target and KL completions together, each in one call or more (groups of similar length); without it, none
        assert spy.calls >= 3 * (2 if lora else 1) if reuse else spy.calls == 0
        runs[reuse] = ([h for h in trainer.state.log_history if "loss" in h],
                       {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert "prompts computed once: policy on, reference on" in caplog.text
    assert "policy off (KTOConfig.reuse_prompt_cache=False)" in caplog.text
    (logs_on, weights_on), (logs_off, weights_off) = runs[True], runs[False]
    for on, off in zip(logs_on, logs_off, strict=True):
        for key in ("loss", "kl", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected"):
            if key in on:
                assert on[key] == pytest.approx(off[key], rel=1e-4, abs=1e-4), key
    for name, value in weights_on.items():
        assert torch.allclose(value, weights_off[name], rtol=1e-4, atol=1e-6), name


def test_gradient_checkpointing_keeps_the_reference_sharing(base_model, tokenizer, rows, tmp_path, caplog):
    from transformers import TrainingArguments

    # transformers 5.25 renamed gradient_checkpointing (the old name warns)
    name = "activation_checkpointing" if hasattr(TrainingArguments, "activation_checkpointing") else (
        "gradient_checkpointing")
    kto, trainer = kto_trainer(copy.deepcopy(base_model), tokenizer, rows, tmp_path, kto_kwargs={"warn_guidance": False},
                               **{name: True})
    with caplog.at_level(logging.INFO, logger="kto_plugin"):
        kto.attach(trainer)
    assert "policy off (gradient checkpointing: the policy's forward keeps no key/value cache), reference on" in (
        caplog.text
    )
    assert "use_cache" not in kto.collator.model_kwargs or kto.collator.model_kwargs["use_cache"] is False
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_lora_null_reference_with_gradient_checkpointing(base_model, tokenizer, rows, tmp_path, caplog):
    """The reference runs through the policy's module in training mode: transformers < 5.24 drops a checkpointed
    model's cache there (the reference then runs full rows); from 5.24 it computes each prompt once. Either way the
    training equals full rows'."""
    from packaging.version import Version
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    name = "activation_checkpointing" if hasattr(TrainingArguments, "activation_checkpointing") else (
        "gradient_checkpointing")
    runs = {}
    for reuse in (True, False):
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(base_model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path / str(reuse), max_steps=2, optim="sgd",
                                   kto_kwargs={"reuse_prompt_cache": reuse, "warn_guidance": False}, **{name: True})
        with caplog.at_level(logging.INFO, logger="kto_plugin"):
            kto.attach(trainer)
            trainer.train()
        runs[reuse] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        if reuse:
            sharing = kto.loss_hook.passes.reference_sharing
            assert sharing.on is (Version(transformers_version()) >= Version("5.24")), sharing
    assert "returned no key/value cache" not in caplog.text  # decided at attach, not found out during training
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)


def transformers_version():
    import transformers

    return transformers.__version__


def test_a_model_that_keeps_no_cache_falls_back_to_full_rows(base_model, tokenizer, rows, tmp_path, caplog,
                                                            monkeypatch):
    """A forward that returns no cache (a setting choose_sharing did not foresee): one warning, full rows from then
    on, the same training as full rows."""
    from kto_plugin.step import _shared_prompt

    monkeypatch.setattr(_shared_prompt, "_kv_of", lambda *args: None)
    runs = {}
    for reuse in (True, False):
        kto, trainer = kto_trainer(copy.deepcopy(base_model), tokenizer, rows, tmp_path / str(reuse), max_steps=2,
                                   optim="sgd", kto_kwargs={"reuse_prompt_cache": reuse, "warn_guidance": False})
        kto.attach(trainer)
        with caplog.at_level(logging.WARNING, logger="kto_plugin"):
            trainer.train()
        runs[reuse] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert caplog.text.count("the reference's passes run full rows from now on") == 1
    assert caplog.text.count("the policy's KL pass runs full rows from now on") == 1
    assert runs[True] == pytest.approx(runs[False], rel=1e-6)
