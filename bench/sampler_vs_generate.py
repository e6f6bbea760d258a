"""Benchmark: the hand-written KV-cached sampler against transformers' model.generate (greedy).

Same prompts, same lengths, neither stops early (generate: min_new_tokens; ours: no stop id), runs interleaved
and repeated so that both see the same machine load; the ratio (ours / generate tokens per second) is what to
read.

Usage:
    python -m bench.sampler_vs_generate                      # batch 8, 32 x new tokens 64, 256
    python -m bench.sampler_vs_generate --batch-sizes 8 --max-new-tokens 64 --repeats 2
    python -m bench.sampler_vs_generate --check              # exit 1 if a ratio falls below 0.9
"""
import statistics
import sys
import time

import torch

from safesteer.cli import Parser, add_renamed, add_repeats, positive_int, run_cli
from safesteer.models import BUNDLED_MODEL
from safesteer.chat import encode_chats
from safesteer.files import data_file, read_prompts
from safesteer.models import load_model
from safesteer.sampling import sample


TARGET = 0.9  # ours / generate throughput, at every size


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--model", default=BUNDLED_MODEL,
                   help="'smollm2-135m' (bundled), a local transformers directory, or a hub id")
    add_renamed(p, "--batches", "--batch-sizes", type=positive_int, nargs="+", default=[8, 32],
                help="rows decoded together")
    add_renamed(p, "--lengths", "--max-new-tokens", type=positive_int, nargs="+",
                default=[64, 256], help="new tokens per row")
    add_repeats(p, 3, "interleaved runs of each (the median)")
    p.add_argument("--check", action="store_true", help=f"exit 1 if a ratio is below {TARGET}")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    model, tok = load_model(args.model, "cpu")
    prompts = read_prompts(data_file("harmless_train"))
    print(f"torch threads {torch.get_num_threads()}; greedy; tokens/s = batch x new tokens / wall time\n")
    print(f"{'batch':>5} {'new':>5} {'ours tok/s':>11} {'generate tok/s':>15} {'ratio':>6}")
    missed = []
    for b in args.batch_sizes:
        ids, mask = encode_chats(tok, prompts[:b])
        for n in args.max_new_tokens:
            ours_t, gen_t = [], []
            for _ in range(args.repeats):
                t = time.perf_counter()
                sample(model, ids, mask, n, temperature=0, stop_ids=[-1], pad_id=tok.pad_token_id)
                ours_t.append(time.perf_counter() - t)
                t = time.perf_counter()
                with torch.no_grad():
                    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, pad_token_id=tok.pad_token_id)
                gen_t.append(time.perf_counter() - t)
            ours, gen = b * n / statistics.median(ours_t), b * n / statistics.median(gen_t)
            print(f"{b:>5} {n:>5} {ours:>11.1f} {gen:>15.1f} {ours / gen:>6.2f}", flush=True)
            missed += [f"batch {b} x {n} tokens ({ours / gen:.2f})"] if ours / gen < TARGET else []
    if args.check and missed:
        sys.exit(f"ratio below {TARGET}: {', '.join(missed)}")


if __name__ == "__main__":
    run_cli(main)
