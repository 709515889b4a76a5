"""What skipping padding is worth on the CPU: one batch of KTO rows run padded, packed, or in length groups.

    python benchmarks/bench_padding.py [--shape layers] [--threads 2] [--rounds 5] [--attention sdpa,flex_attention]

For every attention implementation asked for, and each of the batch's two passes kinds (a no-grad forward, as
the reference and KL passes run, and a forward+backward, as the policy's training step), the same 8 rows of
HH-RLHF dialogue (`common.dialogue_rows`) run as:

  padded   one (8, T) batch right-padded to the longest row, with its attention mask (what the Trainer collates)
  packed   one (1, N) row of the 8 rows back to back, position ids restarting at 0 per row and no attention mask:
           transformers builds the block-diagonal mask from the position ids (flash-attention varlen's layout)
  groups   the rows in groups of similar length (`kto_plugin.step._buckets.length_groups`), each padded to its
           own longest row (what `KTOConfig.length_buckets` does for the no-grad passes)

Each layout's summed completion log-probs are checked against the padded one's. Reports the median seconds of
`--rounds` alternating rounds (process CPU time is not used: the threads' wall time is what a user waits for).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402
from kto_plugin import KTOConfig, KTOPlugin  # noqa: E402
from kto_plugin.step._buckets import CPU_CALL_OVERHEAD, length_groups  # noqa: E402
from kto_plugin.step._logprobs import logps_from_hidden  # noqa: E402


def _batch():
    kto = KTOPlugin(KTOConfig(max_length=common.MAX_LENGTH, warn_guidance=False), tokenizer=common.tokenizer())
    ds = kto.prepare_dataset(common.dialogue_rows(common.BATCH))
    return kto.collator([ds[i] for i in range(common.BATCH)])["labels"]


def _padded(model, ids, mask, labels):
    out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    return logps_from_hidden(out.hidden_states[-1], model.lm_head, labels).logps


def _packed(model, ids, mask, labels):
    lengths = mask.sum(1).tolist()
    packed_ids = torch.cat([ids[i, :n] for i, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    out = model(input_ids=packed_ids, position_ids=positions, use_cache=False, output_hidden_states=True,
                logits_to_keep=1)
    hidden = out.hidden_states[-1][0].split(lengths)
    return torch.cat([
        logps_from_hidden(h[None], model.lm_head, labels[i : i + 1, :n]).logps for i, (h, n) in enumerate(zip(hidden, lengths))
    ])


def _groups(model, ids, mask, labels):
    lengths = mask.sum(1).tolist()
    result = torch.zeros(ids.shape[0])
    for group in length_groups(lengths, CPU_CALL_OVERHEAD):
        rows, width = torch.tensor(group), max(lengths[i] for i in group)
        result[rows] = _padded(model, ids[rows, :width], mask[rows, :width], labels[rows, :width])
    return result


LAYOUTS = {"padded": _padded, "packed": _packed, "groups": _groups}


def _time(fn, grad: bool) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    if grad:
        logps = fn()
        logps.sum().backward()
    else:
        with torch.no_grad():
            logps = fn()
    return time.perf_counter() - start, logps.detach()


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--shape", choices=list(common.SHAPES), default="layers")
    cli.add_argument("--threads", type=int, default=2)
    cli.add_argument("--rounds", type=int, default=5)
    cli.add_argument("--attention", default="sdpa,flex_attention")
    opts = cli.parse_args()
    common.set_threads(opts.threads)
    labels = _batch()
    ids, mask, comp = labels["input_ids"], labels["attention_mask"], labels["completion_labels"]
    lengths = mask.sum(1).tolist()
    print(f"shape {opts.shape}, {opts.threads} threads; row lengths {lengths}: {sum(lengths)} real tokens, "
          f"{ids.numel()} padded, groups {length_groups(lengths, CPU_CALL_OVERHEAD)}\n")
    print("| attention | pass | padded | packed | groups |")
    print("|---|---|---|---|---|")
    for attention in opts.attention.split(","):
        model = common.model(shape=opts.shape)
        model.set_attn_implementation(attention)
        for grad in (False, True):
            times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
            results = {}
            try:
                for _ in range(opts.rounds + 1):  # the first round warms up (and compiles flex attention)
                    for name, layout in LAYOUTS.items():
                        model.zero_grad()
                        seconds, results[name] = _time(lambda layout=layout: layout(model, ids, mask, comp), grad)
                        times[name].append(seconds)
            except NotImplementedError as err:  # flex attention has no backward on the CPU (torch 2.13)
                print(f"| {attention} | forward+backward | not supported here: {str(err).splitlines()[0]} | | |")
                continue
            for name in LAYOUTS:
                error = (results[name] - results["padded"]).abs().max().item()
                assert error < 1e-2, f"{attention} {name}: log-probs differ from the padded batch's by {error}"
            median = {name: statistics.median(t[1:]) for name, t in times.items()}
            cells = " | ".join(f"{median[n]:.2f} s ({median[n] / median['padded']:.2f}x)" for n in LAYOUTS)
            print(f"| {attention} | {'forward+backward' if grad else 'no-grad forward'} | {cells} |", flush=True)
    print(f"\n1-minute load average at the end (2 cores): {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
