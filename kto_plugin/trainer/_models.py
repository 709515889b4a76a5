"""Models named by path or Hub id, and models the plugin wraps: what the documented `KTOTrainer` API took as
strings (`ref_model="..."` with `ref_model_init_kwargs`) or as a `peft_config`.

* `load_pretrained(name, init_kwargs)`: `AutoModelForSeq2SeqLM` for an encoder-decoder config, else
  `AutoModelForCausalLM`, with dtype strings (``"bfloat16"``) turned into torch dtypes and ``torch_dtype``
  accepted as the older spelling of ``dtype``; a folder holding a PEFT adapter alone loads its base model with
  the adapter (`load_adapter_folder`).
* `wrap_with_peft(model, peft_config)`: `peft.get_peft_model`, refusing a model that already has adapters;
  `wrap_trainer_model` does it to the model a Trainer already holds.
* `check_architecture`: encoder-decoder or decoder-only (`config.is_encoder_decoder`), policy and reference alike.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def is_model_name(value: Any) -> bool:
    """True for a model given by name: a Hub id or a local directory (str or `os.PathLike`)."""
    return isinstance(value, (str, os.PathLike))


def _config_of(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "config", None)


def is_encoder_decoder(model: Any) -> bool:
    """`model.config.is_encoder_decoder` of a model or of the base model of a PEFT wrapper."""
    return bool(getattr(_config_of(model), "is_encoder_decoder", False))


def decoder_start_token_id(model: Any) -> int | None:
    """The token an encoder-decoder model's decoder starts from (T5: the pad id; BART: the EOS id)."""
    config = _config_of(model)
    value = getattr(config, "decoder_start_token_id", None)
    if value is None and hasattr(model, "generation_config"):
        value = getattr(model.generation_config, "decoder_start_token_id", None)
    return value


def normalized_init_kwargs(init_kwargs: dict[str, Any] | None, default_dtype: Any = None) -> dict[str, Any]:
    """`from_pretrained` keyword arguments: ``torch_dtype`` renamed ``dtype``, dtype names made torch dtypes.

    `default_dtype` applies when neither spelling is given (TRL 1.16 builds the reference in the policy's dtype).
    """
    kwargs = dict(init_kwargs or {})
    if "torch_dtype" in kwargs:
        if "dtype" in kwargs:
            raise ValueError("Pass dtype or torch_dtype in the model init kwargs, not both (they are the same).")
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    dtype = kwargs.get("dtype", default_dtype)
    if isinstance(dtype, str) and dtype != "auto":
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(
                f"dtype={dtype!r} is not a torch dtype; use e.g. 'bfloat16', 'float16', 'float32' or 'auto'."
            )
        dtype = resolved
    if dtype is not None:
        kwargs["dtype"] = dtype
    return kwargs


def load_pretrained(
    name: str | os.PathLike, init_kwargs: dict[str, Any] | None, trust_remote_code: bool = False,
    default_dtype: Any = None, argument: str = "model",
) -> torch.nn.Module:
    """Load the model `name` for causal or sequence-to-sequence language modelling, as its config says.

    `argument` names what the user passed (e.g. ``"ref_model"``) in the error raised when it cannot be loaded.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    kwargs = normalized_init_kwargs(init_kwargs, default_dtype)
    kwargs.setdefault("trust_remote_code", trust_remote_code)
    if is_adapter_folder(name):
        return load_adapter_folder(name, kwargs, trainable=argument != "ref_model")
    try:
        config = AutoConfig.from_pretrained(
            name, trust_remote_code=kwargs["trust_remote_code"], revision=kwargs.get("revision")
        )
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{argument}={str(name)!r} could not be loaded: {err}. Pass a local directory written by "
            "save_pretrained, a Hub model id, or a model instance."
        ) from err
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    return auto.from_pretrained(name, **kwargs)


def is_adapter_folder(name: str | os.PathLike) -> bool:
    """A local folder holding a PEFT adapter alone (`PeftModel.save_pretrained`: ``adapter_config.json``)."""
    return os.path.isfile(os.path.join(os.fspath(name), "adapter_config.json"))


def load_adapter_folder(path: str | os.PathLike, kwargs: dict[str, Any], trainable: bool) -> torch.nn.Module:
    """The base model the adapter names (``base_model_name_or_path``), loaded with `kwargs`, with the adapter.

    The policy (`trainable`) is a `PeftModel` whose adapter trains further; a reference gets the adapter
    merged into the weights (a plain frozen model, as a reference needs no adapter switching).
    """
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSeq2SeqLM, PeftConfig
    from transformers import AutoConfig

    peft_config = PeftConfig.from_pretrained(os.fspath(path))
    base = AutoConfig.from_pretrained(
        peft_config.base_model_name_or_path, trust_remote_code=kwargs["trust_remote_code"]
    )
    seq2seq = getattr(base, "is_encoder_decoder", False)
    auto = AutoPeftModelForSeq2SeqLM if seq2seq else AutoPeftModelForCausalLM
    model = auto.from_pretrained(os.fspath(path), is_trainable=trainable, **kwargs)
    return model if trainable else model.merge_and_unload()


def wrap_with_peft(model: torch.nn.Module, peft_config: Any) -> torch.nn.Module:
    """`get_peft_model(model, peft_config)`; refuses a model that already carries adapters."""
    from peft import PeftConfig, get_peft_model

    from ..reference._adapters import AdapterHost

    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a peft.PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}.")
    if AdapterHost.of(model) is not None:
        raise ValueError(
            "peft_config was given but the model already has PEFT adapters: the plugin would stack a second "
            "adapter on top. Pass peft_config=None and train the adapters the model has, or pass the base model."
        )
    return get_peft_model(model, peft_config)


def wrap_trainer_model(trainer: Any, model: torch.nn.Module, peft_config: Any, ledger: Any) -> torch.nn.Module:
    """Wrap the model a Trainer holds (`model`, unwrapped) with `peft_config` and make the wrapper the Trainer's
    `model` and `model_wrapped` (through `ledger`, which gives them back on undo). Refused where the Trainer has already captured the unwrapped model: an optimizer
    passed in (built over its parameters), or `model_init` (train() builds a new model)."""
    fix = "Wrap the model before building the Trainer: Trainer(model=kto.wrap_model(model), ...)"
    if getattr(trainer, "model_init", None) is not None:
        raise ValueError(
            "peft_config with a Trainer built from model_init: train() builds a new model, which attach() "
            "cannot wrap. Wrap inside model_init: model_init=lambda: kto.wrap_model(build_model())."
        )
    if trainer.optimizer is not None:
        raise ValueError(
            "peft_config, but the Trainer already has an optimizer (optimizers=...), built over the "
            f"unwrapped model's parameters, so the adapter would never be trained. {fix}."
        )
    if trainer.model is not trainer.model_wrapped:
        raise ValueError(f"peft_config, but the Trainer's model is already wrapped for distribution. {fix}.")
    wrapped = wrap_with_peft(model, peft_config)
    ledger.setattr(trainer, "model", wrapped)
    ledger.setattr(trainer, "model_wrapped", wrapped)
    return wrapped


def check_architecture(policy: Any, reference: Any, declared: bool | None) -> bool:
    """Whether `policy` is an encoder-decoder; refuses a wrong `KTOConfig.is_encoder_decoder` and a reference of
    the other architecture."""
    encoder_decoder = is_encoder_decoder(policy)
    if declared is not None and declared != encoder_decoder:
        raise ValueError(
            f"KTOConfig.is_encoder_decoder={declared}, but the model ({type(policy).__name__}) has "
            f"config.is_encoder_decoder={encoder_decoder}. Leave it None (read from the model) or fix it."
        )
    if reference is not None and is_encoder_decoder(reference) != encoder_decoder:
        raise ValueError(
            f"The policy is {'an encoder-decoder' if encoder_decoder else 'a decoder-only'} model but ref_model "
            f"({type(reference).__name__}) is not: their log-probs are not comparable. Use a reference of the "
            "same architecture."
        )
    return encoder_decoder
