"""Exact resume: 4 steps straight == 2 steps, checkpoint, a fresh trainer resumed for steps 3-4.

The reference for every comparison is the uninterrupted run of the same stock Trainer (same seed, same data,
same checkpointing): the resumed run must end with bit-identical weights and log bit-identical KTO metrics for
steps 3-4, also when a logging interval spans the checkpoint (`logging_steps=4`, save at 2).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import KTO_KEYS, assert_same_weights, kto_trainer, logged, train_run
from reference_cases import lora_config
from peft import get_peft_model

from family_task import build_task_tokenizer, kto_rows
from kto_plugin import hookimpl
from kto_plugin.demo import build_tiny_model


def _resume_case(make_model, tokenizer, rows, tmp_path, kto_kwargs=None, **overrides):
    """(uninterrupted trainer, resumed trainer, resumed plugin)."""
    _, straight = train_run(make_model(), tokenizer, rows, tmp_path / "straight", kto_kwargs=kto_kwargs, **overrides)
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert checkpoint.is_dir()
    kto, resumed = train_run(make_model(), tokenizer, rows, tmp_path / "resumed", resume=str(checkpoint),
                          kto_kwargs=kto_kwargs, **overrides)
    return straight, resumed, kto


@pytest.mark.slow
def test_resume_full_finetune_is_exact(base_model, tokenizer, rows, tmp_path):
    straight, resumed, kto = _resume_case(lambda: copy.deepcopy(base_model), tokenizer, rows[:16], tmp_path)
    assert_same_weights(straight.model, resumed.model)
    assert_same_weights(kto.reference.ref_model, base_model)  # the initial policy, not the step-2 weights
    want = logged(straight, {3, 4}, KTO_KEYS + ("loss", "grad_norm", "learning_rate"))
    assert set(want) == {3, 4} and all(set(KTO_KEYS) <= set(v) for v in want.values())
    assert logged(resumed, {3, 4}, KTO_KEYS + ("loss", "grad_norm", "learning_rate")) == want


@pytest.mark.slow
def test_resume_mid_logging_interval_logs_the_same_averages(base_model, tokenizer, rows, tmp_path):
    """logging_steps=4 with the checkpoint at 2: the step-4 KTO metrics average steps 1-4 in both runs. An
    evaluation at step 2, just before the save, takes only its own metrics."""
    straight, resumed, _ = _resume_case(lambda: copy.deepcopy(base_model), tokenizer, rows[:16], tmp_path,
                                        logging_steps=4, eval_rows=rows[16:24], eval_strategy="steps",
                                        eval_steps=2)
    assert_same_weights(straight.model, resumed.model)
    want = logged(straight, {4}, KTO_KEYS)
    assert set(want[4]) == set(KTO_KEYS)
    assert logged(resumed, {4}, KTO_KEYS) == want
    eval_keys = ("eval_kl", "eval_rewards/chosen", "eval_rewards/margins", "eval_loss")
    def evals(trainer):
        return {e["step"]: {k: e[k] for k in eval_keys} for e in trainer.state.log_history if "eval_kl" in e}

    assert set(evals(straight)) == {2, 4}
    assert evals(resumed) == evals(straight)  # step 2's is the checkpoint's log history, step 4's recomputed
    # the checkpoint carried steps 1-2's sums: without them step 4 would average steps 3-4 only
    saved = json.loads((tmp_path / "straight" / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["kto_plugin"]["metrics"]["counts"]["train"]["kl"] == 2


def _lora(base_model):
    torch.manual_seed(5)
    return get_peft_model(copy.deepcopy(base_model), lora_config())


@pytest.mark.slow
def test_resume_lora_null_reference_is_exact(base_model, tokenizer, rows, tmp_path):
    straight, resumed, kto = _resume_case(lambda: _lora(base_model), tokenizer, rows[:16], tmp_path,
                                          learning_rate=0.5, logging_steps=3)
    assert kto.reference.mode == "null_adapter"
    assert (tmp_path / "straight" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert_same_weights(straight.model, resumed.model)
    want = logged(straight, {3, 4}, KTO_KEYS)
    assert want[3]["rewards/margins"] != 0  # the adapter moved: the comparison is not between zeros
    assert logged(resumed, {3, 4}, KTO_KEYS) == want


@pytest.mark.slow
def test_resume_with_gradient_accumulation_is_exact(base_model, tokenizer, rows, tmp_path):
    straight, resumed, _ = _resume_case(lambda: copy.deepcopy(base_model), tokenizer, rows[:16], tmp_path,
                                        per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert_same_weights(straight.model, resumed.model)
    want = logged(straight, {3, 4}, KTO_KEYS + ("loss", "grad_norm"))
    assert set(want) == {3, 4}
    assert logged(resumed, {3, 4}, KTO_KEYS + ("loss", "grad_norm")) == want


@pytest.mark.slow
def test_resume_with_precomputed_reference_reuses_the_log_probs(base_model, tokenizer, rows, tmp_path):
    cache = str(tmp_path / "cache")
    kto_kwargs = {"precompute_ref_log_probs": True, "precompute_cache_dir": cache}
    straight, resumed, kto = _resume_case(lambda: copy.deepcopy(base_model), tokenizer, rows[:16], tmp_path,
                                          kto_kwargs=kto_kwargs, logging_steps=4)
    assert kto._precomputer.last_source["train"] == "cache"  # the first run's values, not a second pass
    assert resumed.train_dataset["ref_logps"] == straight.train_dataset["ref_logps"]
    assert_same_weights(straight.model, resumed.model)
    assert logged(resumed, {4}, KTO_KEYS) == logged(straight, {4}, KTO_KEYS)


@pytest.mark.parametrize("precompute", [False, True], ids=["frozen_copy", "precomputed"])
def test_resume_from_checkpoint_weights_as_initial_model_is_refused(base_model, tokenizer, rows, tmp_path,
                                                                     precompute):
    """The reference must be the initial policy; a model loaded from the checkpoint would make it the step-2
    weights. Refused before any step, naming the fix."""
    from transformers import AutoModelForCausalLM

    kto_kwargs = {"precompute_ref_log_probs": True, "precompute_cache": False} if precompute else None
    train_run(copy.deepcopy(base_model), tokenizer, rows[:16], tmp_path / "first", kto_kwargs=kto_kwargs, max_steps=2)
    checkpoint = tmp_path / "first" / "checkpoint-2"
    trained = AutoModelForCausalLM.from_pretrained(str(checkpoint))
    match = "precomputed reference log-probs" if precompute else "reference model differs"
    with pytest.raises(ValueError, match=match) as info:
        train_run(trained, tokenizer, rows[:16], tmp_path / "again", resume=str(checkpoint), kto_kwargs=kto_kwargs)
    assert "initial policy" in str(info.value)


def test_resume_with_the_checkpoint_adapter_as_initial_model_is_refused(base_model, tokenizer, rows, tmp_path):
    """A fresh LoRA's reference is the base model; loading the checkpoint's (trained) adapter into the model
    before attach would make the reference a copy of it. Refused before any step."""
    from peft import PeftModel

    train_run(_lora(base_model), tokenizer, rows[:16], tmp_path / "first", max_steps=2, learning_rate=0.5)
    checkpoint = tmp_path / "first" / "checkpoint-2"
    trained = PeftModel.from_pretrained(copy.deepcopy(base_model), str(checkpoint), is_trainable=True)
    with pytest.raises(ValueError, match="reference is now .*frozen copy of adapter .*trained against .*base model"):
        train_run(trained, tokenizer, rows[:16], tmp_path / "again", resume=str(checkpoint), learning_rate=0.5)


@pytest.mark.slow
def test_resume_with_a_copied_adapter_reference_is_exact(base_model, tokenizer, rows, tmp_path):
    """An adapter that already changes the model (a loaded SFT adapter) gets a frozen copy named "ref" as its
    reference; the resumed run copies it again from the initial adapter, and the fingerprint check passes."""
    from reference_cases import peft_policy

    straight, resumed, kto = _resume_case(lambda: peft_policy(base_model, trained=True), tokenizer, rows[:16],
                                          tmp_path, learning_rate=0.5, logging_steps=3)
    assert kto.reference.mode == "named_adapter" and kto.reference.created_adapter == "ref"
    assert resumed.state.stateful_callbacks["kto_plugin"]["reference_model"]  # the copy was fingerprinted
    assert_same_weights(straight.model, resumed.model)
    assert logged(resumed, {3, 4}, KTO_KEYS) == logged(straight, {3, 4}, KTO_KEYS)


def test_docs_resume_snippet_attaches_before_resuming():
    from pathlib import Path
    import re

    root = Path(__file__).resolve().parents[2]
    guide = (root / "docs" / "multi-gpu.md").read_text()
    snippet = re.search(r"## Resuming a run\n.*?```python\n(.*?)```", guide, re.S).group(1)
    compile(snippet, "docs/multi-gpu.md", "exec")
    assert snippet.index("kto.attach(trainer)") < snippet.index("trainer.train(resume_from_checkpoint=")
    assert "(docs/multi-gpu.md)" in (root / "README.md").read_text()  # the landing page leads to the guide


@pytest.mark.slow
def test_resume_with_model_init_copies_the_reference_before_the_checkpoint_loads(base_model, tokenizer, rows,
                                                                               tmp_path):
    """With `model_init`, `train()` builds the model and then loads the checkpoint into it; the frozen copy is
    taken in between (`kto_plugin.integrations._hpo.RebindingModelInit`), so it is the initial policy."""
    from helpers import args
    from transformers import Trainer

    from kto_plugin import KTOConfig, KTOPlugin

    def run(out, resume=None):
        kto = KTOPlugin(KTOConfig(max_length=96, warn_guidance=False), tokenizer=tokenizer)
        trainer = Trainer(model_init=lambda: copy.deepcopy(base_model),
                          args=args(out, max_steps=4, save_strategy="steps", save_steps=2, logging_steps=3),
                          train_dataset=kto.prepare_dataset(rows[:16]), data_collator=kto.collator)
        kto.attach(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return kto, trainer

    _, straight = run(tmp_path / "straight")
    kto, resumed = run(tmp_path / "resumed", resume=str(tmp_path / "straight" / "checkpoint-2"))
    assert_same_weights(kto.reference.ref_model, base_model)
    assert_same_weights(straight.model, resumed.model)
    assert logged(resumed, {3, 4}, KTO_KEYS) == logged(straight, {3, 4}, KTO_KEYS)


def test_sampled_fingerprint_tells_trained_weights_apart(base_model):
    from kto_plugin.reference._fingerprint import module_fingerprint
    from kto_plugin.trainer._resume import SAMPLES

    def sampled_fingerprint(module, **kwargs):
        return module_fingerprint(module, SAMPLES, **kwargs)

    model = copy.deepcopy(base_model).to(torch.bfloat16)
    before = sampled_fingerprint(model)
    assert before == sampled_fingerprint(copy.deepcopy(model))
    with torch.no_grad():  # what one optimizer step does: every element moves a little
        for p in model.parameters():
            p.add_(1e-2 * torch.sign(torch.randn_like(p)))
    assert sampled_fingerprint(model) != before
    assert sampled_fingerprint(model, keep=lambda name: ".no_such_adapter." in name) is None


# --- sync_ref_model: the synced reference travels in the checkpoint ---

SYNC = {"sync_ref_model": True, "ref_model_sync_steps": 1, "ref_model_mixup_alpha": 0.6}


def _ref_adapter_policy(base_model):
    from reference_cases import peft_policy
    from peft import LoraConfig

    policy = peft_policy(base_model, trained=False)
    torch.manual_seed(3)
    policy.add_adapter("ref", LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights=False, inference_mode=True))
    return policy


def _ref_adapter(model):
    return {k: v for k, v in model.state_dict().items() if ".ref." in k}


def test_resume_with_synced_frozen_copy_is_exact(base_model, tokenizer, rows, tmp_path):
    """Sync every step, checkpoint at 2, resume with resume_from_checkpoint=True from a copy of that checkpoint:
    the reference synced at steps 1-2 is restored (not rebuilt from the initial policy), so steps 3-4 log the
    same KTO metrics and end with the same policy and reference, bit for bit."""
    import shutil

    straight_kto, straight = train_run(copy.deepcopy(base_model), tokenizer, rows[:16], tmp_path / "straight",
                                    kto_kwargs=SYNC, learning_rate=0.05)
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "kto_ref_model.safetensors").is_file()
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-2")
    kto, resumed = train_run(copy.deepcopy(base_model), tokenizer, rows[:16], tmp_path / "resumed", resume=True,
                          kto_kwargs=SYNC, learning_rate=0.05)
    assert_same_weights(straight.model, resumed.model)
    assert_same_weights(straight_kto.reference.ref_model, kto.reference.ref_model)
    moved = [k for k, v in base_model.state_dict().items()
             if not torch.equal(v, kto.reference.ref_model.state_dict()[k])]
    assert moved  # the reference did follow the policy
    want = logged(straight, {3, 4}, KTO_KEYS + ("loss", "grad_norm"))
    assert set(want) == {3, 4}
    assert logged(resumed, {3, 4}, KTO_KEYS + ("loss", "grad_norm")) == want
    # the resumed run's checkpoint names the initial reference, as the first run's: a second resume passes
    states = [json.loads((tmp_path / d / "checkpoint-4" / "trainer_state.json").read_text())
              for d in ("straight", "resumed")]
    assert states[0]["stateful_callbacks"]["kto_plugin"] == states[1]["stateful_callbacks"]["kto_plugin"]


@pytest.mark.parametrize("trainer_folder", [True, False], ids=["with_ref_folder", "file_only"])
def test_resume_with_synced_ref_adapter_is_exact(base_model, tokenizer, rows, tmp_path, trainer_folder):
    """An adapter named "ref" synced every 2 steps. The Trainer saves every adapter of a PeftModel and loads them
    back on resume, the synced "ref" too (its ``ref/`` folder): the identity check accepts that. Without the
    folder (deleted here) the resumed run restores the synced tensors from kto_ref_model.safetensors."""
    import shutil

    kto_kwargs = dict(SYNC, ref_model_sync_steps=2)
    straight_kto, straight = train_run(_ref_adapter_policy(base_model), tokenizer, rows[:16], tmp_path / "straight",
                                    kto_kwargs=kto_kwargs, learning_rate=64.0, optim="sgd")
    assert straight_kto.reference.mode == "named_adapter" and straight_kto.reference.ref_adapter_name == "ref"
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / "kto_ref_model.safetensors"))
    initial = _ref_adapter(_ref_adapter_policy(base_model))
    assert saved.keys() == initial.keys()  # the adapter's tensors only
    assert any(not torch.equal(saved[k], initial[k]) for k in saved)  # synced at step 2
    if not trainer_folder:
        shutil.rmtree(checkpoint / "ref")
    kto, resumed = train_run(_ref_adapter_policy(base_model), tokenizer, rows[:16], tmp_path / "resumed",
                          resume=str(checkpoint), kto_kwargs=kto_kwargs, learning_rate=64.0, optim="sgd")
    assert_same_weights(straight.model, resumed.model)  # the "ref" adapter included
    want = logged(straight, {3, 4}, KTO_KEYS)
    assert set(want) == {3, 4}
    assert logged(resumed, {3, 4}, KTO_KEYS) == want


def test_resume_with_sync_refuses_a_checkpoint_without_the_synced_reference(base_model, tokenizer, rows,
                                                                          tmp_path):
    """Without kto_ref_model.safetensors (deleted here; an older version did not write it) the synced reference
    is lost: refused before any step rather than training against the initial policy."""
    train_run(copy.deepcopy(base_model), tokenizer, rows[:16], tmp_path / "first", kto_kwargs=SYNC, max_steps=2)
    checkpoint = tmp_path / "first" / "checkpoint-2"
    (checkpoint / "kto_ref_model.safetensors").unlink()
    with pytest.raises(ValueError, match="sync_ref_model=True.*no kto_ref_model.safetensors") as info:
        train_run(copy.deepcopy(base_model), tokenizer, rows[:16], tmp_path / "again", resume=str(checkpoint),
               kto_kwargs=SYNC)
    assert "train again from the start" in str(info.value)


def test_resume_with_sync_still_refuses_checkpoint_weights_as_initial_model(base_model, tokenizer, rows,
                                                                           tmp_path):
    """The identity check accepts the initial reference (then restores the synced one), not a frozen copy of
    the checkpoint's trained weights."""
    from transformers import AutoModelForCausalLM

    train_run(copy.deepcopy(base_model), tokenizer, rows[:16], tmp_path / "first", kto_kwargs=SYNC, max_steps=2)
    checkpoint = tmp_path / "first" / "checkpoint-2"
    trained = AutoModelForCausalLM.from_pretrained(str(checkpoint))
    with pytest.raises(ValueError, match="reference model differs"):
        train_run(trained, tokenizer, rows[:16], tmp_path / "again", resume=str(checkpoint), kto_kwargs=SYNC)
    with pytest.raises(ValueError, match="first run had KTOConfig\\(sync_ref_model=True\\)"):
        train_run(copy.deepcopy(base_model), tokenizer, rows[:16], tmp_path / "plain", resume=str(checkpoint))


def test_resume_with_synced_separate_ref_model_is_exact(base_model, tokenizer, rows, tmp_path):
    """A separate `ref_model` is synced in place; the resumed run is given the initial one again (as the first
    run was) and the checkpoint's synced weights are loaded into it."""
    from kto_plugin.demo import build_tiny_model

    def ref():
        return build_tiny_model(len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, seed=7)

    kto_kwargs = dict(SYNC, ref_model_sync_steps=2)
    runs = {}
    for name, resume in (("straight", None), ("resumed", str(tmp_path / "straight" / "checkpoint-2"))):
        ref_model = ref()
        kto, trainer = kto_trainer(copy.deepcopy(base_model), tokenizer, rows[:16], tmp_path / name,
                                   kto_kwargs=kto_kwargs, plugin_kwargs={"ref_model": ref_model}, max_steps=4,
                                   save_strategy="steps", save_steps=2, learning_rate=0.05)
        kto.attach(trainer)
        trainer.train(resume_from_checkpoint=resume)
        runs[name] = trainer, ref_model
    assert_same_weights(runs["straight"][0].model, runs["resumed"][0].model)
    assert_same_weights(runs["straight"][1], runs["resumed"][1])
    assert any(not torch.equal(v, ref().state_dict()[k]) for k, v in runs["resumed"][1].state_dict().items())
    want = logged(runs["straight"][0], {3, 4}, KTO_KEYS)
    assert set(want) == {3, 4}
    assert logged(runs["resumed"][0], {3, 4}, KTO_KEYS) == want


def _with_dropout(base_model):
    model = copy.deepcopy(base_model)
    for module in model.modules():  # Llama's attention applies it when the module is training
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.3
    return model


@pytest.mark.slow
def test_resume_window_kl_with_dropout_is_exact(base_model, tokenizer, rows, tmp_path):
    """kl_estimate="window" runs the KL pass for the window when the Trainer fetches it; with dropout on, that
    pass draws random numbers, and a resumed Trainer restores the checkpoint's RNG state only after fetching
    the first window: the pass must draw from the restored state, as in the uninterrupted run."""
    kto_kwargs = {"kl_estimate": "window", "disable_dropout": False}
    straight, resumed, _ = _resume_case(lambda: _with_dropout(base_model), tokenizer, rows[:16], tmp_path,
                                        kto_kwargs=kto_kwargs, per_device_train_batch_size=2,
                                        gradient_accumulation_steps=2)
    want = logged(straight, {3, 4}, KTO_KEYS + ("loss", "grad_norm"))
    assert set(want) == {3, 4}
    assert logged(resumed, {3, 4}, KTO_KEYS + ("loss", "grad_norm")) == want
    assert_same_weights(straight.model, resumed.model)


# --- the KTO family's state (BCO's running mean, the EMA of z0, a third-party plugin's) ---


class RunningCount:
    """A third-party plugin with state: the training rows seen so far, logged as ``test/seen``."""

    def __init__(self):
        self.seen = 0

    @hookimpl
    def kto_metrics(self, labels, training):
        if training:
            self.seen += int(labels.numel())
        return {"test/seen": float(self.seen)}

    @hookimpl
    def kto_state_dict(self):
        return {"seen": self.seen}

    @hookimpl
    def kto_load_state_dict(self, state):
        self.seen = 0 if state is None else state["seen"]


FAMILY = {
    "bco_accumulation": ({"loss_type": "bco"}, dict(per_device_train_batch_size=2, gradient_accumulation_steps=2)),
    "ema": ({"reference_point": "ema", "reference_point_ema_decay": 0.5}, {}),
    "ema_window": ({"reference_point": "ema", "kl_estimate": "window"},
                   dict(per_device_train_batch_size=2, gradient_accumulation_steps=2)),
    "bco_length_normalized_sft": ({"loss_type": "bco", "length_normalize": True, "sft_weight": 0.3}, {}),
}
FAMILY_KEYS = KTO_KEYS + ("loss", "grad_norm", "rewards/accuracy", "bco/delta", "sft_loss", "test/seen")


@pytest.fixture(scope="module")
def family_task():
    """(tokenizer, model, rows) of tests/family_task.py: 16 short rows, none dropped or cut, desirable only (the
    policy then raises completion log-probs in general, so z0 leaves its clamp at 0)."""
    tokenizer = build_task_tokenizer()
    rows = [r for r in kto_rows() if r["label"]][:16]
    return tokenizer, build_tiny_model(len(tokenizer), hidden_size=32, seed=11), rows


def _family_run(model, tokenizer, rows, out, kto_kwargs, resume=None, plugins=None, **overrides):
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, logging_steps=1, train_sampling_strategy="random",
              save_only_model=False, learning_rate=1e-2)
    kw.update(overrides)
    kto, trainer = kto_trainer(model, tokenizer, rows, out, kto_kwargs={"warn_guidance": False, **kto_kwargs},
                               plugin_kwargs={"plugins": [RunningCount()] if plugins is None else plugins}, **kw)
    kto.attach(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return kto, trainer


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(FAMILY))
def test_resume_with_family_state_is_exact(variant, family_task, tmp_path):
    tokenizer, base_model, rows = family_task
    kto_kwargs, overrides = FAMILY[variant]
    first, straight = _family_run(copy.deepcopy(base_model), tokenizer, rows, tmp_path / "straight",
                                  kto_kwargs, **overrides)
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["kto_plugin"]["plugins"]
    stateful = "builtin:bco" if kto_kwargs.get("loss_type") == "bco" else "builtin:ema"
    assert saved[stateful] and saved["test_resume.RunningCount"]["seen"] == 2 * 4  # after 2 steps of 4 rows
    kto, resumed = _family_run(copy.deepcopy(base_model), tokenizer, rows, tmp_path / "resumed", kto_kwargs,
                               resume=str(checkpoint), **overrides)
    assert_same_weights(straight.model, resumed.model)
    want = logged(straight, {3, 4}, FAMILY_KEYS)
    assert set(want) == {3, 4}
    assert logged(resumed, {3, 4}, FAMILY_KEYS) == want
    assert kto.plugins.state_dict() == first.plugins.state_dict()
    if stateful == "builtin:ema":
        assert want[3]["kl"] > 0  # the moving average is not a string of zeros
    else:
        assert want[3]["bco/delta"] != 0


@pytest.mark.slow
def test_resume_without_a_plugin_whose_state_the_checkpoint_holds_is_refused(family_task, tmp_path):
    tokenizer, base_model, rows = family_task
    _family_run(copy.deepcopy(base_model), tokenizer, rows, tmp_path / "first", {}, max_steps=2)
    with pytest.raises(ValueError, match=r"state of plugin\(s\) \['test_resume.RunningCount'\].*not registered"):
        _family_run(copy.deepcopy(base_model), tokenizer, rows, tmp_path / "second", {}, plugins=[],
                    resume=str(tmp_path / "first" / "checkpoint-2"))
