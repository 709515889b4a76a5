"""Peak RSS of one training step for each way of holding the reference: kto_plugin and TRL 1.16 side by side.

Every (case, side) runs in its own fresh process, so one peak cannot hide another. A process builds the
tokenizer, rows and policy, notes its RSS ("baseline": Python, torch, the data and the policy, no reference),
builds the reference and the trainer (for precompute: the pass over the data), runs one optimizer step (AdamW)
and reports its peak RSS (`ru_maxrss`). Large blocks are served by mmap and returned on free
(``MALLOC_MMAP_THRESHOLD_``), so the peak is live memory and repeats agree to 1 MiB. Same model for all: Llama
from a config, hidden 256, 4 layers, vocab 32,000 (18.7 M parameters, 71 MiB in float32), per-device batch 8,
HH-RLHF dialogues of 240-400 tokens, fp32, 2 CPU threads.

    python benchmarks/bench_reference.py [--threads 2] [--cases 1,2,3,4,7] [--no-trl]

Cases (issue #4's numbering):
  1  full fine-tuning, separate ref_model
  2  full fine-tuning, ref_model=None: a frozen copy of the initial policy
  3  LoRA (r=16 on q/v), null reference: the base model with the adapter off
  4  LoRA that already has trained weights: a frozen copy of the adapter ("ref", as TRL)
  7  full fine-tuning, precompute_ref_log_probs=True: no reference model at all
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

CASES = {
    "1": "full FT, separate ref_model",
    "2": "full FT, frozen copy (ref_model=None)",
    "3": "LoRA, null reference (adapter off)",
    "4": "LoRA with trained weights, frozen adapter copy",
    "7": "full FT, precompute_ref_log_probs",
}
MODEL = dict(hidden_size=256, num_layers=4, num_heads=4)
VOCAB, BATCH, MAX_LENGTH, ROWS = 32_000, 8, 512, 16


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rows(tok, n):
    from kto_plugin.demo import hh_unpaired_rows

    out = []
    for row in hh_unpaired_rows():
        if 240 <= len(tok(row["prompt"] + row["completion"])["input_ids"]) <= 400:
            out.append(row)
        if len(out) == n:
            return out
    return out


def _lora(trained: bool):
    from peft import LoraConfig

    return LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        init_lora_weights=not trained,
    )


def child(case: str, side: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from kto_plugin import KTOConfig, KTOPlugin
    from kto_plugin.demo import build_tiny_model, build_tokenizer

    tok = build_tokenizer(vocab_size=8192)
    rows = _rows(tok, ROWS)
    model = build_tiny_model(VOCAB, seed=0, **MODEL)
    out = tempfile.mkdtemp()
    if case == "2" and side == "trl":  # TRL builds this reference from the model's path
        model.save_pretrained(os.path.join(out, "model"))
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "model"))
    baseline = _rss_mb()  # the policy and the data, no reference
    ref_model = peft_config = None
    if case == "1":
        ref_model = build_tiny_model(VOCAB, seed=1, **MODEL)
    if case == "3":
        if side == "trl":
            peft_config = _lora(False)
        else:
            torch.manual_seed(0)
            model = get_peft_model(model, _lora(False))
    if case == "4":
        torch.manual_seed(0)
        model = get_peft_model(model, _lora(True))
    args = dict(
        output_dir=out,
        per_device_train_batch_size=BATCH,
        max_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        train_sampling_strategy="sequential",
        learning_rate=1e-6,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
    )
    precompute = case == "7"
    start = time.perf_counter()
    if side == "ours":
        kto = KTOPlugin(
            KTOConfig(max_length=MAX_LENGTH, precompute_ref_log_probs=precompute, precompute_cache=False),
            tokenizer=tok,
            ref_model=ref_model,
        )
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**args),
            train_dataset=kto.prepare_dataset(rows),
            data_collator=kto.collator,
        )
        kto.attach(trainer)
        reference = kto.reference.describe()
    else:
        from trl import KTOConfig as TRLKTOConfig
        from trl import KTOTrainer

        trainer = KTOTrainer(
            model=model,
            ref_model=ref_model,
            peft_config=peft_config,
            processing_class=tok,
            args=TRLKTOConfig(
                **args,
                max_length=MAX_LENGTH,
                precompute_ref_log_probs=precompute,
                gradient_checkpointing=False,
            ),
            train_dataset=Dataset.from_list(rows),
        )
        reference = "ref_model" if trainer.ref_model is not None else "none (adapter / precomputed)"
    del ref_model
    trainer.train()
    return {
        "case": case,
        "side": side,
        "baseline_mb": baseline,
        "peak_mb": _peak_mb(),
        "seconds": time.perf_counter() - start,
        "reference": reference,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "SIDE"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        print(json.dumps(child(*opts.child, threads=opts.threads)))
        return
    sides = ["ours"] + ([] if opts.no_trl else ["trl"])
    # glibc keeps freed blocks (and grows its mmap threshold), so the same run's peak varied by +-100 MiB;
    # serving every block over 64 KiB with mmap, returned on free, makes the peak the live memory (+-1 MiB)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}
    results = {}
    for case in opts.cases.split(","):
        for side in sides:
            proc = subprocess.run(
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--child",
                    case,
                    side,
                    "--threads",
                    str(opts.threads),
                ],
                capture_output=True,
                text=True,
                env=env,
            )
            if proc.returncode != 0:
                raise SystemExit(f"case {case} ({side}) failed:\n{proc.stderr[-4000:]}")
            results[case, side] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"# case {case} {side}: {results[case, side]}", file=sys.stderr)
    print(f"peak RSS of one training step (MiB), per-device batch {BATCH}, {opts.threads} threads\n")
    head = "| case | how the reference is held | kto_plugin peak | over baseline |"
    rule = "|---|---|---:|---:|"
    if not opts.no_trl:
        head += " TRL 1.16 peak | over baseline | kto_plugin / TRL (over baseline) |"
        rule += "---:|---:|---:|"
    print(head)
    print(rule)
    for case in opts.cases.split(","):
        ours = results[case, "ours"]
        line = (
            f"| {case} | {CASES[case]} | {ours['peak_mb']:.0f} | "
            f"{ours['peak_mb'] - ours['baseline_mb']:.0f} |"
        )
        if not opts.no_trl:
            trl = results[case, "trl"]
            ours_over, trl_over = ours["peak_mb"] - ours["baseline_mb"], trl["peak_mb"] - trl["baseline_mb"]
            line += f" {trl['peak_mb']:.0f} | {trl_over:.0f} | {ours_over / trl_over:.2f} |"
        print(line)


if __name__ == "__main__":
    main()
