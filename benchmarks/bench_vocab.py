"""Peak memory of the log-prob path (forward + backward) as the vocabulary grows: kto_plugin vs TRL vs naive.

Fixed batch 4 x 256 tokens (the last 128 of each row are completion), hidden 256; vocabulary 32k, 128k,
256k. Each measurement runs in a fresh process: it allocates the final hidden states (requiring grad)
and a frozen LM head (as under LoRA, so the (V, H) weight gradient, the same for every method, is left
out), then records the growth of the peak RSS during one forward + backward of the summed completion
log-probs.

  naive        log_softmax over the full (B, T, V) float32 logits, then gather (what a plain loop does)
  trl          TRL 1.16's ChunkedLogProbFunction as its fused LM head calls it on CPU (every position)
  kto_plugin   kto_plugin.step._logprobs.logps_from_hidden (completion positions only, 32 MiB chunks)

    python benchmarks/bench_vocab.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

BATCH, SEQ, COMPLETION, HIDDEN = 4, 256, 128, 256
VOCABS = (32_000, 128_000, 256_000)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _inputs(vocab: int):
    torch.manual_seed(0)  # the LM head initialisation uses the global generator
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=g).requires_grad_()
    head = torch.nn.Linear(HIDDEN, vocab, bias=False).requires_grad_(False)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[:, : SEQ - COMPLETION] = -100
    return hidden, head, labels


def _naive(hidden, head, labels):
    logits = head(hidden).float()
    logps = torch.log_softmax(logits[:, :-1], -1)
    target = labels[:, 1:]
    picked = logps.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * (target != -100)).sum(-1)


def _trl(hidden, head, labels):
    from trl.kernels import ChunkedLogProbFunction

    h = hidden[:, :-1]
    target = labels[:, 1:]
    mask = target != -100
    log_probs = ChunkedLogProbFunction.apply(
        h.reshape(-1, h.size(-1)), head.weight, None, target.clamp(min=0).reshape(-1), 1.0, 32768, None, 1.0,
        ("log_probs",),
    )[0]
    return log_probs.view(mask.shape).masked_fill(~mask, 0).sum(-1)


def _ours(hidden, head, labels):
    from kto_plugin.step._logprobs import logps_from_hidden

    return logps_from_hidden(hidden, head, labels).logps


METHODS = {"naive": _naive, "trl": _trl, "kto_plugin": _ours}


def worker(method: str, vocab: int) -> None:
    torch.set_num_threads(2)
    # imports and one small call first, so library loading and thread pools are not counted
    small = _inputs(64)
    METHODS[method](*small).sum().backward()
    del small
    hidden, head, labels = _inputs(vocab)
    base = max(_rss_mb(), _peak_mb())
    logps = METHODS[method](hidden, head, labels)
    logps.sum().backward()
    print(json.dumps({"method": method, "vocab": vocab, "peak_growth_mb": _peak_mb() - base,
                      "logps": logps.detach().tolist()}))


def main() -> None:
    cli = argparse.ArgumentParser()
    cli.add_argument("--method")
    cli.add_argument("--vocab", type=int)
    opts = cli.parse_args()
    if opts.method:
        worker(opts.method, opts.vocab)
        return
    table: dict[int, dict[str, float]] = {}
    for vocab in VOCABS:
        values = {}
        for method in METHODS:
            proc = subprocess.run([sys.executable, __file__, "--method", method, "--vocab", str(vocab)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            values[method] = out
        reference = torch.tensor(values["naive"]["logps"])
        for method in ("trl", "kto_plugin"):
            diff = (torch.tensor(values[method]["logps"]) - reference).abs().max().item()
            assert diff < 1e-2, f"{method} log-probs differ from naive by {diff} at vocab {vocab}"
        table[vocab] = {m: v["peak_growth_mb"] for m, v in values.items()}
    print(f"\nPeak RSS growth (MB) of log-prob forward+backward, batch {BATCH} x {SEQ} tokens ({COMPLETION} "
          f"completion), hidden {HIDDEN}, frozen LM head, fp32, CPU\n")
    print("| vocab | naive | TRL 1.16 chunked | kto_plugin |")
    print("|---|---|---|---|")
    for vocab, v in table.items():
        print(f"| {vocab:,} | {v['naive']:.0f} | {v['trl']:.0f} | {v['kto_plugin']:.0f} |")


if __name__ == "__main__":
    main()
