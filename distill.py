"""Stage 3 of SafeSteer: localized on-policy distillation, written out by hand.

The student πs starts as π0 and is trained toward the teacher πt = π0 + c·r (Stage 1's hook). Each optimiser
step, the student *samples* G completions for each of P harmful prompts (on-policy: it learns on its own
text), then teacher and student score prompt + completion, and at every completion position t, with
p = πs(·|x, y<t), q = πt(·|x, y<t), S the safety tokens of Stage 2 and R = V \\ S:

    collapsed (ours, default)  Σ_{v∈S} p(v) log p(v)/q(v)  +  p(R) log p(R)/q(R)
                               the reverse KL between the coarse distributions over S ∪ {R}: >= 0, zero
                               exactly when p matches q on each token of S; R's inner split gets no gradient
    partial (authors' code)    Σ_{v∈S} p(v) [log p(v) - log q(v)]     (not a divergence: min at p(v) = q(v)/e)
    full (baseline)            Σ_{v∈V} p(v) log p(v)/q(v)             (global on-policy distillation)

log p(R) is a logsumexp over V with S masked out, never log(1 - Σ_S p): a refusing teacher puts q(R) near 0,
where that subtraction in float32 is noise. The loss covers completion positions through the first
end-of-turn token, mean per sequence, then over sequences.

The paper's path comes first (Recipe, the loss formulas, localized_reverse_kl, train_step, step_prompts);
then, as --help groups them, the authors' variants (prompt teacher, loss window; the teacher schedules, a
hard refresh and their moving average, are in safesteer/scale/schedule.py), ours (anchoring to π0, lest the
student learn
the teacher's over-refusal; lean losses; packing) and, in safesteer/scale/parallel.py, scale.

Reads   OUT/direction.safetensors + .json (Stage 1), OUT/safety_tokens.json (Stage 2), data/harmful_train
Writes  OUT/student/   a transformers model directory (AutoModelForCausalLM.from_pretrained loads it; with
                       LoRA merged, and the adapter in student/adapter/), safesteer.json, train_log.jsonl
        OUT/student.work/   checkpoints while training (removed when the run completes)

Usage:
    python distill.py --out runs/demo
    python distill.py --out runs/demo --loss full --student student_full --max-new-tokens 48 --samples 4
    python distill.py --out runs/demo --student student_lora --lora-rank 16 --anchor data/harmless_train.jsonl
    torchrun --nproc-per-node 8 distill.py --out runs/big --model DIR --lora-rank 16 --shard
"""
from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

from safesteer.artifacts import load_safety_tokens
from safesteer.chat import encode_chats, stop_token_ids
from safesteer.cost import step_tokens
from safesteer.cli import (Parser, add_common_args, finite_float, folder_name, fraction, non_negative_float,
                           non_negative_int, pick_device, positive_float, positive_int, run_cli,
                           warmup_fraction)
from safesteer.errors import UserError
from safesteer.files import data_file, exclusive, read_prompts, run_dir, truncate_prompts
from safesteer.metrics import refusal_rate
from safesteer.models import check_lengths
from safesteer.plan import anchor_steps, make_optimizer, step_prompts  # what each step trains on
from safesteer.scale.students import (allowed_changes, keeper, prepare_output_dirs, recipe_record,
                                      save_student, saved_along)
from safesteer.scale.parallel import (Loop, Models, World, add_scale_args, build_models, build_student,
                                      checkpoint_interval, enable_grad_checkpointing, final_summary,
                                      peak_memory_mb, startup_summary, student_info, unsharded)
from safesteer.losses import collapsed_kl, full_kl, partial_kl, rest_term
from safesteer.scale.schedule import add_schedule_args, refresh_teacher, resume_schedule, start_schedule
from safesteer.sampling import decode_completions, sample
from safesteer.teacher import Teacher
from safesteer.forcing import completion_logits
from select_tokens import select_again  # the authors' schedule selects S again by Stage 2's rule


@dataclass
class Recipe:
    """Stage 3's settings, built once from the arguments (Recipe.from_args); --help shows these defaults."""
    # the paper's recipe
    loss: str = "collapsed"          # ours; the authors' code trains "partial"
    samples: int = 8                 # G completions per prompt (paper: 8)
    max_new_tokens: int = 64         # paper: 512; fewer on a CPU
    temperature: float = 1.0         # paper: 1.0, top-p 1.0, no top-k
    top_p: float = 1.0
    prompts_per_step: int = 4        # P (paper: 4 prompts x 8 samples = 32 completions per step)
    epochs: int = 1                  # paper: one pass over 100 prompts = 25 steps
    lr: float = 1e-5                 # AdamW, cosine schedule (paper: 1e-5 Qwen, 1e-6 Llama)
    weight_decay: float = 0.0
    warmup: float = 0.1              # fraction of the steps warming up linearly (paper: a tenth)
    clip: float = 1.0                # gradient-norm clip (paper: 1.0)
    micro_batch: int = 8             # sequences per forward/backward (gradient accumulation, for memory)
    sample_batch: int | None = None  # rows sampled at a time (None: all (P + A)·G; for memory, same samples)
    # the authors' variants
    # πt := the student + c·r every N steps (a hard copy; safesteer/scale/schedule.py)
    refresh_every: int | None = None
    skip_tokens: int = 0             # the loss on completion positions [K, M) only (as the authors')
    keep_tokens: int | None = None
    # ours
    anchor_per_step: int = 2         # harmless prompts per step, pulled toward π0 (with --anchor)
    anchor_weight: float = 0.5       # λ in L(harmful, πt) + λ·L(anchor, π0)
    impl: str = "lean"               # the losses of safesteer/losses.py; "formula": plain autograd
    pack: bool = True                # the student computes each prompt once for its G samples

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Recipe:
        """Each field from the argument of the same name; two flags say more: --loss-impl, --pack-samples."""
        flag = {"impl": "loss_impl", "pack": "pack_samples"}
        return cls(**{f.name: getattr(args, flag.get(f.name, f.name)) for f in fields(cls)})

    def __post_init__(self):
        if self.keep_tokens is not None and self.keep_tokens <= self.skip_tokens:
            raise UserError("--keep-tokens M must exceed --skip-tokens K: the loss covers positions [K, M)")


# ----------------------------------------------------------------------------- the paper's losses
# As formulas, in float64: exact, as a reference should be; safesteer/losses.py keeps float32 and no [n, V]
# copies.

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
    lp = student_logits.double().log_softmax(-1)
    lq = teacher_logits.detach().double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


LOSSES = {"lean": {"collapsed": collapsed_kl, "partial": partial_kl, "full": full_kl},
          "formula": {"collapsed": collapsed_kl_formula, "partial": partial_kl_formula,
                      "full": full_kl_formula}}


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


# ----------------------------------------------------------------------------- the paper's step

def train_step(student, tok, harmful: list[str], anchors: list[str], teachers: tuple[Teacher, Teacher], s_ids,
               recipe: Recipe, loop: Loop) -> dict:
    """One step: sample (student) -> teacher logits -> student logits -> loss -> backward -> update.

    teachers = (πt, π0). Harmful rows are pulled toward πt, anchor rows (harmless, ours) toward π0 with weight
    λ: loss = L(harmful samples, πt) + λ·L(anchor samples, π0). Under torchrun each rank passes its share of
    the prompts; sequences are weighted by the step's global count and gradients summed over ranks."""
    teacher, base = teachers
    world, step = loop.world, StepContext(tok, s_ids, recipe, loop.world)
    n, n_anchor = recipe.samples * len(harmful), recipe.samples * len(anchors)
    n_global, n_anchor_global = world.sum([n, n_anchor])  # the mean over sequences is a global mean
    with step.timer("sample"):
        batch = sample_batch(student, tok, harmful + anchors, recipe, loop)
    student.train()
    kinds = ["loss", "collapsed", "partial", "full"] + (["anchor_loss"] if n_anchor_global else [])
    step.stats = dict.fromkeys(kinds, 0.0)
    distill_rows(student, teacher, batch, slice(0, n), 1.0, n_global, step)
    distill_rows(student, base, batch, slice(n, n + n_anchor), recipe.anchor_weight, n_anchor_global, step)
    stats = dict(zip(step.stats, world.sum(list(step.stats.values()))))  # each rank held its share
    if not math.isfinite(stats["loss"]):
        raise UserError(f"the loss became {stats['loss']}; stopping (the last checkpoint is kept)")
    with step.timer("optimizer"):
        grad_norm = world.clip_grad_norm([q for q in student.parameters() if q.requires_grad], recipe.clip)
        loop.opt.step()
        loop.sched.step()
        loop.opt.zero_grad(set_to_none=True)
    texts = decode_completions(tok, batch.comp, batch.comp_mask)
    refused, refused_anchor = world.sum([refusal_rate(texts[:n]) * n, refusal_rate(texts[n:]) * n_anchor])
    new_tokens, seconds = int(batch.comp_mask.sum()), step.seconds
    rec = {**stats, "grad_norm": grad_norm.item(), "lr": loop.sched.get_last_lr()[0]}
    rec["sampled_refusal"] = refused / max(n_global, 1)
    rec["mean_completion_tokens"] = new_tokens / len(texts)
    rec["sample_tokens_per_s"] = new_tokens / seconds["sample"]
    rec["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    rec["step_seconds"] = round(sum(seconds.values()), 3)
    rec["peak_memory_mb"] = peak_memory_mb(batch.ids.device)
    rec["example"] = texts[0][:200]
    rec["tokens"] = step_tokens(batch.mask, batch.comp, batch.comp_mask, recipe.samples, world)  # cost.py
    if n_anchor_global:  # over-refusal as it trains: how often the student refuses the harmless anchors
        rec["anchor_refusal"] = refused_anchor / n_anchor_global
    return rec


@dataclass
class StepContext:
    """What one step's parts share: tokenizer, S, recipe, processes, sums of the losses, seconds per phase."""
    tok: object
    s_ids: torch.Tensor
    recipe: Recipe
    world: World
    stats: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=lambda: defaultdict(float))

    @contextlib.contextmanager
    def timer(self, phase: str):
        t = time.perf_counter()
        yield
        self.seconds[phase] += time.perf_counter() - t


@dataclass
class Samples:
    """One step's on-policy batch: each prompt G times, and the completion the student wrote after it."""
    prompts: list[str]         # [rows]
    ids: torch.Tensor          # [rows, plen] chat-rendered prompts, left-padded
    mask: torch.Tensor         # [rows, plen]
    comp: torch.Tensor         # [rows, T] the sampled completions
    comp_mask: torch.Tensor    # [rows, T] 1 through each row's first end-of-turn token
    loss_mask: torch.Tensor    # [rows, T] comp_mask inside the loss window


def sample_batch(student, tok, prompts: list[str], recipe: Recipe, loop: Loop) -> Samples:
    """G completions per prompt from the student in eval mode (KV cache on), in the precision it trains in."""
    device, world = next(student.parameters()).device, loop.world
    rows = [p for p in prompts for _ in range(recipe.samples)]
    ids, mask = encode_chats(tok, rows, device=device)
    sync_stop = world.any if world.sharded else None  # sharded: every rank decodes as long as any does
    with world.autocast(device):
        comp, comp_mask = sample(student.eval(), ids, mask, recipe.max_new_tokens, top_p=recipe.top_p,
                                 temperature=recipe.temperature, stop_ids=stop_token_ids(tok),
                                 pad_id=tok.pad_token_id, generator=loop.gen, sync_stop=sync_stop,
                                 rows_at_once=recipe.sample_batch)
    loss_mask = loss_window(comp_mask, recipe.skip_tokens, recipe.keep_tokens)
    return Samples(rows, ids, mask, comp, comp_mask, loss_mask)


def distill_rows(student, target: Teacher, batch: Samples, rows: slice, weight: float, total: int,
                 step: StepContext) -> None:
    """teacher -> student -> loss -> backward on the batch's `rows`, a micro-batch at a time (gradient
    accumulation): weight · L(rows, target), each sequence counting 1/total (total: over all ranks)."""
    recipe, timer = step.recipe, step.timer
    autocast = step.world.autocast(batch.ids.device)  # bf16 on CUDA (sharded: by FSDP2's mixed precision)
    ctx_ids, ctx_mask = batch.ids, batch.mask
    if target.system is not None:  # the prompt teacher reads each prompt behind its system prompt
        ctx_ids, ctx_mask = target.encode(step.tok, batch.prompts, batch.ids.device)
    for i in range(rows.start, rows.stop, recipe.micro_batch):
        sl = slice(i, min(i + recipe.micro_batch, rows.stop))
        share = (sl.stop - sl.start) / total  # this micro-batch's share of its group's sequences
        mask = batch.loss_mask[sl]
        with timer("teacher"), torch.no_grad(), autocast, target.steer():
            lt = completion_logits(target.model, ctx_ids[sl], ctx_mask[sl], batch.comp[sl],  # [b, T, V]
                                   share_prefix=not step.world.sharded)
        with timer("student_forward"), autocast:
            ls = completion_logits(student, batch.ids[sl], batch.mask[sl], batch.comp[sl], pack=recipe.pack)
        with timer("loss"):
            part = localized_reverse_kl(ls, lt, mask, step.s_ids, recipe.loss, recipe.impl) * share
        with timer("backward"):
            (weight * part).backward()
        with timer("diagnostics"):
            log_losses(step, part, ls, lt, mask, share, weight, anchor=target.kind == "base")


@torch.no_grad()
def log_losses(step: StepContext, part, ls, lt, mask, share: float, weight: float, anchor: bool) -> None:
    """Add a micro-batch to the step's sums: the loss it trained and, on harmful rows, all three losses."""
    step.stats["loss"] += weight * part.item()
    if anchor:
        step.stats["anchor_loss"] += part.item()
        return
    for kind in ("collapsed", "partial", "full"):
        if kind == step.recipe.loss:  # the trained one is `part` itself
            step.stats[kind] += part.item()
        else:
            step.stats[kind] += localized_reverse_kl(ls, lt, mask, step.s_ids, kind).item() * share


# ----------------------------------------------------------------------------- the authors' variants

def loss_window(comp_mask: torch.Tensor, skip: int = 0, keep: int | None = None) -> torch.Tensor:
    """Completion positions [K, M) of each row, in its mask: the authors' num_loss_tokens_to_skip K and
    num_loss_tokens_to_keep M (M > K; M counts from the completion's start, not from K; None: no end)."""
    pos = torch.arange(comp_mask.shape[1], device=comp_mask.device)
    inside = (pos >= skip) & (pos < keep if keep is not None else True)
    return comp_mask * inside.to(comp_mask.dtype)


# ----------------------------------------------------------------------------- the command line

def recipe_arg(group, option: str, kind, text: str) -> None:
    """Add --OPTION to a group of --help for the Recipe field of the same name (dashes for underscores), with
    that field's default: the defaults are written once, in Recipe."""
    group.add_argument(option, type=kind, default=getattr(Recipe, option[2:].replace("-", "_")), help=text)


def parse_args(argv=None):
    p = Parser(__doc__)
    run = p.add_argument_group("model and run")
    add_common_args(run)
    run.add_argument("--direction",
                     help="Stage 1's direction.safetensors (default: OUT/direction.safetensors)")
    run.add_argument("--tokens", help="Stage 2's safety_tokens.json (default: OUT/safety_tokens.json)")
    run.add_argument("--student", default="student", type=folder_name,
                     help="the student's folder name inside --out (a name, not a mode)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace a student, or restart an unfinished run")
    paper = p.add_argument_group("the paper's recipe (a default marked 'ours' is not the paper's)")
    paper.add_argument("--prompts", default=str(data_file("harmful_train")),
                       help="the harmful prompts (paper: 100)")
    paper.add_argument("--coefficient", type=finite_float,
                       help="c of the teacher hook (default: direction.json's)")
    paper.add_argument("--loss", choices=["collapsed", "partial", "full"], default=Recipe.loss,
                       help="collapsed: the KL over S and the rest R (ours); partial: the sum over S alone "
                            "(authors' code); full: the KL over V (global distillation, the baseline)")
    recipe_arg(paper, "--samples", positive_int, "G, completions sampled per prompt (paper: 8)")
    recipe_arg(paper, "--max-new-tokens", positive_int, "completion length (paper: 512)")
    recipe_arg(paper, "--temperature", non_negative_float, "sampling temperature, 0 for greedy (paper: 1.0)")
    recipe_arg(paper, "--top-p", fraction, "nucleus sampling (paper: 1.0)")
    recipe_arg(paper, "--prompts-per-step", positive_int, "P (paper: 4)")
    recipe_arg(paper, "--epochs", positive_int, "passes over the prompts (paper: 1)")
    paper.add_argument("--max-steps", type=positive_int, help="stop after this many steps (default: all)")
    recipe_arg(paper, "--lr", positive_float, "AdamW lr (paper: 1e-5 Qwen, 1e-6 Llama)")
    recipe_arg(paper, "--weight-decay", non_negative_float, "AdamW weight decay")
    recipe_arg(paper, "--warmup", warmup_fraction,
               "fraction of steps of linear warm-up before the cosine decay")
    recipe_arg(paper, "--clip", positive_float, "gradient-norm clip")
    recipe_arg(paper, "--micro-batch", positive_int,
               "sequences per forward/backward (gradient accumulation, for memory)")
    authors = p.add_argument_group("the authors' variants")
    authors.add_argument("--teacher", choices=["hook", "prompt"], default="hook",
                         help="hook: π0 + c·r; prompt: π0 behind a safety system prompt (authors' variant)")
    authors.add_argument("--system", metavar="FILE",
                         help="--teacher prompt's system prompt (default: steering's)")
    add_schedule_args(authors)  # --refresh-every, --teacher-ema, --refresh-tokens-every, --refresh-prompts
    recipe_arg(authors, "--skip-tokens", non_negative_int, "K: no loss on the first K positions")
    authors.add_argument("--keep-tokens", type=positive_int,
                         help="M > K: loss on positions [K, M) only, as the authors' num_loss_tokens_to_keep "
                              "(default: every position from K)")
    ours = p.add_argument_group("ours")
    ours.add_argument("--anchor", nargs="+", metavar="FILE", help="harmless prompts (several files are "
                      "pooled) whose samples are pulled toward the unsteered π0 on S (default: none)")
    recipe_arg(ours, "--anchor-per-step", positive_int, "anchor prompts per step (with --anchor)")
    recipe_arg(ours, "--anchor-weight", non_negative_float, "λ: L(harmful, πt) + λ·L(anchor, π0)")
    ours.add_argument("--random-tokens", action="store_true", help="a seeded random S, same size (a control)")
    ours.add_argument("--loss-impl", choices=["lean", "formula"], default=Recipe.impl,
                      help="lean: hand-written backward, no [positions, V] temporaries; formula: autograd")
    ours.add_argument("--pack-samples", action=argparse.BooleanOptionalAction, default=Recipe.pack,
                      help="the student computes each prompt once for its G samples (a tree mask; exact)")
    add_scale_args(p)
    return p.parse_args(argv)


def train(models: Models, s_ids, recipe: Recipe, loop: Loop, plan: tuple[list, list], start: int,
          log: list[dict], ema=None) -> list[dict]:
    """Steps start + 1 ... n, each a train_step on this rank's share of its prompts and anchors (plan: two
    lists of n groups); πt refreshed every N steps but the last, or following the student (ema); the log."""
    (harmful, anchors), world, n_steps = plan, loop.world, len(plan[0])
    bar = tqdm(range(start, n_steps), desc=f"distill ({recipe.loss})", unit="step", initial=start,
               total=n_steps, disable=not world.main)
    for step in bar:
        mine, my_anchors = world.share(harmful[step], required=True), world.share(anchors[step])
        if ema:  # the authors' schedule: πt's weights, r and S follow the student (schedule.EmaTeacher)
            models.teacher, s_ids = ema.teacher, ema.s_ids
        teachers = (models.teacher, models.base)
        rec = {"step": step + 1,
               **train_step(models.student, models.tok, mine, my_anchors, teachers, s_ids, recipe, loop)}
        if ema:
            rec.update(ema.after_step(step + 1, n_steps, loop))
        elif recipe.refresh_every and (step + 1) % recipe.refresh_every == 0 and step + 1 < n_steps:
            models.teacher = refresh_teacher(models.student, models.tok, models.teacher, models.direction)
            rec["teacher_refreshed"] = models.teacher.describe()
        log.append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", refusal=f"{rec['sampled_refusal']:.2f}",
                        s=f"{rec['step_seconds']:.0f}")
        loop.after_step(models.student, log, step + 1, n_steps)
    return log


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    world = World(device, args.shard)
    out = run_dir(args.out)
    lock = exclusive(out / f"{args.student}.lock", out / args.student) if world.main else None  # rank 0's
    with lock or contextlib.nullcontext():  # one writer per student, from the first check to the last file
        final_dir, work = prepare_output_dirs(out, args.student, args.overwrite, args.resume)
        run(args, out, final_dir, work, device, world)


def run(args, out: Path, final_dir: Path, work: Path, device, world: World) -> None:
    """Stage 3 from the checked arguments to the saved student: read, train, write."""
    args.checkpoint_every = checkpoint_interval(args.checkpoint_every, args.refresh_every)
    if args.system and not Path(args.system).is_file():
        raise UserError(f"{args.system}: system prompt file not found")
    recipe, t0 = Recipe.from_args(args), time.time()
    gen = world.generator(args.seed)
    prompts, anchors = read_prompts(args.prompts), [a for f in args.anchor or [] for a in read_prompts(f)]
    models = Models(*build_models(args, out, device, world))
    check_lengths(models.student, max_prompt_tokens=args.max_prompt_tokens,
                  max_new_tokens=args.max_new_tokens)
    prompts = truncate_prompts(models.tok, prompts, args.max_prompt_tokens, args.prompts)
    anchors = truncate_prompts(models.tok, anchors, args.max_prompt_tokens, "the anchor files")
    tokens_file = Path(args.tokens or out / "safety_tokens.json")
    s_ids = load_safety_tokens(tokens_file, models.tok, models.student, args.random_tokens, args.seed)[0]
    s_ids = s_ids.to(device)
    if not args.no_grad_checkpointing:
        enable_grad_checkpointing(models.student, lora=bool(args.lora_rank))
    plan = step_prompts(prompts, recipe.prompts_per_step, recipe.epochs, args.seed)[:args.max_steps]
    anchor_plan = anchor_steps(anchors, len(plan), recipe.anchor_per_step, args.seed)
    world.check_even(plan + anchor_plan)
    ema = start_schedule(args, models, s_ids, tokens_file, out, select_again)  # a refresh's inputs, checked
    saved_along(out, args.student, args.save_at, len(plan), args.overwrite or args.resume, world.sharded)
    info_at = lambda steps: student_info(args, models, s_ids, tokens_file, steps, world,
                                         round(time.time() - t0, 1))
    keep = keeper(out, args.student, models.tok, bool(args.lora_rank), info_at)  # --save-at's copies
    recipe_files = {"tokens": tokens_file, "direction": args.direction or out / "direction.safetensors"}
    loop = Loop(*make_optimizer(models.student, recipe, len(plan)), gen, world, work, args.checkpoint_every,
                recipe_record(args, recipe_files), save_at=frozenset(args.save_at), keep=keep)
    start, log = loop.open(models.student, args.resume, allowed_changes(args.resume_changing))
    resume_schedule(models, ema, work, start, args.refresh_every)
    if world.main:
        print(startup_summary(args, len(plan), len(s_ids), models, bool(anchors), start, world))
    log = train(models, s_ids, recipe, loop, (plan, anchor_plan), start, log, ema)
    info = {**info_at(len(plan)), **loop.resume_record(start)}
    if world.sharded:  # rank 0 gathers the slices into a plain model to save
        models.student = unsharded(models.student, world, lambda: build_student(args, torch.device("cpu"))[0])
    if world.main:  # the student, its log inside, appears whole in one rename; then the checkpoints go
        save_student(models.student, models.tok, final_dir, info, bool(args.lora_rank), args.save_dtype, log)
        shutil.rmtree(work, ignore_errors=True)
    world.close()  # the other ranks wait for rank 0's files, then all leave the process group together
    if world.main:
        print(final_summary(log, time.time() - t0, final_dir, lora=bool(args.lora_rank)))


if __name__ == "__main__":
    run_cli(main)
