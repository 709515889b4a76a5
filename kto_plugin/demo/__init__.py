"""The embedded default: shipped preference data, a tokenizer trained in-process and a tiny Llama from a config.

Nothing here downloads anything. The data (`assets/`) is the `harmless-base` test split of Anthropic's HH-RLHF
(2,312 implicit-prompt pairs of real dialogue, MIT licence, `assets/HH_RLHF_LICENSE`); it contains red-teaming
conversations, some offensive, which is what "harmless" preference data is made of.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib import resources
from typing import Any

import torch

HH_FILE = "hh_rlhf_harmless_base_test.jsonl.gz"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|tools|>\n{{ tools | tojson }}{{ eos_token }}\n{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


@lru_cache(maxsize=1)
def _hh_lines() -> tuple[str, ...]:
    with resources.files("kto_plugin.demo").joinpath("assets", HH_FILE).open("rb") as raw:
        with gzip.open(raw, "rt", encoding="utf-8") as f:
            return tuple(f.read().splitlines())


def load_hh_pairs(n: int | None = None) -> list[dict[str, str]]:
    """The first `n` (default: all 2,312) HH-RLHF harmless-base test pairs, as ``{chosen, rejected}`` dicts."""
    lines = _hh_lines()[:n] if n is not None else _hh_lines()
    return [json.loads(line) for line in lines]


def hh_unpaired_rows(n_pairs: int | None = None) -> list[dict[str, Any]]:
    """Unpaired KTO rows from the first `n_pairs` pairs, interleaved desirable, undesirable, desirable, ..."""
    from ..data._encoding import common_prefix_length
    from ..data._formats import extract_prompt

    rows = []
    for pair in load_hh_pairs(n_pairs):
        chosen, rejected = pair["chosen"], pair["rejected"]
        if common_prefix_length(chosen, rejected) >= min(len(chosen), len(rejected)):
            continue  # one text extends the other: no shared prompt with two distinct answers
        prompt, good, bad = extract_prompt(chosen, rejected)
        if not good.strip() or not bad.strip():
            continue  # blank completions carry no preference
        rows.append({"prompt": prompt, "completion": good, "label": True})
        rows.append({"prompt": prompt, "completion": bad, "label": False})
    return rows


def build_tokenizer(texts: list[str] | None = None, vocab_size: int = 2048) -> Any:
    """A byte-level BPE tokenizer trained in-process (deterministic), with BOS/EOS/pad and a chat template.

    Like Llama's, it adds a BOS token to plain text. Default corpus: the shipped HH-RLHF dialogues.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        texts = [p["chosen"] for p in load_hh_pairs()] + [p["rejected"] for p in load_hh_pairs()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    **config_kwargs: Any,
) -> Any:
    """A randomly initialised `LlamaForCausalLM` built from a config (no weights downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        **config_kwargs,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
