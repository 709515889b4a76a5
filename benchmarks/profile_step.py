"""Where a training step spends its time, pass by pass (torch.profiler), for kto_plugin and a plain step.

    python benchmarks/profile_step.py [--shape head|layers] [--side kto_plugin|kto_full_rows|plain] [--steps 2]

Sides as in `bench_vs_trl.py` (``kto_full_rows``: every pass on full rows, the step before prompts were computed
once).

The step's parts are labelled with `torch.profiler.record_function` by wrapping the methods that run them (this
script only; the library has no profiling code):

  forward+hook     `Trainer.compute_loss`: the policy's forward and the KTO loss hook (plain: forward + loss)
  hook             the KTO loss hook (`KTOComputeLoss.__call__`), everything after the policy's forward
  policy KL        the policy's no-grad pass on the KL batch (`Passes.policy_kl`)
  reference        the reference's no-grad passes (`Passes.reference_logps`)
  backward         `Accelerator.backward`
  optimizer        `optimizer.step`

Prints the milliseconds per step of each part (the policy forward is forward+hook minus hook) and the operators
with the most self time. Same model, rows and settings as `bench_vs_trl.py`.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import bench_vs_trl  # noqa: E402
import common  # noqa: E402

PARTS = ("forward+hook", "hook", "policy KL", "reference", "backward", "optimizer")


def _label(owner, name: str, label: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        with record_function(label):
            return original(*args, **kwargs)

    setattr(owner, name, wrapped)


class _Profiled:
    """Starts the profiler at the first step after warm-up and stops it after `steps` steps."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps, self.seen = warmup, steps, 0
        self.prof = profile(activities=[ProfilerActivity.CPU])

    def begin(self) -> None:
        if self.seen == self.warmup:
            self.prof.__enter__()

    def end(self) -> None:
        self.seen += 1
        if self.seen == self.warmup + self.steps:
            self.prof.__exit__(None, None, None)


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--shape", choices=list(common.SHAPES), default="layers")
    cli.add_argument("--side", choices=("kto_plugin", "kto_full_rows", "kto_precomp", "plain"), default="kto_plugin")
    cli.add_argument("--steps", type=int, default=2)
    cli.add_argument("--warmup", type=int, default=2)
    cli.add_argument("--threads", type=int, default=2)
    cli.add_argument("--top", type=int, default=12)
    opts = cli.parse_args()
    common.set_threads(opts.threads)

    from accelerate import Accelerator
    from transformers import Trainer, TrainerCallback

    from kto_plugin.step import _compute_loss, _passes

    _label(Trainer, "compute_loss", "forward+hook")
    _label(_compute_loss.KTOComputeLoss, "__call__", "hook")
    _label(_passes.Passes, "policy_kl", "policy KL")
    _label(_passes.Passes, "reference_logps", "reference")
    _label(Accelerator, "backward", "backward")

    total = opts.warmup + opts.steps
    rows = common.dialogue_rows(common.BATCH * total)
    tok = common.tokenizer()
    model = common.model(shape=opts.shape)
    profiled = _Profiled(opts.warmup, opts.steps)

    class Hooks(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            profiled.begin()

        def on_step_end(self, args, state, control, **kwargs):
            profiled.end()

    with tempfile.TemporaryDirectory() as out:
        trainer = bench_vs_trl.SIDES[opts.side](rows, tok, model, out, total)
        trainer.add_callback(Hooks())
        trainer.create_optimizer()
        _label(trainer.optimizer, "step", "optimizer")
        trainer.train()

    events = {e.key: e for e in profiled.prof.key_averages()}
    per_step = {p: events[p].cpu_time_total / 1e3 / opts.steps for p in PARTS if p in events}
    step_ms = sum(per_step.get(p, 0.0) for p in ("forward+hook", "backward", "optimizer"))
    print(f"\n{opts.side}, shape {opts.shape} (LM head {common.head_share(opts.shape):.0%} of a forward's "
          f"multiply-adds per token), {opts.threads} threads, {opts.steps} profiled steps\n")
    print("| part | ms/step | share of forward+backward+optimizer |")
    print("|---|---|---|")
    rows_out = []
    if "hook" in per_step:
        rows_out.append(("policy forward (Trainer)", per_step["forward+hook"] - per_step["hook"]))
        for p in ("policy KL", "reference"):
            rows_out.append((f"{p} (no grad)", per_step.get(p, 0.0)))
        rest = per_step["hook"] - per_step.get("policy KL", 0.0) - per_step.get("reference", 0.0)
        rows_out.append(("rest of the hook (policy log-probs, z0, loss, metrics)", rest))
    else:
        rows_out.append(("forward + loss", per_step["forward+hook"]))
    rows_out += [("backward", per_step.get("backward", 0.0)), ("optimizer", per_step.get("optimizer", 0.0))]
    for name, ms in rows_out:
        print(f"| {name} | {ms:.0f} | {ms / step_ms:.0%} |")
    print(f"| total | {step_ms:.0f} | 100% |")
    own = sorted((e for e in profiled.prof.key_averages() if e.key.startswith("aten::")),
                 key=lambda e: e.self_cpu_time_total, reverse=True)
    all_self = sum(e.self_cpu_time_total for e in profiled.prof.key_averages())
    print("\n| operator | self ms/step | share |")
    print("|---|---|---|")
    for e in own[: opts.top]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1e3 / opts.steps:.0f} | {e.self_cpu_time_total / all_self:.0%} |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
