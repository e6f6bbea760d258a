"""Benchmark: what sampling.prefill saves, side by side, on the bundled model, and that nothing changes.

prefill runs each distinct prompt once (Stage 2 samples M = 8 continuations per prompt, Stage 3 G = 4) and the
template prefix all prompts share once (SmolLM2: a 24-token system turn). Compared here, each pair in one
process and interleaved over the repeats so that the box's drift hits both alike:

  teacher forcing  forcing.completion_logits without autograd (prefill + cache) against the plain forward
                   over prompt + completion (the same function with autograd on and every weight frozen: no
                   graph, the code path the student takes), at Stage 2's and Stage 3's shapes; max |logit
                   difference|
  greedy decoding  sample against transformers' generate (no shared prefix) at Stage 4's shape;
                   identical tokens expected
  sampling         sample at Stage 3's shape (8 prompts x 4 samples, 48 tokens), against generate
                   with the same rows (its draws differ: only the time is compared)

Usage:
    python -m bench.prefill --repeats 2
"""
import json
import statistics
import time

import torch

from safesteer.chat import encode_chats, stop_token_ids
from safesteer.cli import Parser, add_repeats, run_cli
from safesteer.files import data_file
from safesteer.models import BUNDLED_MODEL, load_model
from safesteer.sampling import sample
from safesteer import forcing


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv=None):
    p = Parser(__doc__)
    add_repeats(p, 2, "runs of each pair, interleaved (the best)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_model(BUNDLED_MODEL, "cpu")
    model.requires_grad_(False)
    lines = data_file("harmful_test").read_text().splitlines()
    prompts = [json.loads(line)["prompt"] for line in lines]
    stops, pad = stop_token_ids(tok), tok.pad_token_id

    print("teacher forcing (πt, π0 in Stages 2-4): plain forward vs prefill + cache")
    for name, n, g, t in (("Stage 2 batch: 4 prompts x 8, 8 tokens", 4, 8, 8),
                          ("Stage 3 micro-batch: 2 prompts x 4, 48 tokens", 2, 4, 48)):
        ids, mask = encode_chats(tok, [q for q in prompts[:n] for _ in range(g)])
        comp = torch.randint(100, 40_000, (n * g, t))
        plain, cached = [], []
        for _ in range(args.repeats):
            with torch.enable_grad():  # frozen weights: no graph, the plain path
                s, full = timed(lambda: forcing.completion_logits(model, ids, mask, comp))
            plain.append(s)
            with torch.no_grad():
                s, fast = timed(lambda: forcing.completion_logits(model, ids, mask, comp))
            cached.append(s)
        diff = (full - fast).abs().max().item()
        print(f"  {name}: {min(plain):.2f} s vs {min(cached):.2f} s, {min(plain) / min(cached):.2f}x; "
              f"max |logit difference| {diff:.1e}")

    kw = dict(stop_ids=stops, pad_id=pad)
    for name, rows, new, temp in (("greedy, Stage 4: 64 prompts, 64 tokens", prompts[:64], 64, 0.0),
                                  ("sampling, Stage 3: 8 prompts x 4, 48 tokens",
                                   [q for q in prompts[:8] for _ in range(4)], 48, 1.0)):
        ids, mask = encode_chats(tok, rows)
        ours, ref = [], []
        for _ in range(args.repeats):
            s, (a, _) = timed(lambda: sample(model, ids, mask, new, temperature=temp,
                                                      generator=torch.Generator().manual_seed(0), **kw))
            ours.append(s)
            gen_kw = (dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0) if temp
                      else dict(do_sample=False))
            s, b = timed(lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                                eos_token_id=stops, pad_token_id=pad, **gen_kw))
            ref.append(s)
        same = ""
        if not temp:
            b = b[:, ids.shape[1]:]
            width = min(a.shape[1], b.shape[1])
            same = f", identical tokens: {torch.equal(a[:, :width], b[:, :width])}"
        print(f"{name}: generate {min(ref):.1f} s vs sample {min(ours):.1f} s, "
              f"{min(ref) / min(ours):.2f}x{same}")


if __name__ == "__main__":
    run_cli(main)
