"""Shared set-up of the benchmarks: the same model, tokenizer and rows for every side, and a step timer.

The configuration is the one the performance issue measured: Llama from a config (hidden 256, 4 layers,
vocab 32,000), per-device batch 8, real HH-RLHF dialogues of about 300 tokens, 2 CPU threads.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from functools import lru_cache
from typing import Any

import torch
from transformers import TrainerCallback

from kto_plugin.demo import build_tiny_model, build_tokenizer, hh_unpaired_rows

MODEL = dict(hidden_size=256, num_layers=4, num_heads=4)
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


def model(vocab_size: int = VOCAB, seed: int = 0) -> Any:
    return build_tiny_model(vocab_size, seed=seed, **MODEL)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (data loading, forwards, backward, optimizer)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def median_after_warmup(times: list[float], warmup: int) -> float:
    return statistics.median(times[warmup:])


def run_side(script: str, side: str, extra: list[str]) -> dict[str, Any]:
    """Run one side in a fresh process (so peak RSS is its own) and parse its last JSON line."""
    proc = subprocess.run([sys.executable, script, "--side", side, *extra], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
