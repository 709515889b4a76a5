"""Shared set-up of the benchmarks: the same model, tokenizer and rows for every side, and a step timer.

Two model shapes (`SHAPES`), both Llama from a config with a 32,000-token vocabulary, per-device batch 8, real
HH-RLHF dialogues of about 300 tokens, 2 CPU threads:

* ``head``: hidden 256, 4 layers (the first benchmark's shape): the LM head holds most of the arithmetic;
* ``layers``: hidden 512, 8 layers, intermediate 1408: the transformer layers hold most of it, as in real
  0.5B-8B models (`head_share` gives the split).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from functools import lru_cache
from typing import Any

import torch
from transformers import TrainerCallback

from kto_plugin.demo import build_tokenizer, hh_unpaired_rows

SHAPES = {
    "head": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=512),
    "layers": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                   intermediate_size=1408),
}
VOCAB = 32_000
BATCH = 8
MAX_LENGTH = 512


@lru_cache(maxsize=1)
def tokenizer() -> Any:
    return build_tokenizer(vocab_size=8192)


def dialogue_rows(n: int, min_tokens: int = 240, max_tokens: int = 400) -> list[dict[str, Any]]:
    """`n` unpaired rows (desirable/undesirable interleaved) whose prompt+completion is 240-400 tokens."""
    tok = tokenizer()
    out = []
    for row in hh_unpaired_rows():
        length = len(tok(row["prompt"] + row["completion"])["input_ids"])
        if min_tokens <= length <= max_tokens:
            out.append(row)
        if len(out) == n:
            break
    return out


def model(vocab_size: int = VOCAB, seed: int = 0, shape: str = "head") -> Any:
    """A randomly initialised `LlamaForCausalLM` of `shape` (see `SHAPES`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=4096, tie_word_embeddings=False,
                         **SHAPES[shape])
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def head_share(shape: str, vocab_size: int = VOCAB, tokens: int = 300) -> float:
    """The LM head's share of a forward's multiply-adds per token, at `tokens` tokens of causal context.

    Per token: the head is hidden x vocab; each layer is its projections (q, k, v, o), its MLP (3 matrices) and
    attention over on average `tokens / 2` earlier positions (scores and weighted values).
    """
    s = SHAPES[shape]
    hidden, inter = s["hidden_size"], s["intermediate_size"]
    kv = hidden * s["num_key_value_heads"] // s["num_attention_heads"]
    layer = hidden * (2 * hidden + 2 * kv) + 3 * hidden * inter + 2 * (tokens / 2) * hidden
    head = hidden * vocab_size
    return head / (head + s["num_hidden_layers"] * layer)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class StepTimer(TrainerCallback):
    """Wall time and the process's CPU time of every optimizer step (data loading, forwards, backward, optimizer).

    On a shared machine the wall time of a multi-threaded step swings with the other processes' load (a thread
    descheduled at a barrier stalls the others); the CPU time (all threads, user + system) stays close to the
    work done, so the benchmarks report both.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self._start = self._cpu_start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)
        self.cpu_times.append(time.process_time() - self._cpu_start)


def median_after_warmup(times: list[float], warmup: int) -> float:
    return statistics.median(times[warmup:])


def run_side(script: str, side: str, extra: list[str]) -> dict[str, Any]:
    """Run one side in a fresh process (so peak RSS is its own) and parse its last JSON line."""
    env = {**os.environ, "KTO_PLUGIN_DISABLE_AUTOLOAD": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, script, "--side", side, *extra], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
