"""Models and adapters as the documented KTOTrainer API takes them: batch layout options (label_pad_token_id,
padding_value), a reference named by path, model_adapter_name, peft_config, encoder-decoder models.

Expected values come from plain-PyTorch references (tests/reference_impl.py) run on the unpadded rows.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import args, kto_trainer
from reference_impl import naive_completion_logps
from transformers import Trainer

from kto_plugin.reference import ReferenceSyncCallback
from kto_plugin import KTOConfig, KTOPlugin


@pytest.fixture
def short_rows(rows, tokenizer):
    """Eight rows (four pairs, labels alternating) whose prompt fits in 120 tokens, for fast runs."""
    pairs = [rows[i : i + 2] for i in range(0, len(rows), 2)]
    short = [p for p in pairs if len(tokenizer(p[0]["prompt"])["input_ids"]) < 120]
    return [r for p in short[:4] for r in p]


def _naive_eval_logps(model, dataset):
    """Mean summed completion log-prob of the chosen and of the rejected rows, one unpadded row at a time."""
    chosen, rejected = [], []
    with torch.no_grad():
        for row in dataset:
            ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
            mask = torch.tensor([[0] * len(row["prompt_ids"]) + [1] * len(row["completion_ids"])])
            value = naive_completion_logps(model(input_ids=ids).logits, ids, mask).item()
            (chosen if row["label"] else rejected).append(value)
    return sum(chosen) / len(chosen), sum(rejected) / len(rejected)


def test_label_pad_token_id_and_padding_value_leave_the_numbers_unchanged(model, tokenizer, short_rows, tmp_path):
    eval_rows = short_rows[:4]
    pad_value = tokenizer.eos_token_id + 3  # a real token id, unlike the tokenizer's pad: only the mask hides it
    kto, trainer = kto_trainer(
        model, tokenizer, short_rows, tmp_path, eval_rows=eval_rows,
        kto_kwargs={"label_pad_token_id": -7, "padding_value": pad_value, "max_length": 256},
    )
    kto.attach(trainer)
    batch = kto.collator([trainer.eval_dataset[i] for i in range(4)])
    labels = batch["labels"]
    assert (labels["completion_labels"] == -7).any() and not (labels["completion_labels"] == -100).any()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == pad_value).all()
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths, so padding is exercised
    metrics = trainer.evaluate()
    chosen, rejected = _naive_eval_logps(model, trainer.eval_dataset)
    assert metrics["eval_logps/chosen"] == pytest.approx(chosen, rel=1e-4)
    assert metrics["eval_logps/rejected"] == pytest.approx(rejected, rel=1e-4)


def test_padding_value_outside_the_vocabulary_is_refused_at_attach(model, tokenizer, short_rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, short_rows, tmp_path, kto_kwargs={"padding_value": 10_000})
    with pytest.raises(ValueError, match="padding_value=10000 is not a token id"):
        kto.attach(trainer)
    assert trainer.compute_loss_func is None  # nothing changed


# --- ref_model given by name or path ---


@pytest.fixture
def saved_other(tokenizer, tmp_path):
    """A different tiny model (another seed) saved to disk: the reference, named by its path."""
    from kto_plugin.demo import build_tiny_model

    other = build_tiny_model(len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, seed=2)
    path = tmp_path / "ref"
    other.save_pretrained(path)
    return other, str(path)


def test_ref_model_path_is_loaded_and_used_as_the_reference(model, tokenizer, short_rows, saved_other, tmp_path):
    other, path = saved_other
    kto, trainer = kto_trainer(
        model, tokenizer, short_rows, tmp_path / "out", eval_rows=short_rows[:4], kto_kwargs={"max_length": 256},
        plugin_kwargs={"ref_model": path},
    )
    kto.attach(trainer)
    ref = trainer.accelerator.unwrap_model(kto.reference.ref_model)
    assert ref is not other and ref.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), other.state_dict().values()))
    assert not any(p.requires_grad for p in ref.parameters())
    metrics = trainer.evaluate()
    policy_chosen, policy_rejected = _naive_eval_logps(model, trainer.eval_dataset)
    ref_chosen, ref_rejected = _naive_eval_logps(other, trainer.eval_dataset)
    beta = kto.config.beta
    # policy and reference differ, so the rewards are not zero: the loaded model really is the reference
    assert abs(policy_chosen - ref_chosen) > 0.3
    assert metrics["eval_rewards/chosen"] == pytest.approx(beta * (policy_chosen - ref_chosen), rel=1e-3)
    assert metrics["eval_rewards/rejected"] == pytest.approx(beta * (policy_rejected - ref_rejected), rel=1e-3)


@pytest.mark.parametrize(
    "kto_kwargs,expected",
    [
        ({}, torch.float32),  # the policy's dtype, as TRL 1.16 builds its reference
        ({"ref_model_init_kwargs": {"torch_dtype": "bfloat16"}}, torch.bfloat16),  # documented spelling
        ({"ref_model_init_kwargs": '{"dtype": "float16"}'}, torch.float16),  # JSON string, as from the CLI
        ({"model_init_kwargs": {"dtype": "float16"}}, torch.float16),  # no ref kwargs: model_init_kwargs
    ],
)
def test_ref_model_init_kwargs(kto_kwargs, expected, model, tokenizer, short_rows, saved_other, tmp_path):
    other, path = saved_other
    kto, trainer = kto_trainer(model, tokenizer, short_rows, tmp_path / "out",
                               kto_kwargs={"max_length": 256, **kto_kwargs}, plugin_kwargs={"ref_model": path})
    kto.attach(trainer)
    assert trainer.accelerator.unwrap_model(kto.reference.ref_model).dtype == expected


def test_ref_model_path_that_does_not_exist_is_refused_before_any_change(model, tokenizer, short_rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, short_rows, tmp_path,
                               plugin_kwargs={"ref_model": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="ref_model=.*missing.* could not be loaded"):
        kto.attach(trainer)
    assert trainer.compute_loss_func is None and kto.trainer is None


# --- model_adapter_name with ref_adapter_name ---


@pytest.fixture
def three_adapters(base_model):
    """A PeftModel with three non-zero LoRA adapters: "default" (active at construction), "sft_ref", "new"."""
    from reference_cases import lora_config, peft_policy

    model = peft_policy(base_model, trained=True, seed=5)
    for seed, name in ((6, "sft_ref"), (7, "new")):
        torch.manual_seed(seed)
        model.add_adapter(name, lora_config(init=False))
    assert model.active_adapter == "default"
    return model


def _adapter_state(model, name):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{name}." in n}


def _with_adapter(model, name):
    twin = copy.deepcopy(model)
    twin.set_adapter(name)
    return twin


def test_model_adapter_name_trains_that_adapter_against_the_named_reference(
    three_adapters, tokenizer, short_rows, tmp_path
):
    model = three_adapters
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {name: _adapter_state(model, name) for name in ("default", "sft_ref", "new")}
    kto, trainer = kto_trainer(
        model, tokenizer, short_rows, tmp_path, eval_rows=short_rows[:4],
        kto_kwargs={"max_length": 256, "model_adapter_name": "new", "ref_adapter_name": "sft_ref"},
        ddp_find_unused_parameters=False,
    )
    kto.attach(trainer)
    assert model.active_adapter == "new"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(before["new"])
    assert kto.reference.mode == "named_adapter" and kto.reference.ref_adapter_name == "sft_ref"

    metrics = trainer.evaluate()
    policy_chosen, policy_rejected = _naive_eval_logps(_with_adapter(model, "new"), trainer.eval_dataset)
    ref_chosen, ref_rejected = _naive_eval_logps(_with_adapter(model, "sft_ref"), trainer.eval_dataset)
    other_chosen, _ = _naive_eval_logps(_with_adapter(model, "default"), trainer.eval_dataset)
    beta = kto.config.beta
    assert abs(policy_chosen - ref_chosen) > 0.1 and abs(other_chosen - policy_chosen) > 0.1
    assert metrics["eval_logps/chosen"] == pytest.approx(policy_chosen, rel=1e-4)
    assert metrics["eval_rewards/chosen"] == pytest.approx(beta * (policy_chosen - ref_chosen), rel=1e-3)
    assert metrics["eval_rewards/rejected"] == pytest.approx(beta * (policy_rejected - ref_rejected), rel=1e-3)

    trainer.train()
    after = {name: _adapter_state(model, name) for name in ("default", "sft_ref", "new")}
    assert any(not torch.equal(before["new"][n], after["new"][n]) for n in before["new"])
    for name in ("default", "sft_ref"):
        assert all(torch.equal(before[name][n], after[name][n]) for n in before[name]), name
    assert model.active_adapter == "new"  # switched back after every reference pass

    kto.detach()
    assert model.active_adapter == "default"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before


@pytest.mark.parametrize(
    "plugin_kwargs,match",
    [
        ({"model_adapter_name": "missing"}, "model_adapter_name='missing' is not an adapter of the model"),
        ({"model_adapter_name": "new", "ref_adapter_name": "new"}, "both 'new'"),
        ({"model_adapter_name": "sft_ref", "ref_adapter_name": "new"}, None),  # fine: only checks it attaches
    ],
)
def test_model_adapter_name_refusals(plugin_kwargs, match, three_adapters, tokenizer, short_rows, tmp_path):
    def build():
        return kto_trainer(three_adapters, tokenizer, short_rows, tmp_path, plugin_kwargs=plugin_kwargs)

    if match is None:
        kto, trainer = build()
        kto.attach(trainer)
        assert three_adapters.active_adapter == "sft_ref"
        return
    with pytest.raises(ValueError, match=match):
        kto, trainer = build()
        kto.attach(trainer)
    assert three_adapters.active_adapter == "default"


def test_model_adapter_name_needs_adapters(model, tokenizer, short_rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, short_rows, tmp_path, kto_kwargs={"model_adapter_name": "default"})
    with pytest.raises(ValueError, match="model_adapter_name='default' needs a model with PEFT adapters"):
        kto.attach(trainer)
    assert trainer.compute_loss_func is None


# --- peft_config: the plugin wraps the model ---


def _lora(**kw):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, **kw)


@pytest.mark.slow
def test_peft_config_wrapped_at_attach_matches_trl(base_model, tokenizer, rows, tmp_path):
    from reference_cases import lora_config, parity_args, parity_problems, run_ours, run_trl, train_and_evaluate

    kto_kwargs = dict(beta=0.1, max_length=128)
    a = parity_args(str(tmp_path), lora=True, max_steps=3)
    eval_rows = rows[-8:]
    trl = run_trl(copy.deepcopy(base_model), rows, tokenizer, kto_kwargs, a, eval_rows, peft_config=lora_config())
    policy = copy.deepcopy(base_model)
    ours, kto = run_ours(policy, rows, tokenizer, kto_kwargs, a, eval_rows, peft_config=lora_config())
    assert ours.model is ours.model_wrapped and ours.model.get_base_model() is policy
    assert ours.model.peft_config["default"].r == lora_config().r
    assert kto.reference.mode == "null_adapter"
    ours.model.load_state_dict(trl.model.state_dict())  # the same random lora_A on both sides
    train_and_evaluate(trl, ours)
    assert parity_problems(trl.state.log_history, ours.state.log_history) == []
    assert max(abs(e.get("rewards/chosen", 0.0)) for e in ours.state.log_history) > 0.01
    kto.detach()
    assert ours.model.get_base_model() is policy  # the trained adapter stays: it is the result


def test_wrap_model_before_the_trainer(model, tokenizer, short_rows, tmp_path):
    from peft import PeftModel

    kto = KTOPlugin(KTOConfig(max_length=256), tokenizer=tokenizer, peft_config=_lora(init_lora_weights=False))
    wrapped = kto.wrap_model(model)
    assert isinstance(wrapped, PeftModel) and kto.wrap_model(wrapped) is wrapped  # idempotent
    trainer = Trainer(model=wrapped, args=args(tmp_path), train_dataset=kto.prepare_dataset(short_rows),
                      eval_dataset=kto.prepare_dataset(short_rows[:4], name="eval"), data_collator=kto.collator)
    kto.attach(trainer)
    assert trainer.model is wrapped
    # a non-zero initial adapter still gets the base model as reference: TRL's null reference for peft_config
    assert kto.reference.mode == "null_adapter"
    metrics = trainer.evaluate()
    policy_chosen, _ = _naive_eval_logps(wrapped, trainer.eval_dataset)
    with wrapped.disable_adapter():
        base_chosen, _ = _naive_eval_logps(wrapped, trainer.eval_dataset)
    assert abs(policy_chosen - base_chosen) > 0.1
    assert metrics["eval_rewards/chosen"] == pytest.approx(0.1 * (policy_chosen - base_chosen), rel=1e-3)


def test_wrap_model_loads_a_name_with_model_init_kwargs(base_model, tokenizer, tmp_path):
    base_model.save_pretrained(tmp_path / "base")
    kto = KTOPlugin(KTOConfig(model_init_kwargs={"torch_dtype": "bfloat16"}), tokenizer=tokenizer,
                    peft_config=_lora())
    wrapped = kto.wrap_model(str(tmp_path / "base"))
    assert wrapped.get_base_model().dtype == torch.bfloat16 and "default" in wrapped.peft_config
    plain = KTOPlugin(KTOConfig(), tokenizer=tokenizer).wrap_model(str(tmp_path / "base"))
    assert type(plain).__name__ == type(base_model).__name__  # no peft_config: loaded, not wrapped


def test_peft_config_refusals(model, tokenizer, short_rows, tmp_path):
    from reference_cases import peft_policy

    with pytest.raises(TypeError, match="peft_config must be a peft.PeftConfig"):
        KTOPlugin(KTOConfig(), tokenizer=tokenizer, peft_config={"r": 4})
    kto = KTOPlugin(KTOConfig(max_length=256), tokenizer=tokenizer, peft_config=_lora())
    data = kto.prepare_dataset(short_rows)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=data, data_collator=kto.collator,
                      optimizers=(optimizer, None))
    with pytest.raises(ValueError, match="already has an optimizer"):
        kto.attach(trainer)
    assert trainer.model is model
    trainer = Trainer(model_init=lambda: copy.deepcopy(model), args=args(tmp_path), train_dataset=data,
                      data_collator=kto.collator)
    with pytest.raises(ValueError, match="model_init=lambda: kto.wrap_model"):
        kto.attach(trainer)
    with pytest.raises(ValueError, match="already has PEFT adapters"):
        kto.wrap_model(peft_policy(model, trained=False))


# --- vision-language models: image rows need a processor (the rest is in test_vision.py) ---


@pytest.mark.parametrize("column", ["images", "image"])
def test_image_rows_without_a_processor_are_refused_at_prepare_dataset(column, tokenizer, short_rows):
    from datasets import Dataset

    kto = KTOPlugin(KTOConfig(), tokenizer=tokenizer)
    rows = [dict(r, **{column: None}) for r in short_rows]
    for data in (rows, Dataset.from_list(rows)):
        with pytest.raises(ValueError, match=f"image column '{column}'.*KTOPlugin\\(config, tokenizer=processor\\)"):
            kto.prepare_dataset(data)


def test_model_adapter_name_with_adapters_loaded_by_transformers(base_model, tokenizer, short_rows, tmp_path):
    """model.load_adapter(...) twice on a PreTrainedModel (no PeftModel): the named adapter trains."""
    from reference_cases import peft_policy

    from kto_plugin.reference._adapters import AdapterHost

    paths = {}
    for seed, name in ((5, "sft"), (6, "ref")):
        paths[name] = str(tmp_path / name)
        peft_policy(base_model, trained=True, seed=seed).save_pretrained(paths[name])
    model = copy.deepcopy(base_model)
    model.load_adapter(paths["sft"], adapter_name="sft", is_trainable=True)
    model.load_adapter(paths["ref"], adapter_name="ref")  # loaded last: the active one
    host = AdapterHost.of(model)
    assert host.kind == "transformers" and host.active == ["ref"]
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    kto, trainer = kto_trainer(model, tokenizer, short_rows, tmp_path / "out",
                               kto_kwargs={"max_length": 256}, plugin_kwargs={"model_adapter_name": "sft"})
    kto.attach(trainer)
    assert host.active == ["sft"] and kto.reference.ref_adapter_name == "ref"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(_adapter_state(model, "sft"))
    before = _adapter_state(model, "ref")
    trainer.train()
    assert host.active == ["sft"]
    assert all(torch.equal(before[n], p) for n, p in _adapter_state(model, "ref").items())
    kto.detach()
    assert host.active == ["ref"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before


def test_docs_peft_config_snippet_runs(model, tokenizer, short_rows, tmp_path):
    import re
    from pathlib import Path

    from peft import PeftModel

    guide = (Path(__file__).resolve().parents[2] / "docs" / "models.md").read_text()
    snippet = re.search(r"\*\*`peft_config`: the plugin wraps the model.\*\*\n\n```python\n(.*?)```", guide, re.S)
    namespace = {"tokenizer": tokenizer, "model": model, "args": args(tmp_path, max_steps=1), "raw": short_rows,
                 "Trainer": Trainer, "KTOPlugin": KTOPlugin, "KTOConfig": KTOConfig}
    exec(compile(snippet.group(1), "docs/models.md", "exec"), namespace)
    trainer, kto = namespace["trainer"], namespace["kto"]
    assert isinstance(trainer.model, PeftModel) and kto.reference.mode == "null_adapter"
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(0.5, abs=1e-6)


def test_model_adapter_name_with_sync_mixes_the_trained_adapter_into_the_reference(
    three_adapters, tokenizer, short_rows, tmp_path
):
    """model_adapter_name + sync_ref_model: the reference adapter follows the adapter named for training, not the
    one active when the model was built; the third adapter is untouched."""
    from transformers import TrainerCallback

    model = three_adapters
    before = {name: _adapter_state(model, name) for name in ("default", "sft_ref", "new")}
    kto, trainer = kto_trainer(
        model, tokenizer, short_rows, tmp_path, max_steps=1,
        kto_kwargs={"max_length": 256, "model_adapter_name": "new", "ref_adapter_name": "sft_ref",
                    "sync_ref_model": True, "ref_model_sync_steps": 1, "ref_model_mixup_alpha": 0.5},
    )
    kto.attach(trainer)
    seen = {}

    class AfterSync(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.update({name: _adapter_state(model, name) for name in ("default", "sft_ref", "new")})

    trainer.add_callback(AfterSync())  # after the sync callback: sees the mixed reference
    trainer.train()
    assert _sync_callback(trainer).updates == 1
    assert all(torch.equal(before["default"][n], seen["default"][n]) for n in before["default"])
    new_after = {n.replace(".new.", ".sft_ref."): p for n, p in seen["new"].items()}
    assert set(new_after) == set(before["sft_ref"])
    assert any(not torch.equal(before["new"][n], seen["new"][n]) for n in before["new"])
    for n, ref0 in before["sft_ref"].items():  # TR-DPO soft update, computed independently
        torch.testing.assert_close(seen["sft_ref"][n], 0.5 * new_after[n] + 0.5 * ref0, rtol=0, atol=1e-7)


def _sync_callback(trainer):
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, ReferenceSyncCallback))


@pytest.fixture
def adapter_folder(base_model, tmp_path):
    """A base model folder and a folder with a trained LoRA adapter (B != 0) of it, saved alone."""
    from peft import LoraConfig, get_peft_model

    base_model.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(type(base_model).from_pretrained(tmp_path / "base"),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        return tmp_path / "adapter", peft_model.eval()(input_ids=ids).logits, base_model(input_ids=ids).logits, ids


def test_an_adapter_folder_loads_the_base_with_its_adapter(adapter_folder):
    """The policy: a PeftModel whose adapter alone trains; a reference: the adapter merged, a plain model."""
    from peft import PeftModel

    from kto_plugin.trainer._models import load_pretrained

    path, with_adapter, base_only, ids = adapter_folder
    assert not torch.allclose(with_adapter, base_only)  # the adapter changes the outputs
    policy = load_pretrained(path, None)
    assert isinstance(policy, PeftModel)
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == {
        n for n, _ in policy.named_parameters() if "lora_" in n}
    reference = load_pretrained(str(path), None, argument="ref_model")
    assert not isinstance(reference, PeftModel) and not hasattr(reference, "peft_config")
    with torch.no_grad():
        for model in (policy.eval(), reference.eval()):
            torch.testing.assert_close(model(input_ids=ids).logits, with_adapter, rtol=1e-5, atol=1e-5)
