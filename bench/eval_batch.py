"""Benchmark: Stage 4's greedy evaluation at several batch sizes, side by side, and whether the answers
change.

Greedy decoding of the same prompts with left padding should give the same tokens whatever the batch (the
attention mask hides the padding, RoPE positions skip it); this checks it on the bundled model and measures
what a larger batch buys on this CPU. Batch sizes are interleaved over the repeats, so the box's drift hits
all alike.

Usage:
    python -m bench.eval_batch --n-prompts 64 --max-new-tokens 64 --batch-sizes 16 32 64 --repeats 2
    python -m bench.eval_batch --splits harmful_test harmless_test harmful_reform_test harmless_reform_test \
        --n-prompts 360 --batch-sizes 128 512 --repeats 1      # the demo's Stage 4: its splits in one batch
"""
import contextlib
import statistics
import time

import torch

from safesteer.cli import Parser, add_renamed, add_repeats, positive_int
from safesteer.files import data_file, read_prompts
from safesteer.models import load_model
import evaluate


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--splits", nargs="+", default=["harmful_test"],
                   help="data/ files, pooled as Stage 4 pools them")
    add_renamed(p, "--prompts", "--n-prompts", type=positive_int, default=64,
                help="the first N prompts of the pooled splits")
    add_renamed(p, "--tokens", "--max-new-tokens", type=positive_int, default=64,
                help="greedy new tokens per answer (Stage 4's default)")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[16, 32, 64],
                   help="batch sizes compared; the answers of each are checked against the first's")
    add_repeats(p, 2, "runs of each batch size, interleaved")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    model, tok = load_model("smollm2-135m", torch.device("cpu"))
    prompts = [p for s in args.splits for p in read_prompts(data_file(s))][:args.n_prompts]
    seconds, texts = {b: [] for b in args.batch_sizes}, {}
    for _ in range(args.repeats):
        for b in args.batch_sizes:
            t = time.perf_counter()
            out, _ = evaluate.greedy(model, tok, prompts, args.max_new_tokens, b, contextlib.nullcontext,
                                     f"batch {b}")
            seconds[b].append(time.perf_counter() - t)
            texts.setdefault(b, out)
    ref = args.batch_sizes[0]
    print(f"{args.n_prompts} prompts x {args.max_new_tokens} greedy tokens, "
          f"{torch.get_num_threads()} threads")
    for b in args.batch_sizes:
        med = statistics.median(seconds[b])
        differ = sum(x != y for x, y in zip(texts[b], texts[ref]))
        print(f"batch {b:>3}: {med:6.1f} s  ({statistics.median(seconds[ref]) / med:.2f}x batch {ref}); "
              f"answers differing from batch {ref}: {differ} of {len(prompts)}")


if __name__ == "__main__":
    main()
