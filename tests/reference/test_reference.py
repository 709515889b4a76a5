"""The reference-model manager: every way a user holds a reference, end to end against TRL 1.16; invariants
(the reference context never corrupts the policy); refusals before training.

Cases (numbers as in issue #4): 1 separate ref_model, 2 plain model with a frozen copy, 3 PEFT null reference,
4 a PeftModel whose adapter already has trained weights (frozen copy named "ref", as TRL), 5 a named reference
adapter, 6 adapters loaded by transformers' own PEFT integration. Case 7 (precomputed) is in
test_precompute.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import args, kto_trainer
from reference_cases import (
    integration_policy,
    lora_config,
    parity_args,
    parity_problems,
    peft_policy,
    run_ours,
    run_trl,
    state_of,
    train_and_evaluate,
)
from transformers import AutoModelForCausalLM, Trainer

from kto_plugin import KTOConfig, KTOPlugin
from kto_plugin.reference._adapters import AdapterHost
from kto_plugin.demo import build_tiny_model
from kto_plugin.reference._sharding import prepare_reference

KTO = dict(beta=0.1, max_length=128)


def _assert_parity(trl, ours, moved=0.05):
    assert trl.train_dataset["completion_ids"] == ours.train_dataset["completion_ids"]
    train_and_evaluate(trl, ours)
    expected, actual = trl.state.log_history, ours.state.log_history
    assert len(expected) == 8  # 6 steps, the train summary, the evaluation
    assert parity_problems(expected, actual) == []
    # the policy moved away from the reference, so the comparison is not of zeros
    assert max(abs(e.get("rewards/chosen", 0.0)) for e in actual) > moved


@pytest.fixture
def eval_rows(rows):
    return rows[-16:]


@pytest.fixture
def saved_base(base_model, tmp_path):
    """The tiny base saved to disk, so TRL can build its own reference from `config._name_or_path`."""
    path = tmp_path / "base"
    base_model.save_pretrained(path)
    return str(path)


@pytest.fixture
def trained_adapter_dir(base_model, tmp_path):
    """A LoRA adapter with non-zero weights on disk (stands for a loaded SFT adapter)."""
    path = tmp_path / "sft_adapter"
    peft_policy(base_model, trained=True).save_pretrained(path)
    return str(path)


# --- end-to-end, every case, against TRL 1.16 ---

pytestmark_slow = pytest.mark.slow


@pytestmark_slow
def test_case1_separate_ref_model_matches_trl(base_model, tokenizer, rows, eval_rows, tmp_path):
    other = build_tiny_model(len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, seed=2)
    a = parity_args(str(tmp_path), lora=False)
    trl = run_trl(
        copy.deepcopy(base_model), rows, tokenizer, KTO, a, eval_rows, ref_model=copy.deepcopy(other)
    )
    ref = copy.deepcopy(other)
    before = state_of(ref)
    ours, kto = run_ours(copy.deepcopy(base_model), rows, tokenizer, KTO, a, eval_rows, ref_model=ref)
    assert kto.reference.mode == "model" and kto.reference.why == "the given ref_model"
    _assert_parity(trl, ours)
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    assert not ref.training and all(not p.requires_grad and p.grad is None for p in ref.parameters())


@pytestmark_slow
def test_case2_plain_model_frozen_copy_matches_trl(saved_base, tokenizer, rows, eval_rows, tmp_path):
    a = parity_args(str(tmp_path / "out"), lora=False)
    # TRL builds its reference from the model's path; we copy the policy at attach()
    trl = run_trl(AutoModelForCausalLM.from_pretrained(saved_base), rows, tokenizer, KTO, a, eval_rows)
    assert trl.ref_model is not None
    ours, kto = run_ours(AutoModelForCausalLM.from_pretrained(saved_base), rows, tokenizer, KTO, a, eval_rows)
    assert kto.reference.why == "a frozen copy of the initial policy"
    _assert_parity(trl, ours)


@pytestmark_slow
def test_case3_peft_null_reference_matches_trl(base_model, tokenizer, rows, eval_rows, tmp_path):
    policy = peft_policy(base_model, trained=False)
    a = parity_args(str(tmp_path), lora=True)
    trl = run_trl(copy.deepcopy(base_model), rows, tokenizer, KTO, a, eval_rows, peft_config=lora_config())
    trl.model.load_state_dict(policy.state_dict())  # the same random lora_A on both sides
    ours, kto = run_ours(policy, rows, tokenizer, KTO, a, eval_rows)
    assert kto.reference.mode == "null_adapter" and kto.reference.ref_model is None
    assert AdapterHost.of(policy).names == ["default"]  # no second adapter, no second model
    _assert_parity(trl, ours)


@pytestmark_slow
@pytest.mark.parametrize("peft_reference", ["auto", "initial_adapter"])
def test_case4_pretrained_adapter_is_copied_like_trl(
    peft_reference, base_model, tokenizer, rows, eval_rows, tmp_path
):
    policy = peft_policy(base_model, trained=True)
    a = parity_args(str(tmp_path), lora=True)
    trl = run_trl(copy.deepcopy(policy), rows, tokenizer, KTO, a, eval_rows)  # TRL adds a frozen copy "ref"
    assert "ref" in trl.model.peft_config
    ours, kto = run_ours(policy, rows, tokenizer, {**KTO, "peft_reference": peft_reference}, a, eval_rows)
    assert kto.reference.mode == "named_adapter" and kto.reference.created_adapter == "ref"
    _assert_parity(trl, ours)


@pytestmark_slow
@pytest.mark.parametrize("name", ["ref", "sft"])
def test_case5_named_reference_adapter_matches_trl(
    name, base_model, tokenizer, rows, eval_rows, trained_adapter_dir, tmp_path
):
    """A loaded adapter as the reference: by convention ("ref") or by ref_adapter_name; here it holds the
    policy adapter's initial weights, so TRL's case-4 run (its own copy) is the oracle."""
    policy = peft_policy(base_model, trained=True)
    policy.load_adapter(trained_adapter_dir, adapter_name=name)
    a = parity_args(str(tmp_path), lora=True)
    trl = run_trl(peft_policy(base_model, trained=True), rows, tokenizer, KTO, a, eval_rows)
    plugin_kwargs = {} if name == "ref" else {"ref_adapter_name": name}
    ours, kto = run_ours(policy, rows, tokenizer, KTO, a, eval_rows, **plugin_kwargs)
    assert kto.reference.mode == "named_adapter" and kto.reference.ref_adapter_name == name
    assert kto.reference.created_adapter is None
    _assert_parity(trl, ours)


@pytestmark_slow
def test_case6_transformers_integration_adapter_initial_policy(
    base_model, tokenizer, rows, eval_rows, trained_adapter_dir, tmp_path
):
    """model.load_adapter(...) on a PreTrainedModel, no PeftModel: the reference is the initial policy (a
    frozen copy of the loaded adapter). Same weights as a PeftModel, so TRL's case-4 run is the oracle."""
    policy = integration_policy(base_model, trained_adapter_dir)
    assert AdapterHost.of(policy).kind == "transformers"
    a = parity_args(str(tmp_path), lora=True)
    trl = run_trl(peft_policy(base_model, trained=True), rows, tokenizer, KTO, a, eval_rows)
    ours, kto = run_ours(policy, rows, tokenizer, KTO, a, eval_rows)
    assert kto.reference.mode == "named_adapter" and kto.reference.created_adapter == "ref"
    _assert_parity(trl, ours)


@pytestmark_slow
def test_case6_integration_with_base_reference_matches_trl(
    saved_base, tokenizer, rows, eval_rows, trained_adapter_dir, tmp_path
):
    """TRL 1.16 treats an integration model as a plain model and loads its reference from the model's path,
    i.e. the bare base model: our peft_reference='base' is that choice, without a second model in memory."""
    a = parity_args(str(tmp_path / "out"), lora=True)
    trl_policy = AutoModelForCausalLM.from_pretrained(saved_base)
    trl_policy.load_adapter(trained_adapter_dir, is_trainable=True)
    trl = run_trl(trl_policy, rows, tokenizer, KTO, a, eval_rows)
    policy = AutoModelForCausalLM.from_pretrained(saved_base)
    policy.load_adapter(trained_adapter_dir, is_trainable=True)
    ours, kto = run_ours(policy, rows, tokenizer, {**KTO, "peft_reference": "base"}, a, eval_rows)
    assert kto.reference.mode == "null_adapter" and kto.reference.ref_model is None
    _assert_parity(trl, ours)


# --- invariants of the reference context (PEFT style) ---


def _second_adapter_dir(base_model, tmp_path):
    path = tmp_path / "other_adapter"
    peft_policy(base_model, trained=True, seed=7).save_pretrained(path)
    return str(path)


def _variant(variant, base_model, tmp_path):
    """(policy, plugin kwargs, KTOConfig kwargs, expected reference model) for one way of holding adapters."""
    sft_dir = tmp_path / "sft"
    peft_policy(base_model, trained=True).save_pretrained(sft_dir)
    initial = peft_policy(base_model, trained=True)  # what the policy is at attach
    if variant == "peft-null":
        return (
            peft_policy(base_model, trained=True),
            {},
            {"peft_reference": "base"},
            copy.deepcopy(base_model),
        )
    if variant == "peft-copy":
        return peft_policy(base_model, trained=True), {}, {}, initial
    if variant == "peft-named":
        policy = peft_policy(base_model, trained=True)
        policy.load_adapter(_second_adapter_dir(base_model, tmp_path), adapter_name="other")
        return policy, {"ref_adapter_name": "other"}, {}, peft_policy(base_model, trained=True, seed=7)
    if variant == "integration-null":
        return (
            integration_policy(base_model, str(sft_dir)),
            {},
            {"peft_reference": "base"},
            copy.deepcopy(base_model),
        )
    if variant == "integration-copy":
        return integration_policy(base_model, str(sft_dir)), {}, {}, initial
    if variant == "integration-named":
        policy = copy.deepcopy(base_model)
        policy.load_adapter(
            _second_adapter_dir(base_model, tmp_path), adapter_name="ref"
        )  # loaded first: inactive
        policy.load_adapter(str(sft_dir), adapter_name="default", is_trainable=True)
        return policy, {}, {}, peft_policy(base_model, trained=True, seed=7)
    raise AssertionError(variant)


VARIANTS = [
    "peft-null",
    "peft-copy",
    "peft-named",
    "integration-null",
    "integration-copy",
    "integration-named",
]


def _observe(model):
    host = AdapterHost.of(model)
    return (
        {n: p.requires_grad for n, p in model.named_parameters()},
        host.active,
        [(n, m.training) for n, m in model.named_modules()],
        [(layer, layer.disable_adapters) for layer in host.layers()],
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_context_invariants(variant, base_model, tokenizer, rows, tmp_path):
    policy, plugin_kwargs, config_kwargs, expected_model = _variant(variant, base_model, tmp_path)
    # custom freezing that peft's own switches would undo (they set requires_grad of a whole adapter)
    frozen = next(p for n, p in policy.named_parameters() if "lora_A" in n and p.requires_grad)
    frozen.requires_grad_(False)
    kto, trainer = kto_trainer(
        policy, tokenizer, rows, tmp_path, kto_kwargs=config_kwargs, plugin_kwargs=plugin_kwargs
    )
    kto.attach(trainer)
    batch = kto.collator([trainer.train_dataset[i] for i in range(4)])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    policy.train()  # as during training: the context must not change train/eval mode
    host = AdapterHost.of(policy)
    with torch.no_grad():  # a training step's worth of change to the policy's adapter (not to the reference)
        for param in host.parameters_of(host.active[0]).values():
            param.add_(0.05 * torch.randn_like(param))

    def logits(module):
        with torch.no_grad():
            return module(input_ids=ids, attention_mask=mask).logits

    expected_model.eval()
    reference_out = logits(expected_model)
    policy_out = logits(policy)
    assert not torch.allclose(policy_out, reference_out, atol=1e-4), "the adapter must change the output"
    before = _observe(policy)
    with kto.reference.activate(trainer) as module:
        inside = logits(module)
    assert torch.allclose(inside, reference_out, rtol=0, atol=1e-6)
    assert torch.equal(logits(policy), policy_out)
    assert _observe(policy) == before

    with pytest.raises(RuntimeError, match="body failed"):
        with kto.reference.activate(trainer):
            raise RuntimeError("body failed")
    assert _observe(policy) == before
    assert torch.equal(logits(policy), policy_out)
    assert not frozen.requires_grad


@pytest.mark.parametrize("variant", ["peft-null", "peft-copy", "peft-named", "integration-copy"])
def test_training_touches_only_trainable_policy_parameters(variant, base_model, tokenizer, rows, tmp_path):
    policy, plugin_kwargs, config_kwargs, _ = _variant(variant, base_model, tmp_path)
    kto, trainer = kto_trainer(
        policy,
        tokenizer,
        rows,
        tmp_path,
        kto_kwargs=config_kwargs,
        plugin_kwargs=plugin_kwargs,
        max_steps=3,
        learning_rate=1e-2,
    )
    kto.attach(trainer)
    host = AdapterHost.of(policy)
    ref_name = kto.reference.ref_adapter_name
    named = dict(policy.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    policy_adapter = set(host.parameters_of(host.active[0]))
    assert trainable == policy_adapter
    frozen_before = {n: p.detach().clone() for n, p in named.items() if n not in trainable}
    trainable_before = {n: named[n].detach().clone() for n in trainable}
    trainer.train()

    by_id = {id(p): n for n, p in policy.named_parameters()}
    optimized = {by_id[id(p)] for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == trainable
    assert {by_id[id(p)] for p in trainer.optimizer.state} <= trainable  # AdamW state only for the policy
    for n, p in policy.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"{n} changed"
            assert p.grad is None, f"{n} has a gradient"
    assert any(not torch.equal(named[n], trainable_before[n]) for n in trainable), (
        "the policy adapter trained"
    )
    if ref_name is not None:
        ref_params = host.parameters_of(ref_name)
        assert ref_params and not any(p.requires_grad for p in ref_params.values())
    assert {n: p.requires_grad for n, p in policy.named_parameters()} == {n: n in trainable for n in named}


def test_frozen_copy_and_given_model_stay_fixed(model, tokenizer, rows, tmp_path):
    kto, trainer = kto_trainer(model, tokenizer, rows, tmp_path, max_steps=2, learning_rate=1e-2)
    kto.attach(trainer)
    ref = kto.reference.ref_model
    initial = state_of(model)
    assert ref is not model and all(not p.requires_grad for p in ref.parameters()) and not ref.training
    trainer.train()
    assert not ref.training and all(p.grad is None for p in ref.parameters())
    assert all(torch.equal(initial[k], v) for k, v in ref.state_dict().items())
    assert any(not torch.equal(initial[k], v) for k, v in model.state_dict().items())


def test_detach_removes_the_copied_adapter_and_restores_everything(base_model, tokenizer, rows, tmp_path):
    policy = peft_policy(base_model, trained=True)
    kto, trainer = kto_trainer(policy, tokenizer, rows, tmp_path)
    state, flags = state_of(policy), {n: p.requires_grad for n, p in policy.named_parameters()}
    kto.attach(trainer)
    assert AdapterHost.of(policy).names == ["default", "ref"]
    kto.detach()
    assert AdapterHost.of(policy).names == ["default"] and policy.active_adapter == "default"
    assert state_of(policy).keys() == state.keys()
    assert {n: p.requires_grad for n, p in policy.named_parameters()} == flags
    kto.attach(trainer)  # and again, cleanly
    assert kto.reference.created_adapter == "ref"


def test_integration_copy_is_removed_on_detach(base_model, tokenizer, rows, tmp_path, trained_adapter_dir):
    policy = integration_policy(base_model, trained_adapter_dir)
    kto, trainer = kto_trainer(policy, tokenizer, rows, tmp_path)
    keys, flags = set(policy.state_dict()), {n: p.requires_grad for n, p in policy.named_parameters()}
    kto.attach(trainer)
    assert AdapterHost.of(policy).names == ["default", "ref"] and AdapterHost.of(policy).active == ["default"]
    kto.detach()
    assert AdapterHost.of(policy).names == ["default"] and AdapterHost.of(policy).active == ["default"]
    assert set(policy.state_dict()) == keys
    assert {n: p.requires_grad for n, p in policy.named_parameters()} == flags


# --- peft_reference='auto': is the adapter a no-op yet? ---


def test_noop_detection(base_model):
    assert AdapterHost.of(peft_policy(base_model, trained=False)).is_noop("default")[0] is True
    assert AdapterHost.of(peft_policy(base_model, trained=True)).is_noop("default")[0] is False
    from peft import LoraConfig, get_peft_model

    dora = get_peft_model(
        copy.deepcopy(base_model), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    )
    noop, reason = AdapterHost.of(dora).is_noop("default")
    assert noop is False and "DoRA" in reason
    fresh = peft_policy(base_model, trained=False)
    with torch.no_grad():  # one trained weight is enough
        next(p for n, p in fresh.named_parameters() if "lora_B" in n).add_(0.1)
    assert AdapterHost.of(fresh).is_noop("default")[0] is False


def test_auto_uses_the_base_model_for_a_fresh_adapter(base_model, tokenizer, rows, tmp_path):
    policy = peft_policy(base_model, trained=False)
    kto, trainer = kto_trainer(policy, tokenizer, rows, tmp_path)
    kto.attach(trainer)
    assert kto.reference.mode == "null_adapter" and AdapterHost.of(policy).names == ["default"]


# --- refusals, before any training step ---


def _refused(policy, tokenizer, rows, tmp_path, match, kto_kwargs=None, **plugin_kwargs):
    kto, trainer = kto_trainer(
        policy, tokenizer, rows, tmp_path, kto_kwargs=kto_kwargs, plugin_kwargs=plugin_kwargs
    )
    with pytest.raises(ValueError, match=match):
        kto.attach(trainer)
    assert kto.trainer is None and trainer.compute_loss_func is None
    return trainer


def test_refuses_merged_adapters(base_model, tokenizer, rows, tmp_path):
    policy = peft_policy(base_model, trained=True)
    policy.merge_adapter()
    _refused(policy, tokenizer, rows, tmp_path, r"\['default'\] are merged .*unmerge_adapter\(\)")


@pytest.mark.parametrize("peft_reference", ["auto", "base", "initial_adapter"])
def test_refuses_adapter_bias_without_ref_model(peft_reference, base_model, tokenizer, rows, tmp_path):
    policy = peft_policy(base_model, trained=False, bias="lora_only")
    _refused(
        policy,
        tokenizer,
        rows,
        tmp_path,
        "bias='lora_only'.*does not give the base model back",
        kto_kwargs={"peft_reference": peft_reference},
    )
    # a separate reference model is a correct reference for such an adapter
    kto, trainer = kto_trainer(
        policy, tokenizer, rows, tmp_path, plugin_kwargs={"ref_model": copy.deepcopy(policy)}
    )
    kto.attach(trainer)
    assert kto.reference.mode == "model"


def test_refuses_an_unknown_ref_adapter_name_listing_the_known(base_model, tokenizer, rows, tmp_path):
    _refused(
        peft_policy(base_model, trained=True),
        tokenizer,
        rows,
        tmp_path,
        r"ref_adapter_name='reff' is not an adapter of the model; it has \['default'\]",
        ref_adapter_name="reff",
    )


def test_refuses_the_active_adapter_as_reference(base_model, tokenizer, rows, tmp_path):
    _refused(
        peft_policy(base_model, trained=True),
        tokenizer,
        rows,
        tmp_path,
        "is the policy's active adapter",
        ref_adapter_name="default",
    )


def test_refuses_ref_model_that_is_the_policy(model, tokenizer, rows, tmp_path):
    _refused(model, tokenizer, rows, tmp_path, "ref_model is the policy model itself", ref_model=model)


def test_refuses_ref_model_sharing_weights_with_the_policy(model, tokenizer, rows, tmp_path):
    shallow = copy.copy(model)  # a new object whose modules are the policy's
    _refused(
        model, tokenizer, rows, tmp_path, "shares .* parameter tensors with the policy", ref_model=shallow
    )


def test_refuses_a_reference_with_another_vocabulary(model, tokenizer, rows, tmp_path):
    other = build_tiny_model(len(tokenizer) + 8, hidden_size=32, num_layers=2, num_heads=4, seed=3)
    _refused(
        model,
        tokenizer,
        rows,
        tmp_path,
        r"vocabulary \(520 logits\) differs from the policy's \(512\)",
        ref_model=other,
    )


def test_refuses_initial_adapter_when_ref_exists(base_model, tokenizer, rows, tmp_path, trained_adapter_dir):
    policy = peft_policy(base_model, trained=True)
    policy.load_adapter(trained_adapter_dir, adapter_name="ref")
    _refused(
        policy,
        tokenizer,
        rows,
        tmp_path,
        "already has an adapter named 'ref'",
        kto_kwargs={"peft_reference": "initial_adapter"},
    )


def test_peft_reference_is_validated():
    with pytest.raises(ValueError, match="peft_reference must be one of"):
        KTOConfig(peft_reference="adapter")


def test_ref_adapter_name_needs_adapters(model, tokenizer, rows, tmp_path):
    _refused(model, tokenizer, rows, tmp_path, "needs a model with PEFT adapters", ref_adapter_name="ref")


# --- preparation for distributed set-ups (what runs without GPUs) ---


class _Stub:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_deepspeed_zero2_reference_is_a_full_copy_in_the_deepspeed_dtype(model):
    plugin = _Stub(
        zero_stage=2, deepspeed_config={"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}
    )
    accelerator = _Stub(state=_Stub(deepspeed_plugin=plugin), device=torch.device("cpu"))
    trainer = _Stub(is_deepspeed_enabled=True, is_fsdp_enabled=False, accelerator=accelerator)
    ref = prepare_reference(trainer, model.train())
    assert ref is model and not ref.training
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}


def test_plain_reference_is_prepared_by_accelerate_in_eval_mode(model, tokenizer, rows, tmp_path):
    trainer = Trainer(model=copy.deepcopy(model), args=args(tmp_path))
    ref = prepare_reference(trainer, model)
    assert ref is model
    assert ref in trainer.accelerator._models and not isinstance(
        ref, torch.nn.parallel.DistributedDataParallel
    )


def test_plugin_ref_model_argument_conflicts(model, tokenizer, rows, tmp_path):
    kto = KTOPlugin(
        KTOConfig(max_length=96), tokenizer=tokenizer, ref_model=copy.deepcopy(model), ref_adapter_name="ref"
    )
    trainer = Trainer(
        model=model, args=args(tmp_path), train_dataset=kto.prepare_dataset(rows), data_collator=kto.collator
    )
    with pytest.raises(ValueError, match="either ref_model or ref_adapter_name"):
        kto.attach(trainer)
