"""generate_during_eval: policy vs reference completions at each evaluation, in a JSONL file and W&B."""

from __future__ import annotations

import copy
import json
import sys
import types

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

from helpers import kto_trainer
from kto_plugin import KTOConfig
from kto_plugin.integrations._generation import (
    GENERATIONS_FILE,
    KTOGenerationCallback,
    distinct_prompts,
    greedy_completions,
)
from kto_plugin.integrations._trackers import generation_table, log_to_wandb, table_key


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _distinct_raw_prompts(rows, n):
    out = []
    for r in rows:
        if r["prompt"] not in out:
            out.append(r["prompt"])
    return out[:n]


def _short_prompt_rows(rows, tokenizer):
    """Rows whose prompt fits well inside max_length=96 (8 prompts, each desirable and undesirable)."""
    return [r for r in rows if len(tokenizer(r["prompt"]).input_ids) < 48][:16]


def _state(model):
    return (
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        [m.training for m in model.modules()],
    )


def test_policy_and_reference_completions_per_prompt(model, tokenizer, rows, tmp_path):
    eval_rows = _short_prompt_rows(rows, tokenizer)
    kto, trainer = kto_trainer(
        model,
        tokenizer,
        rows,
        tmp_path,
        eval_rows=eval_rows,
        max_steps=6,
        learning_rate=0.05,
        kto_kwargs={"generate_during_eval": True, "generate_num_prompts": 3, "generate_max_new_tokens": 6},
    )
    kto.attach(trainer)
    before = _state(trainer.model)
    trainer.evaluate()
    assert (
        _state(trainer.model)[0] == before[0]
    )  # requires_grad as found (evaluate() itself leaves eval mode)
    path = tmp_path / GENERATIONS_FILE
    first = _read(path)
    assert len(first) == 3
    # the first 3 distinct eval prompts, in order (a paired dataset repeats each prompt)
    assert [r["prompt"] for r in first] == _distinct_raw_prompts(eval_rows, 3)
    for r in first:
        assert set(r) == {"split", "step", "prompt", "policy", "reference"}
        assert r["split"] == "eval" and r["step"] == 0
        assert r["policy"] == r["reference"] and r["policy"]  # step 0: the policy is the reference

    trainer.train()
    trainer.evaluate()
    later = _read(path)[3:]  # appended
    assert len(later) == 3 and all(r["step"] == 6 for r in later)
    assert [r["prompt"] for r in later] == [r["prompt"] for r in first]
    assert [r["reference"] for r in later] == [r["reference"] for r in first]  # the reference is frozen
    assert any(r["policy"] != r["reference"] for r in later)  # the trained policy says something else

    kto.detach()
    assert not any(isinstance(c, KTOGenerationCallback) for c in trainer.callback_handler.callbacks)


def test_peft_reference_is_the_base_model_and_the_adapter_survives(model, tokenizer, rows, tmp_path):
    base = copy.deepcopy(model)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    kto, trainer = kto_trainer(
        peft_model,
        tokenizer,
        rows,
        tmp_path,
        eval_rows=_short_prompt_rows(rows, tokenizer),
        # the adapter starts non-zero, so "auto" would copy it as the reference; ask for the base model
        kto_kwargs={"generate_during_eval": True, "generate_num_prompts": 2, "generate_max_new_tokens": 6,
                    "peft_reference": "base"},
    )
    kto.attach(trainer)
    trainer.evaluate()
    generated = _read(tmp_path / GENERATIONS_FILE)
    prompts = distinct_prompts(trainer.eval_dataset, 2)
    # called in training mode (e.g. from a callback mid-epoch): everything comes back exactly as found
    trainer.model.train()
    before = _state(trainer.model)
    generation = next(c for c in trainer.callback_handler.callbacks if isinstance(c, KTOGenerationCallback))
    again = generation.generate(prompts, step=0)
    assert again == [{k: v for k, v in r.items() if k != "split"} for r in generated] and again
    assert _state(trainer.model) == before
    assert trainer.model.active_adapter == "default"
    lora_layers = [m for m in trainer.model.modules() if isinstance(m, BaseTunerLayer)]
    assert lora_layers and not any(m.disable_adapters for m in lora_layers)
    base_ids = greedy_completions(base.eval(), prompts, tokenizer, 6)
    adapter_ids = greedy_completions(trainer.model.eval(), prompts, tokenizer, 6)
    assert [r["reference"] for r in generated] == [
        tokenizer.decode(i, skip_special_tokens=True) for i in base_ids
    ]
    assert [r["policy"] for r in generated] == [
        tokenizer.decode(i, skip_special_tokens=True) for i in adapter_ids
    ]
    assert generated[0]["policy"] != generated[0]["reference"]  # the (non-zero) adapter is on for the policy


def _manual_greedy(model, prompt, steps, eos_id):
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt == eos_id:
                break
    return out


def test_greedy_completions_match_a_manual_argmax_loop_with_left_padding(model, tokenizer):
    model.eval()
    prompts = [
        [1, 40, 41, 42, 43, 44, 45],
        [1, 50, 51],
        [1, 60, 61, 62, 63],
    ]  # different lengths: left padding
    got = greedy_completions(model, prompts, tokenizer, max_new_tokens=5)
    assert got == [_manual_greedy(model, p, 5, tokenizer.eos_token_id) for p in prompts]


def test_greedy_completions_stop_after_eos(model, tok):
    model.eval()
    prompt = [1, 40, 41]
    free = _manual_greedy(model, prompt, 6, eos_id=None)
    tok.eos_token = tok.convert_ids_to_tokens(free[2])  # make the third generated token an EOS
    stops = {free[2], model.generation_config.eos_token_id}  # the model's own EOS ids count too
    cut = next(i for i, t in enumerate(free) if t in stops)
    assert greedy_completions(model, [prompt], tok, max_new_tokens=6) == [free[: cut + 1]]


def test_distinct_prompts_keeps_order_and_stops_early():
    data = [{"prompt_ids": [1, 2]}, {"prompt_ids": [1, 2]}, {"prompt_ids": [3]}, {"prompt_ids": [4]}]
    assert distinct_prompts(data, 2) == [[1, 2], [3]]
    assert distinct_prompts(data, 10) == [[1, 2], [3], [4]]
    with pytest.raises(KeyError, match="prompt_ids"):
        distinct_prompts([{"prompt": "hi"}], 1)


class FakeTable:
    def __init__(self, columns, data):
        self.columns, self.data = columns, data


def test_generation_table():
    rows = [{"step": 3, "prompt": "p", "policy": "a", "reference": "b"}]
    table = generation_table(rows, types.SimpleNamespace(Table=FakeTable))
    assert table.columns == ["step", "prompt", "policy", "reference"]
    assert table.data == [[3, "p", "a", "b"]]


def test_table_keys_follow_the_wandb_layout():
    assert table_key("eval") == "eval/generations"
    assert table_key("eval_held_out") == "eval/held_out_generations"
    assert table_key("test") == "test/generations"


def test_log_to_wandb_uses_the_active_run(monkeypatch):
    logged = []
    run = types.SimpleNamespace(log=lambda data: logged.append(data))
    fake = types.ModuleType("wandb")
    fake.Table, fake.run = FakeTable, run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object() if name == "wandb" else None)
    rows = [{"step": 2, "prompt": "p", "policy": "a", "reference": "b"}]

    assert not log_to_wandb(rows, "eval", types.SimpleNamespace(report_to=["tensorboard"]), step=2)
    assert logged == []
    assert log_to_wandb(rows, "eval", types.SimpleNamespace(report_to=["wandb"]), step=2)
    (entry,) = logged
    assert entry["train/global_step"] == 2
    assert entry["eval/generations"].data == [[2, "p", "a", "b"]]
    fake.run = None  # no active run: nothing logged, no error
    assert not log_to_wandb(rows, "eval", types.SimpleNamespace(report_to=["wandb"]), step=2)


def test_refused_under_fsdp(model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, kto_kwargs={"generate_during_eval": True})
    trainer.is_fsdp_enabled = True  # what Trainer.__init__ sets under FSDP (which needs GPUs to run)
    with pytest.raises(NotImplementedError, match="generate_during_eval is not supported under FSDP"):
        kto.attach(trainer)
    assert trainer.compute_loss_func is None


@pytest.mark.parametrize("field", ["generate_num_prompts", "generate_max_new_tokens"])
def test_config_validation(field):
    with pytest.raises(ValueError, match=f"KTOConfig.{field} must be a positive integer"):
        KTOConfig(**{field: 0})


def test_each_evaluation_logs_one_line_with_counts_time_and_destinations(model, tokenizer, rows, tmp_path, caplog):
    import logging
    import re

    kto, trainer = kto_trainer(
        model, tokenizer, rows, tmp_path, eval_rows=_short_prompt_rows(rows, tokenizer),
        kto_kwargs={"generate_during_eval": True, "generate_num_prompts": 2, "generate_max_new_tokens": 3},
    )
    kto.attach(trainer)
    with caplog.at_level(logging.INFO, logger="kto_plugin"):
        trainer.evaluate()
    lines = [r.getMessage() for r in caplog.records if "generations at step" in r.getMessage()]
    path = re.escape(str(tmp_path / GENERATIONS_FILE))
    assert len(lines) == 1
    # report_to="none": the JSONL file only, no tracker named
    assert re.fullmatch(r"kto_plugin: eval generations at step 0: 2 prompts x \(policy, reference\), up to 3 new "
                        rf"tokens, in \d+\.\d s; appended to {path}", lines[0]), lines[0]
