"""Encoder-decoder models (T5, BART built tiny from config): the prompt goes to the encoder, the completion is
the decoder's labels, the KL batch likewise. TRL 1.16 dropped encoder-decoder support, so the oracle is a slow
plain-PyTorch reference (tests/reference_impl.py): loss and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import args, kto_trainer
from reference_impl import naive_kto_losses, naive_seq2seq_completion_logps, naive_weighted_mean, naive_z0
from transformers import Trainer

from kto_plugin import KTOConfig, KTOPlugin
from kto_plugin.data._collator import KTOCollator

M = -100


def tiny_seq2seq(kind: str, tokenizer, seed: int):
    torch.manual_seed(seed)
    pad, eos, bos = tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id
    if kind == "t5":
        from transformers import T5Config, T5ForConditionalGeneration

        config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          dropout_rate=0.0, pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad)
        return T5ForConditionalGeneration(config)
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=512, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                        pad_token_id=pad, bos_token_id=bos, eos_token_id=eos, decoder_start_token_id=eos,
                        forced_eos_token_id=None)
    return BartForConditionalGeneration(config)


@pytest.fixture
def short_rows(rows, tokenizer):
    pairs = [rows[i : i + 2] for i in range(0, len(rows), 2)]
    short = [p for p in pairs if len(tokenizer(p[0]["prompt"])["input_ids"]) < 120]
    return [r for p in short[:4] for r in p]


# --- the collator ---


def test_collator_docstring_example():
    collator = KTOCollator(pad_token_id=0)
    collator.encoder_decoder, collator.decoder_start_token_id = True, 0
    rows = [{"prompt_ids": [1, 2], "completion_ids": [3, 4], "label": True},
            {"prompt_ids": [5], "completion_ids": [6], "label": False}]
    batch = collator(rows)
    assert batch["input_ids"].tolist() == [[1, 2], [5, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert batch["decoder_input_ids"].tolist() == [[0, 3], [0, 0]]
    assert batch["decoder_attention_mask"].tolist() == [[1, 1], [1, 0]]
    labels = batch["labels"]
    assert labels["completion_labels"].tolist() == [[M, 3, 4], [M, 6, M]]
    # KL: prompt i in the encoder, completion i - 1 in the decoder
    assert labels["kl_input_ids"].tolist() == [[1, 2], [5, 0]]
    assert labels["kl_decoder_input_ids"].tolist() == [[0, 0], [0, 3]]  # row 0: start token, then padding
    assert labels["kl_completion_labels"].tolist() == [[M, 6, M], [M, 3, 4]]


def test_collator_truncates_each_side_and_keeps_labels_one_wider_than_the_decoder():
    collator = KTOCollator(pad_token_id=9, max_length=2, pad_to_multiple_of=4, label_pad_token_id=-1)
    collator.encoder_decoder, collator.decoder_start_token_id = True, 7
    rows = [{"prompt_ids": [1, 2, 3], "completion_ids": [4, 5, 6], "label": True},
            {"prompt_ids": [8], "completion_ids": [10], "label": False}]
    batch = collator(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 9, 9], [8, 9, 9, 9]]
    assert batch["decoder_input_ids"].tolist() == [[7, 4, 9, 9], [7, 9, 9, 9]]
    assert batch["labels"]["completion_labels"].tolist() == [[-1, 4, 5, -1, -1], [-1, 10, -1, -1, -1]]
    collator.truncation_mode = "keep_end"
    assert collator(rows)["input_ids"][0].tolist() == [2, 3, 9, 9]  # the prompt keeps its end


# --- loss and gradients against the slow reference ---


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_loss_and_gradients_match_the_slow_reference(kind, tokenizer, short_rows, tmp_path):
    policy = tiny_seq2seq(kind, tokenizer, seed=1)
    reference = tiny_seq2seq(kind, tokenizer, seed=2)
    naive_policy, naive_reference = copy.deepcopy(policy), copy.deepcopy(reference)
    kto, trainer = kto_trainer(policy, tokenizer, short_rows, tmp_path,
                               kto_kwargs={"max_length": 512, "max_completion_length": 32},
                               plugin_kwargs={"ref_model": reference})
    kto.attach(trainer)
    assert kto.collator.encoder_decoder
    rows = [trainer.train_dataset[i] for i in range(4)]
    assert sorted(r["label"] for r in rows) == [False, False, True, True]
    batch = kto.collator(rows)
    assert batch["decoder_input_ids"].shape[1] + 1 == batch["labels"]["completion_labels"].shape[1]
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()

    prompts = [r["prompt_ids"] for r in rows]
    completions = [r["completion_ids"] for r in rows]
    shifted = completions[-1:] + completions[:-1]
    label = torch.tensor([r["label"] for r in rows])
    logps = naive_seq2seq_completion_logps(naive_policy, prompts, completions)
    with torch.no_grad():
        ref_logps = naive_seq2seq_completion_logps(naive_reference, prompts, completions)
        z0 = torch.tensor(naive_z0(naive_seq2seq_completion_logps(naive_policy, prompts, shifted),
                                   naive_seq2seq_completion_logps(naive_reference, prompts, shifted)))
    beta = kto.config.beta
    expected = naive_weighted_mean(naive_kto_losses(logps, ref_logps, label, z0, beta), label, 1.0, 1.0)
    expected.backward()

    assert (logps - ref_logps).abs().max() > 0.1  # policy and reference differ: the rewards are not zero
    assert z0 > 0  # the KL batch moves the loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    ours = dict(policy.named_parameters())
    n_compared = 0
    for name, param in naive_policy.named_parameters():
        if param.grad is None:
            assert ours[name].grad is None or not ours[name].grad.any(), name
            continue
        # float32 summation-order noise scales with the tensor's largest gradient entry
        atol = 1e-4 * float(param.grad.abs().max()) + 1e-12  # + a floor for gradients that are 0 in exact math
        torch.testing.assert_close(ours[name].grad, param.grad, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")
        n_compared += 1
    assert n_compared > 10


def test_trains_and_evaluates_end_to_end(tokenizer, short_rows, tmp_path):
    # one architecture suffices here: the numbers of both are checked against the slow reference above
    policy = tiny_seq2seq("t5", tokenizer, seed=1)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    # a non-default label_pad_token_id: the logits path (encoder-decoder models) must skip it too
    kto, trainer = kto_trainer(policy, tokenizer, short_rows, tmp_path, eval_rows=short_rows[:4],
                               kto_kwargs={"max_length": 512, "max_completion_length": 16, "label_pad_token_id": -3})
    kto.attach(trainer)
    assert kto.reference.why == "a frozen copy of the initial policy"
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # policy == reference at the first step
    assert any(not torch.equal(before[n], p) for n, p in policy.named_parameters())
    metrics = trainer.evaluate()
    assert metrics["eval_rewards/chosen"] != 0.0 and "eval_kl" in metrics


def test_is_encoder_decoder_declared_wrongly_is_refused(model, tokenizer, short_rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, short_rows, tmp_path, kto_kwargs={"is_encoder_decoder": True})
    with pytest.raises(ValueError, match="is_encoder_decoder=True, but the model .LlamaForCausalLM."):
        kto.attach(trainer)
    assert trainer.compute_loss_func is None


def test_decoder_only_reference_for_an_encoder_decoder_policy_is_refused(model, tokenizer, short_rows, tmp_path):
    policy = tiny_seq2seq("t5", tokenizer, seed=1)
    kto, trainer = kto_trainer(policy, tokenizer, short_rows, tmp_path, plugin_kwargs={"ref_model": model})
    with pytest.raises(ValueError, match="encoder-decoder model but ref_model .LlamaForCausalLM. is not"):
        kto.attach(trainer)


def test_separate_tokenization_for_encoder_decoder(tokenizer, short_rows):
    kto = KTOPlugin(KTOConfig(max_length=None, is_encoder_decoder=True), tokenizer=tokenizer)
    prepared = kto.prepare_dataset(short_rows[:2])
    for row, raw in zip(prepared, short_rows[:2]):
        assert row["prompt_ids"] == tokenizer(raw["prompt"])["input_ids"]
        assert row["completion_ids"] == tokenizer(raw["completion"])["input_ids"] + [tokenizer.eos_token_id]


def test_precomputed_reference_and_lora_adapter(tokenizer, short_rows, tmp_path):
    """Precomputed reference log-probs give the live reference's numbers; a LoRA on T5 trains against the base."""
    from peft import LoraConfig

    kwargs = {"max_length": 512, "max_completion_length": 16}
    policy = tiny_seq2seq("t5", tokenizer, seed=1)
    reference = tiny_seq2seq("t5", tokenizer, seed=2)
    live, live_trainer = kto_trainer(copy.deepcopy(policy), tokenizer, short_rows, tmp_path / "live",
                                     eval_rows=short_rows[:4], kto_kwargs=kwargs,
                                     plugin_kwargs={"ref_model": copy.deepcopy(reference)})
    pre, pre_trainer = kto_trainer(copy.deepcopy(policy), tokenizer, short_rows, tmp_path / "pre",
                                   eval_rows=short_rows[:4],
                                   kto_kwargs={**kwargs, "precompute_ref_log_probs": True, "precompute_cache": False},
                                   plugin_kwargs={"ref_model": copy.deepcopy(reference)})
    live.attach(live_trainer)
    pre.attach(pre_trainer)
    assert "ref_logps" in pre_trainer.eval_dataset.column_names
    expected, actual = live_trainer.evaluate(), pre_trainer.evaluate()
    for key in ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_kl"):
        assert actual[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    assert expected["eval_rewards/chosen"] != 0.0

    lora = KTOPlugin(KTOConfig(**kwargs), tokenizer=tokenizer,
                     peft_config=LoraConfig(r=4, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
    trainer = Trainer(model=lora.wrap_model(policy), args=args(tmp_path / "lora", learning_rate=0.5),
                      train_dataset=lora.prepare_dataset(short_rows), data_collator=lora.collator)
    lora.attach(trainer)
    assert lora.reference.mode == "null_adapter"
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[0] == pytest.approx(0.5, abs=1e-6) and losses[-1] != pytest.approx(0.5, abs=1e-6)
