"""Stage 3 of SafeSteer: localized on-policy distillation, written out by hand.

The student πs starts as π0 and is trained toward the teacher πt = π0 + c·r (Stage 1's hook). Each optimiser
step, the student *samples* G completions for each of P harmful prompts (on-policy: it learns on its own text),
then teacher and student score prompt + completion, and at every completion position t, with
p = πs(·|x, y<t), q = πt(·|x, y<t), S the safety tokens of Stage 2 and R = V \\ S:

    collapsed (ours, default)  Σ_{v∈S} p(v) log p(v)/q(v)  +  p(R) log p(R)/q(R)
                               the reverse KL between the coarse distributions over S ∪ {R}: >= 0, zero exactly
                               when p matches q on each token of S; how mass is split *inside* R gets no gradient
    partial (authors' code)    Σ_{v∈S} p(v) [log p(v) - log q(v)]     (not a divergence: min at p(v) = q(v)/e)
    full (baseline)            Σ_{v∈V} p(v) log p(v)/q(v)             (global on-policy distillation)

log p(R) is a logsumexp over V with S masked out, never log(1 - Σ_S p): a refusing teacher puts q(R) near 0,
where that subtraction in float32 is noise. The loss covers completion positions through the first end-of-turn
token (optionally only positions [K, K + M), --skip-tokens/--keep-tokens), mean per sequence, then over sequences.

Two implementations of each loss, tested to agree: `*_formula`, a few lines on log_softmax outputs that autograd
differentiates (read these), and lean_losses.py's, with the gradient p_u (a_u - ā) written by hand and no second
[positions, V] tensor (--loss-impl lean, the default; bench/loss_memory.py). The student scores a prompt's G samples
in one row behind a tree mask, so the prompt's forward and backward run once, not G times (--pack-samples, exact).

Anchoring (ours, --anchor FILE...): the student also samples answers to a few harmless prompts, pulled toward the
*unsteered* π0 with the same loss on S and weight λ (without, it learns the teacher's over-refusal too). --teacher
prompt: πt is π0 behind a safety system prompt (authors' variant). --refresh-every N (authors' ref_model_sync_steps):
every N steps πt becomes the student + c·r, r measured again on it (directions.py, Stage 1's rule and block).
--lora-rank R: the student is π0 + low-rank adapters (peft); with adapters off the same weights are π0 and,
with the hook, πt, so one copy of the model serves all three (one GPU for 8B models; README, memory model).

Reads   OUT/direction.safetensors + .json (Stage 1), OUT/safety_tokens.json (Stage 2), data/harmful_train
Writes  OUT/student/   a transformers model directory (AutoModelForCausalLM.from_pretrained loads it; with LoRA
                       merged, and the adapter in student/adapter/), safesteer.json, train_log.jsonl
        OUT/student.work/   checkpoints while training (removed when the run completes)

Usage:
    python distill.py --out runs/demo
    python distill.py --out runs/demo --loss full --student full --max-new-tokens 48 --samples 4
    python distill.py --out runs/demo --student lora --lora-rank 16 --anchor data/harmless_train.jsonl
    torchrun --nproc-per-node 8 distill.py --out runs/big --model DIR --lora-rank 16 --shard   (parallel.py)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import random
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from chat import encode_chats, load_safety_tokens, stop_token_ids
from common import (Parser, UserError, add_common_args, data_file, fraction, load_model,
                    non_negative_float, non_negative_int, peak_memory_mb, pick_device, positive_float, positive_int,
                    read_prompts, run_cli, run_info, save_model_dir, seed_everything, truncate_prompts, write_jsonl)
from metrics import refusal_rate
from parallel import World, load_checkpoint, save_checkpoint, trainable, unsharded
from lean_losses import collapsed_kl, full_kl, partial_kl, rest_term
from directions import recompute_direction
from steering import Teacher, completion_logits, decode_completions, load_teacher, sample, swapped_weights


def parse_args(argv=None):
    p = Parser(__doc__)
    add_common_args(p)
    p.add_argument("--direction", help="Stage 1's direction.safetensors (default: OUT/direction.safetensors)")
    p.add_argument("--tokens", help="Stage 2's safety_tokens.json (default: OUT/safety_tokens.json)")
    p.add_argument("--coefficient", type=float, help="c of the teacher hook (default: from direction.json)")
    p.add_argument("--teacher", choices=["hook", "prompt"], default="hook",
                   help="hook: π0 + c·r; prompt: π0 behind a safety system prompt (authors' variant)")
    p.add_argument("--system", metavar="FILE", help="--teacher prompt: the system prompt (default: steering's)")
    p.add_argument("--prompts", default=str(data_file("harmful_train")), help="distillation prompts (paper: 100)")
    p.add_argument("--loss", choices=["collapsed", "partial", "full"], default="collapsed")
    p.add_argument("--loss-impl", choices=["lean", "formula"], default="lean",
                   help="lean: hand-written backward, no [positions, V] temporaries; formula: plain autograd")
    p.add_argument("--refresh-every", type=positive_int, metavar="N", help="every N steps πt becomes the current "
                   "student + c·r, r measured again on it at Stage 1's block (authors' ref_model_sync_steps)")
    p.add_argument("--skip-tokens", type=non_negative_int, default=0, help="K: no loss on the first K positions")
    p.add_argument("--keep-tokens", type=positive_int, help="M: loss on positions [K, K + M) only")
    p.add_argument("--random-tokens", action="store_true", help="replace S by a seeded random set of the same size")
    p.add_argument("--anchor", nargs="+", metavar="FILE", help="harmless prompts (several files are pooled) whose "
                   "samples are pulled toward the unsteered π0 on S (ours)")
    p.add_argument("--anchor-per-step", type=positive_int, default=2, help="anchor prompts per step (with --anchor)")
    p.add_argument("--anchor-weight", type=non_negative_float, default=0.5, help="λ: L(harmful, πt) + λ·L(anchor, π0)")
    p.add_argument("--lora-rank", type=positive_int, help="train LoRA adapters of this rank (peft), not all weights")
    p.add_argument("--lora-alpha", type=positive_float, help="LoRA scale α (default: 2 x rank)")
    p.add_argument("--lora-targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"], help="modules given adapters")
    p.add_argument("--student", default="student", help="name of the student directory inside --out")
    p.add_argument("--epochs", type=positive_int, default=1, help="passes over the prompts (paper: 1)")
    p.add_argument("--max-steps", type=positive_int, help="stop after this many optimiser steps")
    p.add_argument("--prompts-per-step", type=positive_int, default=4, help="P (paper: 4)")
    p.add_argument("--samples", type=positive_int, default=8, help="G completions per prompt (paper: 8)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="completion length (paper: 512)")
    p.add_argument("--temperature", type=non_negative_float, default=1.0)
    p.add_argument("--top-p", type=fraction, default=1.0)
    p.add_argument("--lr", type=positive_float, default=1e-5, help="AdamW lr (paper: 1e-5 Qwen, 1e-6 Llama)")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    p.add_argument("--warmup", type=non_negative_float, default=0.1, help="fraction of steps of linear warm-up")
    p.add_argument("--clip", type=positive_float, default=1.0, help="gradient-norm clip")
    p.add_argument("--micro-batch", type=positive_int, default=8, help="sequences per forward/backward")
    p.add_argument("--pack-samples", action=argparse.BooleanOptionalAction, default=True, help="the student "
                   "computes each prompt once for its G samples (a tree mask; exact, README: Performance)")
    p.add_argument("--shard", action="store_true", help="under torchrun: FSDP2, each process holds 1/N of the "
                   "weights, gradients and Adam states (for a model that does not fit one device)")
    p.add_argument("--no-grad-checkpointing", action="store_true",
                   help="keep activations instead of recomputing them in backward (more memory, same numbers)")
    p.add_argument("--checkpoint-every", type=positive_int, help="save a resumable checkpoint every N steps "
                   "(default: 5, or with --refresh-every the first multiple of it from 5)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/STUDENT.work/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the losses, as formulas
# In float64: exact, as a reference should be; the lean path (lean_losses.py) keeps float32 and no [n, V] copies.

def _log_probs_s_and_rest(logits, s_ids):
    """log π(v) for v ∈ S: [n, |S|], and log π(R) = logsumexp over V with S masked to -inf: [n]."""
    logp = logits.double().log_softmax(-1)  # [n, V]
    in_s = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    in_s[s_ids] = True
    return logp[:, s_ids], logp.masked_fill(in_s, float("-inf")).logsumexp(-1)


def collapsed_kl_formula(student_logits, teacher_logits, s_ids):
    """Σ_{v∈S} p log p/q + p(R) log p(R)/q(R) per position: [n, V] x 2 -> [n]."""
    lp_s, lp_r = _log_probs_s_and_rest(student_logits, s_ids)
    lq_s, lq_r = _log_probs_s_and_rest(teacher_logits.detach(), s_ids)
    return (lp_s.exp() * (lp_s - lq_s)).sum(-1) + rest_term(lp_r, lq_r)


def partial_kl_formula(student_logits, teacher_logits, s_ids):
    """Σ_{v∈S} p log p/q per position, p and q normalised over all of V (authors' loss): [n]."""
    lp_s, _ = _log_probs_s_and_rest(student_logits, s_ids)
    lq_s, _ = _log_probs_s_and_rest(teacher_logits.detach(), s_ids)
    return (lp_s.exp() * (lp_s - lq_s)).sum(-1)


def full_kl_formula(student_logits, teacher_logits, s_ids=None):
    """Σ_{v∈V} p log p/q per position (S is ignored): [n]."""
    lp, lq = student_logits.double().log_softmax(-1), teacher_logits.detach().double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


LOSSES = {"lean": {"collapsed": collapsed_kl, "partial": partial_kl, "full": full_kl},
          "formula": {"collapsed": collapsed_kl_formula, "partial": partial_kl_formula, "full": full_kl_formula}}


def localized_reverse_kl(student_logits, teacher_logits, mask, s_ids, kind: str = "collapsed",
                         impl: str = "lean") -> torch.Tensor:
    """The training loss: per-position loss on completion positions, mean per sequence, mean over sequences.

    student_logits, teacher_logits: [b, T, V] (any float dtype); mask: [b, T] (1 where the loss applies).
    Positions outside the mask are computed (the [b*T, V] view needs no copy) and then weighted by zero.
    """
    b, t, v = student_logits.shape
    per_pos = LOSSES[impl][kind](student_logits.reshape(b * t, v), teacher_logits.reshape(b * t, v), s_ids)
    m = mask.to(per_pos.dtype).view(b, t)
    per_seq = (per_pos.view(b, t) * m).sum(-1) / m.sum(-1).clamp_min(1)
    return per_seq.mean()


def loss_window(comp_mask: torch.Tensor, skip: int = 0, keep: int | None = None) -> torch.Tensor:
    """Completion positions [K, K + M) of each row, within its mask (authors' num_loss_tokens_to_skip/keep)."""
    pos = torch.arange(comp_mask.shape[1], device=comp_mask.device)
    inside = (pos >= skip) & (pos < skip + keep if keep is not None else True)
    return comp_mask * inside.to(comp_mask.dtype)


# ----------------------------------------------------------------------------- one optimiser step

class Timer:
    """Seconds per phase of a step: `with timer("sample"): ...`, read back with timer.seconds."""

    def __init__(self):
        self.seconds = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t = time.perf_counter()
        yield
        self.seconds[phase] += time.perf_counter() - t


def train_step(student, tok, harmful: list[str], anchors: list[str], *, teacher: Teacher, base: Teacher,
               s_ids, opt, sched, gen, samples: int, max_new_tokens: int, temperature: float = 1.0,
               top_p: float = 1.0, loss: str = "collapsed", impl: str = "lean", anchor_weight: float = 0.5,
               micro_batch: int = 8, clip: float = 1.0, skip_tokens: int = 0, keep_tokens: int | None = None,
               pack: bool = True, timer: Timer | None = None, world: World | None = None) -> dict:
    """One step: sample (student) -> teacher logits -> student logits -> loss -> backward -> update.

    Harmful rows are pulled toward `teacher` (πt), anchor rows (harmless, ours) toward `base` (π0) with
    weight λ: loss = L(harmful samples, πt) + λ·L(anchor samples, π0). Under torchrun each rank passes its share
    of the prompts; sequences are weighted by the step's global count and gradients summed over ranks."""
    timer, world = timer or Timer(), world or World(torch.device("cpu"))
    device = next(student.parameters()).device
    rows = [p for p in harmful for _ in range(samples)] + [p for p in anchors for _ in range(samples)]
    n = samples * len(harmful)
    n_global, n_anchor_global = world.sum([n, len(rows) - n])  # the mean over sequences is a global mean
    with timer("sample"):  # eval mode: no checkpointing, KV cache on
        ids, mask = encode_chats(tok, rows, device=device)
        comp, comp_mask = sample(student.eval(), ids, mask, max_new_tokens, temperature=temperature, top_p=top_p,
                                 generator=gen, stop_ids=stop_token_ids(tok), pad_id=tok.pad_token_id,
                                 sync_stop=world.any if world.sharded else None)
    loss_mask = loss_window(comp_mask, skip_tokens, keep_tokens)
    student.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    stats = dict.fromkeys(["loss", "collapsed", "partial", "full"] + (["anchor_loss"] if n_anchor_global else []), 0.0)
    for target, first, count, total, weight in ((teacher, 0, n, n_global, 1.0),
                                                (base, n, len(rows) - n, n_anchor_global, anchor_weight)):
        ctx_ids, ctx_mask = (ids, mask) if target.system is None else target.encode(tok, rows, device)
        for i in range(first, first + count, micro_batch):  # gradient accumulation over micro-batches
            sl = slice(i, min(i + micro_batch, first + count))
            share = (sl.stop - sl.start) / total  # this micro-batch's share of its group's sequences
            with timer("teacher"), torch.no_grad(), autocast, target.steer():
                lt = completion_logits(target.model, ctx_ids[sl], ctx_mask[sl], comp[sl],  # [b, T, V]
                                       share_prefix=not world.sharded)
            with timer("student_forward"), autocast:
                ls = completion_logits(student, ids[sl], mask[sl], comp[sl], pack=pack)
            with timer("loss"):
                part = localized_reverse_kl(ls, lt, loss_mask[sl], s_ids, loss, impl) * share
            with timer("backward"):
                (weight * part).backward()
            with timer("diagnostics"):
                log_losses(stats, part, ls, lt, loss_mask[sl], s_ids, share, weight, anchor=target is base, done=loss)
    stats = dict(zip(stats, world.sum(list(stats.values()))))  # each rank holds its share of the global loss
    if not math.isfinite(stats["loss"]):
        raise UserError(f"the loss became {stats['loss']}; stopping (the last checkpoint is kept)")
    with timer("optimizer"):
        params = [q for q in student.parameters() if q.requires_grad]
        world.sum_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)  # sharded: a DTensor, the global norm
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    texts = decode_completions(tok, comp, comp_mask)
    new_tokens = int(comp_mask.sum())
    refused, refused_anchor = world.sum([refusal_rate(texts[:n]) * n, refusal_rate(texts[n:]) * (len(rows) - n)])
    rec = {**stats, "grad_norm": grad_norm.item(), "lr": sched.get_last_lr()[0],
           "sampled_refusal": refused / max(n_global, 1), "mean_completion_tokens": new_tokens / len(texts),
           "sample_tokens_per_s": new_tokens / timer.seconds["sample"],
           "seconds": {k: round(v, 3) for k, v in timer.seconds.items()},
           "step_seconds": round(sum(timer.seconds.values()), 3), "peak_memory_mb": peak_memory_mb(device),
           "example": texts[0][:200]}
    if n_anchor_global:  # how often the student refuses the harmless anchor prompts: over-refusal as it trains
        rec["anchor_refusal"] = refused_anchor / n_anchor_global
    return rec


@torch.no_grad()
def log_losses(stats, part, ls, lt, mask, s_ids, share, weight, anchor: bool, done: str = "") -> None:
    """Accumulate the step's loss, and on harmful rows all three losses on the same batch (for the log; the
    trained one, `done`, is `part` itself)."""
    stats["loss"] += weight * part.item()
    if anchor:
        stats["anchor_loss"] += part.item()
        return
    for kind in ("collapsed", "partial", "full"):
        stats[kind] += part.item() if kind == done else localized_reverse_kl(ls, lt, mask, s_ids, kind).item() * share


# ----------------------------------------------------------------------------- setup and checkpoints

def build_student(args, device):
    """π0 as the student starts: float32 weights, or (LoRA) π0 in bf16 on CUDA with float32 adapters (peft)."""
    lora_bf16 = args.lora_rank and device.type == "cuda"
    student, tok = load_model(args.model, device, dtype=torch.bfloat16 if lora_bf16 else torch.float32,
                              chat_template=args.chat_template)
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model
        cfg = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank, lora_dropout=0.0,
                         target_modules=args.lora_targets, task_type="CAUSAL_LM")
        student = get_peft_model(student, cfg)
    return student, tok


def build_models(args, out: Path, device, world: World | None = None):
    """(student, tok, πt, π0). Full fine-tuning: a float32 student and a frozen copy of π0 (bf16 on CUDA) for
    πt and π0. LoRA: one copy, adapters off is π0, adapters off + hook is πt. --shard: each copy sharded."""
    student, tok = build_student(args, device)
    system = Path(args.system).read_text().strip() if args.system else None
    if args.lora_rank:
        frozen, base_ctx = student, student.disable_adapter
    else:
        frozen, base_ctx = copy.deepcopy(student).requires_grad_(False).eval(), contextlib.nullcontext
        if device.type == "cuda":
            frozen.to(torch.bfloat16)
    if world is not None and world.sharded:
        world.shard(student)
        if frozen is not student:  # full fine-tuning's frozen copy (LoRA has none)
            world.shard(frozen)
    teacher, dmeta = load_teacher(frozen, args.direction or out / "direction.safetensors", args.teacher,
                                  args.coefficient, system, base_ctx)
    return student, tok, teacher, Teacher(frozen, "base", base_context=base_ctx), dmeta


def refresh_teacher(student, tok, teacher: Teacher, dmeta: dict) -> Teacher:
    """πt := the student as it is now + c·r, r measured again on it by Stage 1's rule at its block (authors'
    update_refusal_vector). What trains is copied now and swapped in whenever πt runs, so πt stays fixed until
    the next refresh; π0 (anchoring's target) never changes."""
    params = trainable(student)
    snapshot = {n: p.detach().clone() for n, p in params.items()}
    training = student.training
    vec = recompute_direction(student.eval(), tok, dmeta) if teacher.kind == "hook" else None
    student.train(training)
    return Teacher(student, teacher.kind, vec, teacher.layer, teacher.coefficient, teacher.system,
                   base_context=lambda: swapped_weights(student, params, snapshot))


def step_prompts(prompts: list[str], per_step: int, epochs: int, seed: int) -> list[list[str]]:
    """The prompts of every step: a seeded shuffle per epoch, cut into groups of P (the last may be short)."""
    steps = []
    for epoch in range(epochs):
        order = prompts[:]
        random.Random(seed * 1000 + epoch).shuffle(order)
        steps += [order[i:i + per_step] for i in range(0, len(order), per_step)]
    return steps


def anchor_steps(anchors: list[str], n_steps: int, per_step: int, seed: int) -> list[list[str]]:
    """As many seeded passes over the anchor prompts as the steps need, cut per step."""
    if not anchors:
        return [[] for _ in range(n_steps)]
    passes = math.ceil(n_steps * per_step / len(anchors))
    flat = [p for group in step_prompts(anchors, per_step, passes, seed + 1) for p in group]
    return [flat[i * per_step:(i + 1) * per_step] for i in range(n_steps)]


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
    if args.checkpoint_every is None:  # a resumed run rebuilds πt from the student: checkpoint at refreshes only
        args.checkpoint_every = -(-5 // args.refresh_every) * args.refresh_every if args.refresh_every else 5
    if args.refresh_every and args.checkpoint_every % args.refresh_every:
        raise UserError("--checkpoint-every must be a multiple of --refresh-every")
    if args.system and not Path(args.system).is_file():
        raise UserError(f"{args.system}: system prompt file not found")
    device = pick_device(args.device)
    world = World(device, args.shard)
    gen = seed_everything(args.seed)
    if world.rank:  # its own sampler stream; rank 0 keeps the single-process one
        gen.manual_seed(args.seed * 1_000_003 + world.rank)
    t0 = time.time()
    prompts = read_prompts(args.prompts)
    anchors = [a for f in args.anchor or [] for a in read_prompts(f)]
    student, tok, teacher, base, dmeta = build_models(args, out, device, world)
    prompts = truncate_prompts(tok, prompts, args.max_prompt_tokens, args.prompts)
    anchors = truncate_prompts(tok, anchors, args.max_prompt_tokens, "the anchor files")
    tokens_file = Path(args.tokens or out / "safety_tokens.json")
    s_ids = load_safety_tokens(tokens_file, tok, student, args.random_tokens, args.seed)[0].to(device)
    if not args.no_grad_checkpointing:
        student.activation_checkpointing_enable()
        if args.lora_rank:
            student.enable_input_require_grads()  # checkpointed blocks need an input that requires grad

    plan = step_prompts(prompts, args.prompts_per_step, args.epochs, args.seed)[:args.max_steps]
    anchor_plan = anchor_steps(anchors, len(plan), args.anchor_per_step, args.seed)
    if world.sharded and any(len(p) % world.size for p in plan + [a for a in anchor_plan if a]):
        raise UserError(f"--shard needs every step's prompts and anchors to split evenly over {world.size} "
                        f"processes (--prompts-per-step, --anchor-per-step, and the prompt count)")
    opt = torch.optim.AdamW(trainable(student).values(), lr=args.lr, weight_decay=args.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(args.warmup * len(plan)), len(plan))
    work.mkdir(parents=True, exist_ok=True)
    start, log = (load_checkpoint(work / "checkpoint.pt", student, opt, sched, gen, world) if args.resume else (0, []))
    if args.refresh_every and start >= args.refresh_every:  # checkpoints fall on refresh steps
        teacher = refresh_teacher(student, tok, teacher, dmeta)
    n_train = sum(p.numel() for p in trainable(student).values())
    say = print if world.main else (lambda *a, **k: None)
    say(f"distilling {len(plan)} steps x {args.prompts_per_step} prompts x {args.samples} samples, loss "
          f"{args.loss} ({args.loss_impl}), |S| = {len(s_ids)}{' (random)' if args.random_tokens else ''}; teacher "
          f"{teacher.describe()}; {n_train / 1e6:.1f}M trainable weights" + (" (LoRA)" if args.lora_rank else "")
          + (f"; anchor {args.anchor_per_step} x {args.samples} harmless samples, λ = {args.anchor_weight}"
             if anchors else "") + (f"; resuming at step {start}" if start else "")
        + (f"; {world.size} processes" + (", sharded (FSDP2)" if world.sharded else "") if world.size > 1 else ""))
    knobs = dict(teacher=teacher, base=base, s_ids=s_ids, opt=opt, sched=sched, gen=gen, samples=args.samples,
                 max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, loss=args.loss,
                 impl=args.loss_impl, anchor_weight=args.anchor_weight, micro_batch=args.micro_batch, clip=args.clip,
                 skip_tokens=args.skip_tokens, keep_tokens=args.keep_tokens, pack=args.pack_samples, world=world)
    bar = tqdm(range(start, len(plan)), desc=f"distill ({args.loss})", unit="step", initial=start, total=len(plan),
               disable=not world.main)
    for step in bar:
        rec = {"step": step + 1, **train_step(student, tok, world.share(plan[step], required=True),
                                              world.share(anchor_plan[step]), **knobs)}
        if args.refresh_every and (step + 1) % args.refresh_every == 0 and step + 1 < len(plan):
            knobs["teacher"] = refresh_teacher(student, tok, knobs["teacher"], dmeta)
            rec["teacher_refreshed"] = knobs["teacher"].describe()
        log.append(rec)
        if world.main:
            write_jsonl(work / "train_log.jsonl", log)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", refusal=f"{rec['sampled_refusal']:.2f}", s=f"{rec['step_seconds']:.0f}")
        if (step + 1) % args.checkpoint_every == 0 and step + 1 < len(plan):
            save_checkpoint(work / "checkpoint.pt", student, opt, sched, step + 1, gen, log, world)

    info = {"loss": args.loss, "random_tokens": args.random_tokens, "s_token_ids": s_ids.tolist(),
            "s_tokens": [tok.decode([i]) for i in s_ids.tolist()], "tokens_file": str(tokens_file),
            "teacher": {"kind": args.teacher, "file": str(args.direction or out / "direction.safetensors"),
                        "layer": dmeta["layer"], "coefficient": teacher.coefficient, "system": teacher.system},
            "refresh_every": args.refresh_every, "steps": len(plan), "lora_rank": args.lora_rank, "world_size": world.size,
            "base_model": args.model, "args": vars(args), "seconds": round(time.time() - t0, 1), **run_info()}
    if world.sharded:  # rank 0 gathers the slices into a plain model to save
        student = unsharded(student, world, lambda: build_student(args, torch.device("cpu"))[0])
    world.barrier()
    if not world.main:
        return world.close()
    save_student(student, tok, final_dir, info, lora=bool(args.lora_rank))
    write_jsonl(final_dir / "train_log.jsonl", log)
    shutil.rmtree(work, ignore_errors=True)
    world.close()
    if log:
        first, last = log[0], log[-1]
        print(f"loss {first['loss']:.4f} -> {last['loss']:.4f}; sampled refusal {first['sampled_refusal']:.2f} -> "
              f"{last['sampled_refusal']:.2f}; {sum(r['step_seconds'] for r in log) / len(log):.1f} s/step; "
              f"peak memory {max(r['peak_memory_mb'] for r in log):.0f} MB")
    print(f"took {time.time() - t0:.0f} s; wrote {final_dir} (model, safesteer.json, train_log.jsonl"
          + (", adapter/" if args.lora_rank else "") + ")")


def save_student(student, tok, path: Path, info: dict, lora: bool) -> None:
    """A plain transformers directory; with LoRA the merged weights, plus the adapter in adapter/."""
    if hasattr(student, "activation_checkpointing_disable"):
        student.activation_checkpointing_disable()
    if not lora:
        save_model_dir(student.eval(), tok, path, extra_files={"safesteer.json": info})
        return
    staged = path.parent / f".{path.name}.adapter"
    student.save_pretrained(staged)  # peft's own format, before merging
    with torch.no_grad():  # merge in place: no second copy of the weights
        merged = student.merge_and_unload().eval()
    write_adapter = lambda tmp: shutil.move(staged, Path(tmp) / "adapter")
    save_model_dir(merged, tok, path, extra_files={"safesteer.json": info}, also=write_adapter)


if __name__ == "__main__":
    run_cli(main)
