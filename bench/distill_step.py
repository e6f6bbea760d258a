"""Benchmark: one distillation step on the bundled model, by phase, and how it scales.

  phases   sampling, teacher forward, student forward, loss, backward, optimiser: seconds and share, for one
           row per sample, for the samples packed behind a tree mask (the demo's step), and packed without
           gradient checkpointing
  scaling  step time and peak RSS against completion length and completions per step

Each configuration runs in a fresh subprocess (peak RSS = resource.getrusage of that process, whole process,
model and optimiser included) for --steps steps after one warm-up step; the median step is reported. Sampling
never stops early (no stop token) so that every configuration generates exactly its length.

Usage:
    python -m bench.distill_step phases
    python -m bench.distill_step phases --steps 1 --repeats 2
        # interleaved, so the box's drift hits all alike
    python -m bench.distill_step phases --check   # exit 1 if the loss takes 5% of the step or more
    python -m bench.distill_step scaling --max-new-tokens 64 128 256 --completions 8 16 32
"""
import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys

import torch

from safesteer.cli import Parser, add_renamed, add_repeats, positive_int
from safesteer.files import data_file, read_prompts
from safesteer.models import load_model
from safesteer.teacher import Teacher
import distill


def child(cfg):
    student, tok = load_model("smollm2-135m", "cpu", dtype=torch.float32)
    frozen = copy.deepcopy(student).requires_grad_(False).eval()
    vec = torch.randn(student.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 20
    teacher, base = Teacher(frozen, "hook", vec, 18), Teacher(frozen, "base")
    if cfg["checkpointing"]:
        student.activation_checkpointing_enable()
    s_ids = torch.arange(1000, 1050)
    prompts = read_prompts(data_file("harmful_train"))
    anchors = read_prompts(data_file("harmless_train"))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    gen = torch.Generator().manual_seed(0)
    distill.stop_token_ids = lambda tok: [-1]  # never stop: every row generates exactly `length` tokens
    recipe = distill.Recipe(loss="collapsed", samples=cfg["samples"], max_new_tokens=cfg["length"],
                            micro_batch=cfg["micro_batch"], pack=cfg["pack"])
    loop = distill.Loop(opt, sched, gen=gen)
    recs = []
    for step in range(cfg["steps"] + 1):
        ps = prompts[step * cfg["prompts"]:(step + 1) * cfg["prompts"]]
        anc = anchors[step * cfg["anchors"]:(step + 1) * cfg["anchors"]]
        recs.append(distill.train_step(student, tok, ps, anc, (teacher, base), s_ids, recipe, loop))
    recs = recs[1:]  # the first step warms up allocators and caches
    phases = {k: statistics.median(r["seconds"][k] for r in recs) for k in recs[0]["seconds"]}
    print(json.dumps({"phases": phases, "step": statistics.median(r["step_seconds"] for r in recs),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run(cfg):
    out = subprocess.run([sys.executable, "-m", __spec__.name, "child", "--cfg", json.dumps(cfg)],
                         capture_output=True, text=True)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("what", choices=["phases", "scaling", "child"],
                   help="phases: one step by phase; scaling: step time against length and completions")
    p.add_argument("--cfg", help=argparse.SUPPRESS)  # child: the configuration to run, as JSON
    p.add_argument("--steps", type=positive_int, default=2,
                   help="measured steps after the warm-up step")
    add_renamed(p, "--lengths", "--max-new-tokens", type=positive_int, nargs="+",
                default=[64, 128, 256], help="scaling: completion lengths")
    p.add_argument("--completions", type=positive_int, nargs="+", default=[8, 16, 32],
                   help="scaling: completions per step (prompts x samples, 4 samples per prompt)")
    p.add_argument("--micro-batch", type=positive_int, default=8,
                   help="sequences per forward/backward")
    add_repeats(p, 1, "phases: runs of each configuration, interleaved")
    p.add_argument("--check", action="store_true",
                   help="phases: exit 1 if the loss takes 5%% of a step or more")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    if a.what == "child":
        return child(json.loads(a.cfg))
    base = {"steps": a.steps, "micro_batch": a.micro_batch, "prompts": 4, "anchors": 4, "samples": 4,
            "length": 48}
    if a.what == "phases":
        print("the demo's step: 4 harmful + 4 anchor prompts x 4 samples x 48 new tokens, micro-batch",
              a.micro_batch, f"; configurations interleaved, median of {a.repeats} runs\n")
        configs = {"one row per sample": (True, False), "packed (the demo's step)": (True, True),
                   "packed, no gradient checkpointing": (False, True)}
        results = {name: [] for name in configs}
        for _ in range(a.repeats):  # interleaved, so that the box's drift hits every configuration alike
            for name, (ck, pack) in configs.items():
                results[name].append(run({**base, "checkpointing": ck, "pack": pack}))
        first = None
        for name, rs in results.items():
            rs = [r for r in rs if "error" not in r]
            if not rs:
                print(f"{name}: failed: {results[name][0]['error']}")
                continue
            total = statistics.median(r["step"] for r in rs)
            first = first or total
            print(f"{name}: {total:.1f} s/step ({first / total:.2f}x the first), peak RSS "
                  f"{max(r['peak_rss_mb'] for r in rs):.0f} MB")
            for k in rs[0]["phases"]:
                v = statistics.median(r["phases"][k] for r in rs)
                print(f"  {k:<16} {v:>6.2f} s  {v / total:>6.1%}")
            if a.check and statistics.median(r["phases"]["loss"] for r in rs) >= 0.05 * total:
                sys.exit("the loss takes 5% of a step or more (target < 5%)")
        return
    print(f"{'length':>6} {'completions':>11} {'s/step':>7} {'s per 1k tokens':>16} {'peak RSS MB':>12}")
    for length in a.max_new_tokens:
        for n in a.completions:
            r = run({**base, "length": length, "samples": n // 4, "anchors": 0, "checkpointing": True,
                     "pack": True})
            if "error" in r:
                print(f"{length:>6} {n:>11} failed: {r['error']}")
                continue
            print(f"{length:>6} {n:>11} {r['step']:>7.1f} {1000 * r['step'] / (length * n):>16.2f} "
                  f"{r['peak_rss_mb']:>12.0f}", flush=True)


if __name__ == "__main__":
    main()
