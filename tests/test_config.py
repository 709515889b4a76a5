"""KTOConfig: defaults as TRL's, validation with clear messages, and HfArgumentParser compatibility."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import HfArgumentParser, TrainingArguments

from kto_plugin import KTOConfig


def test_defaults_follow_trl():
    from trl import KTOConfig as TRLKTOConfig

    ours = {f.name: f.default for f in dataclasses.fields(KTOConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(TRLKTOConfig)}
    for name in ("beta", "loss_type", "desirable_weight", "undesirable_weight", "max_length", "disable_dropout",
                 "precompute_ref_log_probs", "precompute_ref_batch_size", "dataset_num_proc", "sync_ref_model",
                 "ref_model_mixup_alpha", "ref_model_sync_steps", "router_aux_loss_coef", "activation_offloading",
                 "model_init_kwargs", "trust_remote_code"):
        assert ours[name] == theirs[name], name


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"beta": 0.0}, "beta must be > 0"),
        ({"beta": -1.0}, "beta must be > 0"),
        ({"desirable_weight": -0.5}, "desirable_weight must be >= 0"),
        ({"undesirable_weight": -1}, "undesirable_weight must be >= 0"),
        ({"desirable_weight": 0, "undesirable_weight": 0}, "both 0"),
        ({"max_length": 64, "max_prompt_length": 64}, "max_prompt_length .64. must be smaller than max_length .64."),
        ({"max_length": None, "max_prompt_length": 8}, "needs max_length"),
        ({"max_length": 0}, "max_length must be a positive integer"),
        ({"max_completion_length": 0}, "max_completion_length must be a positive integer"),
        ({"label_pad_token_id": 0}, "label_pad_token_id must be a negative integer"),
        ({"label_pad_token_id": 5}, "completion tokens with that id would be dropped"),
        ({"padding_value": -1}, "padding_value must be a token id"),
        ({"truncation_mode": "middle"}, "truncation_mode must be one of"),
        ({"reference_point": "median"}, "reference_point must be one of"),
        ({"reference_point_ema_decay": 1.0}, "reference_point_ema_decay must be in \\[0, 1\\)"),
        ({"reference_point_ema_decay": -0.1}, "reference_point_ema_decay must be in"),
        ({"sft_weight": -0.1}, "sft_weight must be >= 0"),
        ({"humanline_min_log_ratio": 0.5}, "humanline_min_log_ratio must be < 0"),
        ({"humanline_max_log_ratio": -0.5}, "humanline_max_log_ratio > 0"),
        ({"kl_estimate": "epoch"}, "kl_estimate must be one of"),
        ({"loss_type": ""}, "loss_type must be a non-empty string"),
        ({"model_init_kwargs": "{not json"}, "model_init_kwargs must be a dict or a JSON object"),
        ({"sync_ref_model": True, "precompute_ref_log_probs": True}, "stale"),
        ({"router_aux_loss_coef": -0.1}, "router_aux_loss_coef must be >= 0"),
    ],
)
def test_bad_values_are_refused_with_the_argument_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KTOConfig(**kwargs)


def test_parsed_next_to_training_arguments():
    parser = HfArgumentParser((KTOConfig, TrainingArguments))
    kto, training = parser.parse_args_into_dataclasses(
        ["--beta", "0.2", "--max_length", "512", "--loss_type", "apo_zero_unpaired", "--desirable_weight", "1.33",
         "--model_init_kwargs", '{"dtype": "float32"}', "--output_dir", "out", "--disable_dropout", "false"]
    )
    assert (kto.beta, kto.max_length, kto.loss_type, kto.desirable_weight) == (0.2, 512, "apo_zero_unpaired", 1.33)
    assert kto.model_init_kwargs == {"dtype": "float32"}
    assert kto.disable_dropout is False
    assert training.output_dir == "out"


def test_to_dict_round_trips():
    config = KTOConfig(beta=0.3, max_prompt_length=10)
    assert KTOConfig(**config.to_dict()) == config


def test_documented_kto_trainer_defaults():
    # the documented (pre-1.0) KTOTrainer API: label_pad_token_id -100, padding_value from the tokenizer
    config = KTOConfig()
    assert config.label_pad_token_id == -100
    assert config.padding_value is None and config.max_completion_length is None


def test_training_arguments_in_kto_config_are_sent_to_training_arguments():
    """A TRL script migrated as written: TRL's KTOConfig also holds the TrainingArguments."""
    with pytest.raises(TypeError, match=r"^KTOConfig got output_dir, learning_rate: TrainingArguments fields\..*"
                       r"give them to TrainingArguments\(output_dir=\.\.\., learning_rate=\.\.\.\), which goes to "
                       r"Trainer\(args=\.\.\.\)"):
        KTOConfig(output_dir="out", beta=0.1, learning_rate=1e-6)
    with pytest.raises(TypeError, match=r"KTOConfig has no field 'betta'\. Did you mean 'beta'\?"):
        KTOConfig(betta=0.1)
    with pytest.raises(TypeError, match=r"use_liger_loss is a TRL KTOConfig field kto_plugin does not support"):
        KTOConfig(use_liger_loss=True)


def test_kto_config_still_copies_pickles_and_replaces():
    import copy
    import pickle

    config = KTOConfig(beta=0.2)
    assert copy.deepcopy(config) == config == pickle.loads(pickle.dumps(config))
    assert dataclasses.replace(config, beta=0.3).beta == 0.3
