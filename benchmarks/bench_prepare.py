"""Dataset preparation time: TRL 1.16's `KTOTrainer` and `KTOPlugin.prepare_dataset` on the same paired data.

Data: the 2,312 implicit-prompt pairs ``{chosen, rejected}`` of real dialogue shipped in
`kto_plugin/data/hh_rlhf_harmless_base_test.jsonl.gz` (HH-RLHF harmless-base test), optionally repeated.
Both sides start from the same in-memory `datasets.Dataset` (so neither is served from a cache) and the same
tokenizer (the byte-level BPE of `kto_plugin.demo.build_tokenizer`, 8,192 tokens), and produce the same
unpaired rows: the script checks that the token ids are identical. TRL's side is its `_prepare_dataset`
(prompt extraction, unpairing, EOS, tokenization, the max_length filter, KL partners), called on a trainer
built once beforehand, so model set-up is not timed. Sides alternate within one process, `--rounds` times;
medians are printed.

    python benchmarks/bench_prepare.py [--rounds 5] [--num-proc 1] [--repeat 1] [--tokenizer-threads 1]

`--tokenizer-threads 1` (default) sets TOKENIZERS_PARALLELISM=false, so batched encoding uses one core: one
process, one core, like TRL's row-by-row encoding. 0 lets the fast tokenizer use every core.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--num-proc", type=int, default=1, help="dataset_num_proc of both sides")
    parser.add_argument("--repeat", type=int, default=1, help="repeat the 2,312 pairs this many times")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--tokenizer-threads", type=int, default=1, choices=(0, 1))
    args = parser.parse_args()
    if args.tokenizer_threads == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("KTO_PLUGIN_DISABLE_AUTOLOAD", "1")

    import datasets
    import transformers
    from datasets import Dataset
    from trl import KTOConfig as TRLKTOConfig
    from trl import KTOTrainer

    from kto_plugin import KTOConfig, KTOPlugin
    from kto_plugin.demo import build_tiny_model, build_tokenizer, load_hh_pairs

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    import logging

    logging.getLogger("kto_plugin").setLevel(logging.ERROR)
    num_proc = None if args.num_proc == 1 else args.num_proc
    pairs = load_hh_pairs() * args.repeat
    tok = build_tokenizer(vocab_size=8192)

    model = build_tiny_model(len(tok), hidden_size=16, num_layers=1, num_heads=2)
    with tempfile.TemporaryDirectory() as out:
        trl_args = TRLKTOConfig(output_dir=out, max_length=args.max_length, per_device_train_batch_size=8,
                                dataset_num_proc=num_proc, report_to="none", use_cpu=True, bf16=False,
                                gradient_checkpointing=False)
        trainer = KTOTrainer(model=model, ref_model=build_tiny_model(len(tok), hidden_size=16, num_layers=1,
                                                                     num_heads=2), args=trl_args,
                             train_dataset=Dataset.from_list(pairs[:8]), processing_class=tok)
    kto = KTOPlugin(KTOConfig(max_length=args.max_length, dataset_num_proc=num_proc), tokenizer=tok)

    def run_trl(data):
        return trainer._prepare_dataset(data, tok, trl_args, "train")

    def run_ours(data):
        return kto.prepare_dataset(data)

    times = {"TRL 1.16 KTOTrainer": [], "kto_plugin prepare_dataset": []}
    sides = list(zip(times, (run_trl, run_ours)))
    results = {}
    for r in range(args.rounds):
        for name, fn in sides if r % 2 == 0 else sides[::-1]:
            data = Dataset.from_list(pairs)  # fresh, in memory: no cache for either side
            start = time.perf_counter()
            results[name] = fn(data)
            times[name].append(time.perf_counter() - start)
        print(f"round {r + 1}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), flush=True)

    theirs, ours = results["TRL 1.16 KTOTrainer"], results["kto_plugin prepare_dataset"]
    def rows(d):
        return list(zip(map(tuple, d["prompt_ids"]), map(tuple, d["completion_ids"]), d["label"]))

    # with num_proc > 1 TRL unpairs each shard separately, so its row order depends on the shards; ours does not
    same = rows(theirs) == rows(ours) if num_proc is None else sorted(rows(theirs)) == sorted(rows(ours))
    if not same:
        sys.exit("token ids differ between TRL and kto_plugin")
    trl_t = statistics.median(times["TRL 1.16 KTOTrainer"])
    our_t = statistics.median(times["kto_plugin prepare_dataset"])
    identical = "token ids identical" + ("" if num_proc is None else ", as a multiset")
    threads = "1" if args.tokenizer_threads == 1 else "all"
    print(f"{len(pairs)} implicit-prompt pairs -> {len(ours)} rows ({identical}), num_proc={args.num_proc}, "
          f"tokenizer threads={threads}, median of {args.rounds}:")
    print(f"  TRL 1.16 KTOTrainer        {trl_t:6.2f} s")
    print(f"  kto_plugin prepare_dataset {our_t:6.2f} s")
    print(f"  ratio (TRL / kto_plugin)   {trl_t / our_t:6.1f}x")


if __name__ == "__main__":
    main()
