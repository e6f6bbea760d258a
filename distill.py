"""Stage 3 of SafeSteer: localized on-policy distillation, written out by hand.

The student πs starts as π0 and is trained; the teacher πt is a frozen copy of π0 with Stage 1's hook. Each
optimiser step, the student *samples* G completions for each of P harmful prompts (on-policy: it learns on its
own text), then teacher and student score prompt + completion, and at every completion position t, with
p = πs(·|x, y<t), q = πt(·|x, y<t), S the safety tokens of Stage 2 and R = V \\ S:

    collapsed (ours, default)  Σ_{v∈S} p(v) log p(v)/q(v)  +  p(R) log p(R)/q(R)
                               the reverse KL between the coarse distributions over S ∪ {R}: >= 0, zero exactly
                               when p matches q on each token of S; how mass is split *inside* R gets no gradient
    partial (authors' code)    Σ_{v∈S} p(v) [log p(v) - log q(v)]     (not a divergence: min at p(v) = q(v)/e)
    full (baseline)            Σ_{v∈V} p(v) log p(v)/q(v)             (global on-policy distillation)

The loss covers completion positions through the first end-of-turn token, averaged per sequence, then over
sequences. Each loss is a torch.autograd.Function with its closed-form gradient p_u (a_u - ā) written by hand:
`collapsed` and `partial` need only a logsumexp and the |S| gathered columns, `full` works in chunks of positions,
so no [positions, V] temporary exists besides the logits' gradient itself (bench/loss_memory.py measures it).

Anchoring (ours, --anchor FILE): each step the student also samples answers to a few harmless prompts, and those
are pulled toward the *unsteered* π0 with the same loss on S and weight λ. S is then taught "refuse here" and
"stay as you were there" side by side; from harmful prompts alone it learns the teacher's over-refusal too.

Reads   OUT/direction.safetensors + .json (Stage 1), OUT/safety_tokens.json (Stage 2), data/harmful_train
Writes  OUT/student/   a transformers model directory (AutoModelForCausalLM.from_pretrained loads it), with
                       safesteer.json (loss, S, direction, arguments) and train_log.jsonl (one line per step)
        OUT/student.work/   checkpoints while training (removed when the run completes)

Usage:
    python distill.py --out runs/demo
    python distill.py --out runs/demo --loss full --student full --max-new-tokens 48 --samples 4
    python distill.py --out runs/demo --student anchored --anchor data/harmless_train.jsonl --anchor-weight 0.5
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import random
import resource
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common import (HelpFormatter, UserError, add_common_args, add_vector, check_positive, completion_logits, data_file,
                    decode_completions, encode_chats, is_refusal, load_direction, load_json, load_model,
                    pick_device, read_prompts, run_cli, run_info, sample, save_model_dir, seed_everything,
                    special_token_ids, stop_token_ids, tokenizer_fingerprint, truncate_prompts, write_jsonl)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common_args(p)
    p.add_argument("--direction", help="Stage 1's direction.safetensors (default: OUT/direction.safetensors)")
    p.add_argument("--tokens", help="Stage 2's safety_tokens.json (default: OUT/safety_tokens.json)")
    p.add_argument("--coefficient", type=float, help="c of the teacher hook (default: from direction.json)")
    p.add_argument("--prompts", default=str(data_file("harmful_train")), help="distillation prompts (paper: 100)")
    p.add_argument("--loss", choices=["collapsed", "partial", "full"], default="collapsed")
    p.add_argument("--random-tokens", action="store_true", help="replace S by a seeded random set of the same size")
    p.add_argument("--anchor", help="harmless prompts whose samples are pulled toward the unsteered π0 on S (ours)")
    p.add_argument("--anchor-per-step", type=int, default=2, help="anchor prompts per step (with --anchor)")
    p.add_argument("--anchor-weight", type=float, default=0.5, help="λ: loss = L(harmful, πt) + λ·L(anchor, π0)")
    p.add_argument("--student", default="student", help="name of the student directory inside --out")
    p.add_argument("--epochs", type=int, default=1, help="passes over the prompts (paper: 1)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    p.add_argument("--prompts-per-step", type=int, default=4, help="P (paper: 4)")
    p.add_argument("--samples", type=int, default=8, help="G completions per prompt (paper: 8)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion length (paper: 512; CPU: small)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (paper: 1e-5 Qwen, 1e-6 Llama)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps of linear warm-up")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward (accumulated)")
    p.add_argument("--no-grad-checkpointing", action="store_true", help="keep activations (faster, more memory)")
    p.add_argument("--checkpoint-every", type=int, default=5, help="save a resumable checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from OUT/STUDENT.work/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    for name in ("epochs", "prompts_per_step", "samples", "max_new_tokens", "lr", "micro_batch", "checkpoint_every",
                 "max_steps", "clip", "anchor_per_step"):
        check_positive(f"--{name.replace('_', '-')}", getattr(args, name))
    check_positive("--temperature", args.temperature, allow_zero=True)
    check_positive("--anchor-weight", args.anchor_weight, allow_zero=True)
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    return args


# ----------------------------------------------------------------------------- the losses

def log_probs_on_s(logits: torch.Tensor, s_ids: torch.Tensor, chunk: int = 256):
    """log π(v) for v ∈ S and log π(R), from a logsumexp and a gather. [n, V] -> [n, |S|], [n].

    The logsumexp runs over chunks of positions, so its exp() temporary is [chunk, V], not [n, V].
    π(R) = 1 - Σ_S π(v) is formed in float64; it is resolved to about 1e-6 (float32 logits), below which
    its terms are negligible and are clamped."""
    lse = torch.cat([torch.logsumexp(logits[i:i + chunk], dim=-1) for i in range(0, logits.shape[0], chunk)])
    log_s = (logits.gather(-1, s_ids.expand(logits.shape[0], -1)) - lse[:, None]).double()  # [n, |S|]
    log_rest = torch.log((1 - log_s.exp().sum(-1)).clamp_min(1e-12))  # [n]
    return log_s, log_rest, lse


class LocalizedKL(torch.autograd.Function):
    """Per-position loss on S (and R) with a hand-written backward, so no [n, V] temporaries besides the gradient.

    Forward (p = softmax(z) of the student, q of the teacher, both known only through lse and |S| columns):
        L = Σ_{v∈S} p_v log(p_v/q_v)  [+ p_R log(p_R/q_R) if with_rest]
    Backward: with a_v = ∂L/∂p_v = log(p_v/q_v) + 1 on S, a_R = log(p_R/q_R) + 1 (0 without R) for every
    token of R, and ā = Σ_S p_v a_v + p_R a_R, the softmax Jacobian gives
        ∂L/∂z_u = p_u (a_u - ā)
    written into one [n, V] buffer chunk by chunk: p = exp(z - lse), scaled by (a_R - ā), S columns overwritten.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, s_ids, with_rest: bool, chunk: int):
        lp, lp_r, lse = log_probs_on_s(student_logits, s_ids, chunk)
        lq, lq_r, _ = log_probs_on_s(teacher_logits, s_ids, chunk)
        p = lp.exp()
        loss = (p * (lp - lq)).sum(-1)
        a = lp - lq + 1
        if with_rest:
            p_r = lp_r.exp()
            loss = loss + p_r * (lp_r - lq_r)
            a_r = lp_r - lq_r + 1
        else:
            p_r, a_r = torch.zeros_like(lp_r), torch.zeros_like(lp_r)
        a_bar = (p * a).sum(-1) + p_r * a_r
        ctx.save_for_backward(student_logits, lse, s_ids, p, a, a_r, a_bar)
        ctx.chunk = chunk
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        z, lse, s_ids, p, a, a_r, a_bar = ctx.saved_tensors
        g = grad_out.to(a.dtype)
        grad = torch.empty_like(z)
        scale_r = ((a_r - a_bar) * g).to(z.dtype)[:, None]  # every token of R: p_u (a_R - ā) g
        grad_s = (p * (a - a_bar[:, None]) * g[:, None]).to(z.dtype)  # tokens of S: p_v (a_v - ā) g
        for i in range(0, z.shape[0], ctx.chunk):
            j = min(i + ctx.chunk, z.shape[0])
            buf = grad[i:j]
            torch.sub(z[i:j], lse[i:j, None], out=buf).exp_().mul_(scale_r[i:j])
            buf.scatter_(-1, s_ids.expand(j - i, -1), grad_s[i:j])
        return grad, None, None, None, None


def collapsed_kl(student_logits, teacher_logits, s_ids, chunk: int = 256) -> torch.Tensor:
    """Reverse KL over the coarse distribution S ∪ {R}, per position: [n, V] x 2 -> [n]."""
    return LocalizedKL.apply(student_logits, teacher_logits.detach(), s_ids, True, chunk)


def partial_kl(student_logits, teacher_logits, s_ids, chunk: int = 256) -> torch.Tensor:
    """Authors' loss: Σ_{v∈S} p(v) [log p(v) - log q(v)] per position, p and q normalised over V. [n]."""
    return LocalizedKL.apply(student_logits, teacher_logits.detach(), s_ids, False, chunk)


class FullKL(torch.autograd.Function):
    """Ordinary reverse KL over all of V per position, in chunks of positions, with a hand-written backward.

    With a_u = log(p_u/q_u) + 1 and ā = Σ_u p_u a_u = KL + 1, the softmax Jacobian gives
        ∂KL/∂z_u = p_u (log(p_u/q_u) - KL)
    recomputed chunk by chunk from the saved logsumexps, so only [chunk, V] temporaries exist besides the gradient.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, chunk: int):
        losses, lse_p, lse_q = [], [], []
        for i in range(0, student_logits.shape[0], chunk):
            z, t = student_logits[i:i + chunk], teacher_logits[i:i + chunk]
            lse_p.append(torch.logsumexp(z, -1, keepdim=True))
            lse_q.append(torch.logsumexp(t, -1, keepdim=True))
            lp, lq = z - lse_p[-1], t - lse_q[-1]
            losses.append((lp.exp() * (lp - lq)).sum(-1))
        loss = torch.cat(losses)
        ctx.save_for_backward(student_logits, teacher_logits, torch.cat(lse_p), torch.cat(lse_q), loss)
        ctx.chunk = chunk
        return loss.double()

    @staticmethod
    def backward(ctx, grad_out):
        z, t, lse_p, lse_q, loss = ctx.saved_tensors
        g = grad_out.to(z.dtype)
        grad = torch.empty_like(z)
        for i in range(0, z.shape[0], ctx.chunk):
            sl = slice(i, i + ctx.chunk)
            lp = z[sl] - lse_p[sl]
            lr = lp - (t[sl] - lse_q[sl])  # log p/q
            torch.sub(lr, loss[sl, None], out=grad[sl]).mul_(lp.exp_()).mul_(g[sl, None])
        return grad, None, None


def full_kl(student_logits, teacher_logits, s_ids=None, chunk: int = 128) -> torch.Tensor:
    """Ordinary reverse KL over all of V per position (S is ignored). [n, V] x 2 -> [n]."""
    return FullKL.apply(student_logits, teacher_logits.detach(), chunk)


LOSSES = {"collapsed": collapsed_kl, "partial": partial_kl, "full": full_kl}


def localized_reverse_kl(student_logits, teacher_logits, mask, s_ids, kind: str = "collapsed") -> torch.Tensor:
    """The training loss: per-position loss on completion positions, mean per sequence, mean over sequences.

    student_logits, teacher_logits: [b, T, V]; mask: [b, T] (1 through the first end token). Returns a scalar.
    Positions outside the mask are computed (the [b*T, V] view needs no copy) and then weighted by zero.
    """
    b, t, v = student_logits.shape
    per_pos = LOSSES[kind](student_logits.reshape(b * t, v), teacher_logits.reshape(b * t, v), s_ids).view(b, t)
    m = mask.to(per_pos.dtype)
    per_seq = (per_pos * m).sum(-1) / m.sum(-1).clamp_min(1)
    return per_seq.mean()


# ----------------------------------------------------------------------------- S and the teacher

def load_safety_tokens(path: Path, tok, model, random_tokens: bool, seed: int) -> tuple[torch.Tensor, dict]:
    """S from Stage 2, refused if it was made for another tokenizer; or a random set of the same size."""
    meta = load_json(path)
    ids = meta.get("token_ids")
    if not isinstance(ids, list) or not ids:
        raise UserError(f"{path}: no token_ids")
    if meta.get("vocab_size") != len(tok) or meta.get("tokenizer_fingerprint") != tokenizer_fingerprint(tok):
        raise UserError(f"{path}: made for another tokenizer (vocabulary size {meta.get('vocab_size')} vs "
                        f"{len(tok)}, or fingerprint differs)")
    if max(ids) >= model.config.vocab_size or min(ids) < 0:
        raise UserError(f"{path}: token id {max(ids)} is outside the model's vocabulary of {model.config.vocab_size}")
    if random_tokens:  # the ablation: same |S|, tokens drawn at random from the non-special vocabulary
        special = set(special_token_ids(tok))
        pool = [i for i in range(len(tok)) if i not in special]
        ids = sorted(random.Random(seed).sample(pool, len(ids)))
    return torch.tensor(ids, dtype=torch.long), meta


# ----------------------------------------------------------------------------- one optimiser step

def train_step(student, teacher, tok, prompts, s_ids, args, gen, opt, sched, hook, anchor_prompts=()) -> dict:
    """Sample (student, no grad) -> score (teacher, no grad) -> loss and backward (student) -> update.

    With anchor prompts (harmless, ours) the student also samples answers to them, and those are pulled toward
    the *unsteered* π0 on S with weight λ: loss = L(harmful samples, πt) + λ·L(anchor samples, π0)."""
    device = next(student.parameters()).device
    timer = {}
    t = time.time()
    rows = [p for p in prompts for _ in range(args.samples)]
    anchor_rows = [p for p in anchor_prompts for _ in range(args.samples)]
    ids, mask = encode_chats(tok, rows + anchor_rows, device=device)
    student.eval()  # eval mode: gradient checkpointing is inactive and the KV cache is used while sampling
    comp, comp_mask = sample(student, ids, mask, args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, generator=gen, stop_ids=stop_token_ids(tok), pad_id=tok.pad_token_id)
    timer["sample"] = time.time() - t
    texts = decode_completions(tok, comp, comp_mask)

    student.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    stats = {"loss": 0.0, "collapsed": 0.0, "partial": 0.0, "full": 0.0}
    timer.update(teacher=0.0, student_forward=0.0, loss=0.0, backward=0.0, diagnostics=0.0)
    n, n_a = len(rows), len(anchor_rows)
    # (is anchor, first row, rows, teacher context, weight): harmful rows -> πt = π0 + c·r, anchor rows -> π0 itself
    groups = [(False, 0, n, hook, 1.0)]
    if n_a:
        stats["anchor_loss"] = 0.0
        groups.append((True, n, n_a, contextlib.nullcontext, args.anchor_weight))
    for is_anchor, first, count, teacher_ctx, weight in groups:
        for i in range(first, first + count, args.micro_batch):  # gradient accumulation over micro-batches
            sl = slice(i, min(i + args.micro_batch, first + count))
            t = time.time()
            with torch.no_grad(), autocast, teacher_ctx():
                lt = completion_logits(teacher, ids[sl], mask[sl], comp[sl]).float()  # [b, T, V]
            timer["teacher"] += time.time() - t
            t = time.time()
            with autocast:
                ls = completion_logits(student, ids[sl], mask[sl], comp[sl]).float()
            timer["student_forward"] += time.time() - t
            t = time.time()
            frac = ls.shape[0] / count  # each micro-batch holds this share of its group's sequences
            loss = localized_reverse_kl(ls, lt, comp_mask[sl], s_ids, args.loss) * frac
            timer["loss"] += time.time() - t
            t = time.time()
            (loss * weight).backward()
            timer["backward"] += time.time() - t
            t = time.time()
            with torch.no_grad():  # diagnostics: every loss on the same batch (harmful rows only)
                stats["loss"] += loss.item() * weight
                if is_anchor:
                    stats["anchor_loss"] += loss.item()
                else:
                    for kind in ("collapsed", "partial", "full"):
                        stats[kind] += localized_reverse_kl(ls, lt, comp_mask[sl], s_ids, kind).item() * frac
            timer["diagnostics"] += time.time() - t
    if not math.isfinite(stats["loss"]):
        raise UserError(f"the loss became {stats['loss']}; stopping (the last checkpoint is kept)")
    t = time.time()
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.clip).item()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    timer["optimizer"] = time.time() - t
    new_tokens = int(comp_mask.sum())
    rec = {**stats, "grad_norm": grad_norm, "lr": sched.get_last_lr()[0],
           "sampled_refusal": sum(map(is_refusal, texts[:n])) / n,
           "mean_completion_tokens": new_tokens / len(texts), "sample_tokens_per_s": new_tokens / timer["sample"],
           "seconds": {k: round(v, 3) for k, v in timer.items()}, "step_seconds": round(sum(timer.values()), 3),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "example": texts[0][:200]}
    if n_a:  # how often the student refuses the harmless anchor prompts it samples: over-refusal as it trains
        rec["anchor_refusal"] = sum(map(is_refusal, texts[n:])) / n_a
    return rec


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, student, opt, sched, step: int, gen, log: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": student.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step,
                "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "py_rng": random.getstate(),
                "log": log}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, student, opt, sched, gen):
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path}")
    ck = torch.load(path, weights_only=False)
    student.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    sched.load_state_dict(ck["sched"])
    gen.set_state(ck["gen"])
    torch.set_rng_state(ck["torch_rng"])
    random.setstate(ck["py_rng"])
    return ck["step"], ck["log"]


def step_prompts(prompts: list[str], per_step: int, epochs: int, seed: int) -> list[list[str]]:
    """The prompts of every step: a seeded shuffle per epoch, cut into groups of P (the last may be short)."""
    steps = []
    for epoch in range(epochs):
        order = prompts[:]
        random.Random(seed * 1000 + epoch).shuffle(order)
        steps += [order[i:i + per_step] for i in range(0, len(order), per_step)]
    return steps


# ----------------------------------------------------------------------------- main

def main(argv=None):
    from transformers import get_cosine_schedule_with_warmup
    args = parse_args(argv)
    out = Path(args.out)
    final_dir, work = out / args.student, out / f"{args.student}.work"
    if final_dir.exists() and not args.overwrite:
        raise UserError(f"{final_dir} already exists; pass --overwrite to replace it")
    if work.exists() and not args.resume:
        if not args.overwrite:
            raise UserError(f"{work} holds an unfinished run; pass --resume to continue it or --overwrite to restart")
        shutil.rmtree(work)
    device = pick_device(args.device)
    gen = seed_everything(args.seed)
    t0 = time.time()
    prompts = read_prompts(args.prompts)
    student, tok = load_model(args.model, device, dtype=torch.float32)  # float32 master weights
    prompts = truncate_prompts(tok, prompts, args.max_prompt_tokens, args.prompts)
    anchors = truncate_prompts(tok, read_prompts(args.anchor), args.max_prompt_tokens, args.anchor) if args.anchor else []
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    if device.type == "cuda":
        teacher.to(torch.bfloat16)
    vec, dmeta = load_direction(args.direction or out / "direction.safetensors", student)
    coefficient = dmeta.get("coefficient", 1.0) if args.coefficient is None else args.coefficient
    hook = lambda: add_vector(teacher, int(dmeta["layer"]), vec, coefficient)  # πt = π0 + c·r at block l*
    s_ids, smeta = load_safety_tokens(Path(args.tokens or out / "safety_tokens.json"), tok, student,
                                      args.random_tokens, args.seed)
    s_ids = s_ids.to(device)
    if not args.no_grad_checkpointing:
        student.activation_checkpointing_enable()
    student.config.use_cache = True

    plan = step_prompts(prompts, args.prompts_per_step, args.epochs, args.seed)
    if args.max_steps:
        plan = plan[:args.max_steps]
    anchor_plan = [[]] * len(plan)
    if anchors:  # as many seeded passes over the anchor prompts as the steps need
        passes = math.ceil(len(plan) * args.anchor_per_step / len(anchors))
        flat = [p for group in step_prompts(anchors, args.anchor_per_step, passes, args.seed + 1) for p in group]
        anchor_plan = [flat[i * args.anchor_per_step:(i + 1) * args.anchor_per_step] for i in range(len(plan))]
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(args.warmup * len(plan)), len(plan))
    work.mkdir(parents=True, exist_ok=True)
    start, log = (load_checkpoint(work / "checkpoint.pt", student, opt, sched, gen) if args.resume else (0, []))
    print(f"distilling {len(plan)} steps x {args.prompts_per_step} prompts x {args.samples} samples, "
          f"loss {args.loss}, |S| = {len(s_ids)}{' (random)' if args.random_tokens else ''}, teacher block "
          f"{dmeta['layer']} c = {coefficient}"
          + (f"; anchor {args.anchor_per_step} x {args.samples} harmless samples, λ = {args.anchor_weight}" if anchors else "")
          + (f"; resuming at step {start}" if start else ""))

    bar = tqdm(range(start, len(plan)), desc=f"distill ({args.loss})", unit="step", initial=start, total=len(plan))
    for step in bar:
        rec = {"step": step + 1, **train_step(student, teacher, tok, plan[step], s_ids, args, gen, opt, sched, hook,
                                                  anchor_plan[step])}
        log.append(rec)
        write_jsonl(work / "train_log.jsonl", log)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", refusal=f"{rec['sampled_refusal']:.2f}", s=f"{rec['step_seconds']:.0f}")
        if (step + 1) % args.checkpoint_every == 0 and step + 1 < len(plan):
            save_checkpoint(work / "checkpoint.pt", student, opt, sched, step + 1, gen, log)

    student.activation_checkpointing_disable()
    info = {"loss": args.loss, "random_tokens": args.random_tokens, "s_token_ids": s_ids.tolist(),
            "s_tokens": [tok.decode([i]) for i in s_ids.tolist()], "tokens_file": str(args.tokens or out / "safety_tokens.json"),
            "direction": {"file": str(args.direction or out / "direction.safetensors"), "layer": dmeta["layer"],
                          "coefficient": coefficient}, "base_model": args.model, "steps": len(plan),
            "args": vars(args), "seconds": round(time.time() - t0, 1), **run_info()}
    save_model_dir(student.eval(), tok, final_dir, extra_files={"safesteer.json": info})
    write_jsonl(final_dir / "train_log.jsonl", log)
    shutil.rmtree(work, ignore_errors=True)
    if log:
        first, last = log[0], log[-1]
        print(f"loss {first['loss']:.4f} -> {last['loss']:.4f}; sampled refusal {first['sampled_refusal']:.2f} -> "
              f"{last['sampled_refusal']:.2f}; {sum(r['step_seconds'] for r in log) / len(log):.1f} s/step; "
              f"peak RSS {max(r['peak_rss_mb'] for r in log):.0f} MB")
    print(f"took {time.time() - t0:.0f} s; wrote {final_dir} (model, safesteer.json, train_log.jsonl)")


if __name__ == "__main__":
    run_cli(main)
