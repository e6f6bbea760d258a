"""The paper's baselines in Stage 3's harness: off-policy SFT and DPO on the same prompts, at the same budget.

SafeSteer's claim is comparative: localized on-policy distillation (distill.py) against what people use today.
These are the two standard methods, trained from π0 on the same harmful prompts, toward the same teacher
πt = π0 + c·r (Stage 1's hook, built by Stage 3's own functions), with the same optimiser and steps:

    sft       πt answers each prompt x with G samples y ~ πt(·|x), once, before training; the student πs
              minimises the cross-entropy on them, mean over each answer's tokens (through its first end of
              turn), then over answers:   L_SFT = mean_y [ 1/|y| Σ_t -log πs(y_t | x, y<t) ]
    dpo       G pairs per prompt, chosen y_c ~ πt, rejected y_r ~ π0, reference π0 (frozen):
                  L_DPO = mean_pairs -log σ(β [log πs(y_c|x)/π0(y_c|x) - log πs(y_r|x)/π0(y_r|x)])
              with log π(y|x) = Σ_t log π(y_t | x, y<t) over the answer's tokens (prompt and padding masked)
    sft-mix   L_SFT + λ · L_SFT on π0's own answers to harmless anchor prompts (Stage 3's --anchor prompts)
    dpo-mix   L_DPO + λ · L_DPO on anchor pairs that prefer π0's answer (chosen) to πt's (rejected: the
              teacher's over-refusal)

"The same budget" as a Stage 3 run with the same arguments means: the same prompts at each step (P of them,
in the seeded order of distill.step_prompts; A anchors per step, as distill.anchor_steps picks them); the same
G answers per prompt, drawn by the same sampler at the same --max-new-tokens, temperature and top-p; the same
number of optimiser steps (one pass over the prompts per epoch, cut by --max-steps); the same AdamW, lr,
cosine schedule with warm-up, gradient clip, micro-batches and gradient checkpointing. Tokens trained on:
each step, P·G answers of at most --max-new-tokens tokens each (+ A·G anchor answers), through the first end
of turn, as Stage 3 trains on its P·G samples; DPO trains on both answers of each pair, so it reads twice
the sequences (train_log.jsonl counts each step's answer tokens).

Where they differ from Stage 3, which is the point of the comparison: their answers are sampled once, up
front, by πt and π0 (off-policy; more epochs reuse them), where Stage 3 samples fresh answers from the student
πs at every step (on-policy); SFT learns the one token πt sampled at each position, where Stage 3 matches πt's
whole distribution on S; DPO learns from preferences between whole answers, not from per-token targets.

Reads   OUT/direction.safetensors + .json (Stage 1), data/harmful_train (--prompts), the --anchor files (-mix)
Writes  OUT/STUDENT/   (STUDENT: by default the method's name) a transformers model directory, written as
                       Stage 3's student (LoRA merged, the adapter in adapter/), safesteer.json (method, β,
                       the answers' refusal rates, arguments), train_log.jsonl (loss per step; DPO: reward
                       margin and accuracy)
        OUT/STUDENT.work/   checkpoints while training (removed when the run completes)

Usage:
    python -m experiments.baselines --out runs/demo --method sft
    python -m experiments.baselines --out runs/demo --method dpo --beta 0.1 --samples 4 --max-new-tokens 48
    python -m experiments.baselines --out runs/demo --method dpo-mix --anchor data/harmless_train.jsonl
    python evaluate.py --out runs/demo --models base=smollm2-135m sft=runs/demo/sft dpo=runs/demo/dpo
"""
from __future__ import annotations

import math
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from safesteer.chat import encode_chats
from safesteer.cli import (Parser, add_common_args, finite_float, folder_name, fraction, non_negative_float,
                           pick_device, positive_float, positive_int, run_cli, seed_everything,
                           warmup_fraction)
from safesteer.errors import UserError
from safesteer.files import data_file, exclusive, read_prompts, run_dir, run_info, truncate_prompts
from distill import Recipe, sample_batch
from safesteer.metrics import refusal_rate
from safesteer.models import check_lengths
from safesteer.plan import anchor_steps, make_optimizer, step_prompts
from safesteer.scale.students import (allowed_changes, keeper, prepare_output_dirs, recipe_record,
                                      save_student, saved_along)
from safesteer.scale.parallel import (Loop, World, add_scale_args, build_models, checkpoint_interval,
                                      enable_grad_checkpointing, peak_memory_mb, trainable)
from safesteer.sampling import decode_completions
from safesteer.teacher import Teacher
from safesteer.forcing import completion_logits


# ----------------------------------------------------------------------------- the losses

def sequence_logprobs(logits, answer, mask) -> torch.Tensor:
    """log π(y|x) = Σ_t log π(y_t | x, y<t) over each answer's tokens where mask is 1 (the prompt is not in
    `logits`; padding and what follows the first end of turn have mask 0). [b, T, V], [b, T], [b, T] -> [b].
    log π(y_t) = z[y_t] - logsumexp(z): no [b, T, V] log-softmax copy, and a shift of z changes nothing."""
    z = logits.float()
    token_logp = z.gather(-1, answer[..., None]).squeeze(-1) - z.logsumexp(-1)  # [b, T]
    return (token_logp * mask).sum(-1)


def sft_loss(logits, answer, mask) -> torch.Tensor:
    """Cross-entropy on the answers: -log πs(y_t | x, y<t), mean over each answer's tokens, then over
    answers. [b, T, V], [b, T], [b, T] -> a scalar."""
    n_tokens = mask.sum(-1).clamp_min(1)
    return (-sequence_logprobs(logits, answer, mask) / n_tokens).mean()


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """The sigmoid DPO loss per pair from sequence log-probabilities, [b] x 4 -> ([b], [b]): the loss, and the
    reward margin β[(log πs(y_c) - log πref(y_c)) - (log πs(y_r) - log πref(y_r))] (> 0: πs prefers y_c)."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin), margin.detach()  # logsigmoid: exact for any β, no exp to overflow


# ----------------------------------------------------------------------------- the answers, sampled once

Answers = dict[str, tuple[torch.Tensor, torch.Tensor]]  # prompt -> (tokens [G, T], mask [G, T])


def sample_answers(model: Teacher, tok, prompts: list[str], recipe: Recipe, loop: Loop) -> Answers:
    """G answers of `model` (πt or π0) to each distinct prompt, once, P prompts per batch, by Stage 3's own
    sampling call (distill.sample_batch). Each answer is right-padded to --max-new-tokens."""
    distinct, answers = list(dict.fromkeys(prompts)), {}
    g, width = recipe.samples, recipe.max_new_tokens
    label = "πt answers" if model.kind == "hook" else "π0 answers"
    for i in tqdm(range(0, len(distinct), recipe.prompts_per_step), desc=label, unit="batch"):
        group = distinct[i:i + recipe.prompts_per_step]
        with model.steer():
            batch = sample_batch(model.model, tok, group, recipe, loop)
        pad = width - batch.comp.shape[1]
        comp, mask = F.pad(batch.comp, (0, pad), value=tok.pad_token_id), F.pad(batch.comp_mask, (0, pad))
        for j, prompt in enumerate(group):
            answers[prompt] = comp[j * g:(j + 1) * g], mask[j * g:(j + 1) * g]
    return answers


def answer_rows(answers: Answers, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored answers of `prompts` (G rows each), cut to the longest: tokens and mask, [P·G, T]."""
    comp = torch.cat([answers[p][0] for p in prompts])
    mask = torch.cat([answers[p][1] for p in prompts])
    width = int(mask.sum(-1).max())
    return comp[:, :width], mask[:, :width]


@dataclass
class Group:
    """One kind of a step's rows: each prompt G times, the answers trained toward and (DPO) away from."""
    name: str                                            # "harmful" or "anchor" (the log's prefix)
    prompts: list[str]                                   # [rows]
    chosen: tuple[torch.Tensor, torch.Tensor]            # SFT's targets, DPO's y_c: tokens, mask [rows, T]
    rejected: tuple[torch.Tensor, torch.Tensor] | None   # DPO's y_r; None for SFT
    weight: float                                        # 1, or λ for the anchors


def step_groups(harmful: list[str], anchors: list[str], answers: dict[str, Answers], dpo: bool,
                anchor_weight: float, g: int) -> list[Group]:
    """Harmful prompts: πt's answers are the target (DPO: preferred to π0's). Anchors (-mix): π0's answers
    are the target (DPO: preferred to πt's)."""
    teacher, base = answers["teacher"], answers.get("base", {})
    rows = [p for p in harmful for _ in range(g)]
    groups = [Group("harmful", rows, answer_rows(teacher, harmful),
                    answer_rows(base, harmful) if dpo else None, 1.0)]
    if anchors:
        rows = [p for p in anchors for _ in range(g)]
        groups.append(Group("anchor", rows, answer_rows(base, anchors),
                            answer_rows(teacher, anchors) if dpo else None, anchor_weight))
    return groups


# ----------------------------------------------------------------------------- the step

def answer_logprobs(model, ids, mask, answer, pack: bool) -> torch.Tensor:
    """log π(y|x) of each row's answer under `model`, teacher-forced after its prompt: [b]."""
    tokens, answer_mask = answer
    return sequence_logprobs(completion_logits(model, ids, mask, tokens, pack=pack), tokens, answer_mask)


def micro_batch_loss(student, ref: Teacher, tok, group: Group, rows: slice, beta: float, pack: bool):
    """The loss of a group's `rows` (a micro-batch), and what the log keeps of it. SFT when there is no
    rejected answer; DPO otherwise, with π0 (`ref`) scoring both answers without gradient."""
    device = next(student.parameters()).device
    ids, mask = encode_chats(tok, group.prompts[rows], device=device)
    chosen = tuple(t[rows] for t in group.chosen)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        if group.rejected is None:
            loss = sft_loss(completion_logits(student, ids, mask, chosen[0], pack=pack), *chosen)
            return loss, {"loss": loss.item()}
        rejected = tuple(t[rows] for t in group.rejected)
        policy = [answer_logprobs(student, ids, mask, y, pack) for y in (chosen, rejected)]
        with torch.no_grad(), ref.steer():
            reference = [answer_logprobs(ref.model, ids, mask, y, pack) for y in (chosen, rejected)]
    losses, margins = dpo_loss(*policy, *reference, beta)
    return losses.mean(), {"loss": losses.mean().item(), "reward_margin": margins.mean().item(),
                           "reward_accuracy": (margins > 0).float().mean().item()}


def train_step(student, tok, groups: list[Group], ref: Teacher, recipe: Recipe, loop: Loop,
               beta: float) -> dict:
    """One step on answers sampled before training: loss = L(harmful rows) + λ·L(anchor rows), each group
    a micro-batch at a time (a row counting 1/rows of its group), backward; then clip, AdamW, schedule."""
    t0 = time.perf_counter()
    student.train()
    rec = {"loss": 0.0}
    for group in groups:
        sums, n = defaultdict(float), len(group.prompts)
        for i in range(0, n, recipe.micro_batch):
            rows = slice(i, min(i + recipe.micro_batch, n))
            share = (rows.stop - rows.start) / n
            loss, stats = micro_batch_loss(student, ref, tok, group, rows, beta, recipe.pack)
            (group.weight * share * loss).backward()
            for key, value in stats.items():
                sums[key] += share * value
        rec.update({f"{group.name}_{key}": value for key, value in sums.items()})
        rec["loss"] += group.weight * sums["loss"]
    if not math.isfinite(rec["loss"]):
        raise UserError(f"the loss became {rec['loss']}; stopping (the last checkpoint is kept)")
    grad_norm = torch.nn.utils.clip_grad_norm_(list(trainable(student).values()), recipe.clip)
    loop.opt.step()
    loop.sched.step()
    loop.opt.zero_grad(set_to_none=True)
    answers = [y for g in groups for y in (g.chosen, g.rejected) if y is not None]
    return {**rec, "grad_norm": grad_norm.item(), "lr": loop.sched.get_last_lr()[0],
            "answer_tokens": sum(int(mask.sum()) for _, mask in answers),
            "step_seconds": round(time.perf_counter() - t0, 3),
            "peak_memory_mb": peak_memory_mb(loop.world.device)}


# ----------------------------------------------------------------------------- the command line

# Stage 3's options that set the budget, with its defaults (distill.Recipe): same arguments, same budget.
BUDGET = [("--samples", positive_int, "G answers per prompt, sampled once (paper: 8)"),
          ("--max-new-tokens", positive_int, "answer length (paper: 512)"),
          ("--temperature", non_negative_float, "sampling temperature, 0 for greedy (paper: 1.0)"),
          ("--top-p", fraction, "nucleus sampling mass (paper: 1.0)"),
          ("--prompts-per-step", positive_int, "P (paper: 4)"),
          ("--epochs", positive_int, "passes over the prompts (paper: 1); later passes reuse the answers"),
          ("--lr", positive_float, "AdamW lr (paper: 1e-5 Qwen, 1e-6 Llama)"),
          ("--weight-decay", non_negative_float, "AdamW's"),
          ("--warmup", warmup_fraction, "fraction of steps of linear warm-up before the cosine decay"),
          ("--clip", positive_float, "gradient-norm clip"),
          ("--micro-batch", positive_int, "sequences (DPO: pairs) per forward/backward")]
MIX = [("--anchor-per-step", positive_int, "anchor prompts per step (A)"),
       ("--anchor-weight", non_negative_float, "λ: L(harmful) + λ·L(anchor)")]


def recipe_field(option: str) -> str:
    return option[2:].replace("-", "_")


def parse_args(argv=None):
    p = Parser(__doc__)
    add_common_args(p)
    p.add_argument("--direction", help="Stage 1's direction.safetensors (default: OUT/direction.safetensors)")
    p.add_argument("--student", type=folder_name,
                   help="the student directory's name inside --out (default: the method's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing student directory, or restart an unfinished run")

    paper = p.add_argument_group("the baselines, at Stage 3's budget")
    paper.add_argument("--method", required=True, choices=["sft", "dpo", "sft-mix", "dpo-mix"],
                       help="sft: cross-entropy on πt's answers; dpo: πt's answer preferred to π0's; "
                            "-mix: with anchor prompts (--anchor) whose target is π0's answer")
    paper.add_argument("--beta", type=positive_float, default=0.1, help="DPO's β")
    paper.add_argument("--prompts", default=str(data_file("harmful_train")),
                       help="the harmful prompts (paper: 100)")
    paper.add_argument("--coefficient", type=finite_float,
                       help="c of the teacher hook (default: direction.json's)")
    for option, kind, text in BUDGET:
        paper.add_argument(option, type=kind, default=getattr(Recipe, recipe_field(option)), help=text)
    paper.add_argument("--max-steps", type=positive_int,
                       help="stop after this many optimiser steps (default: every step of the epochs)")

    mix = p.add_argument_group("the -mix variants")
    mix.add_argument("--anchor", nargs="+", metavar="FILE",
                     help="harmless prompts (files are pooled), as Stage 3's --anchor (-mix: required)")
    for option, kind, text in MIX:
        mix.add_argument(option, type=kind, default=getattr(Recipe, recipe_field(option)), help=text)
    add_scale_args(p)
    p.set_defaults(teacher="hook", system=None)  # πt as Stage 3 builds it by default (parallel.build_models)
    return p.parse_args(argv)


def check_method(args) -> None:
    if args.method.endswith("-mix") and not args.anchor:
        raise UserError(f"--method {args.method} anchors on harmless prompts: pass --anchor FILE")
    if args.anchor and not args.method.endswith("-mix"):
        raise UserError(f"--anchor is for the -mix methods (sft-mix, dpo-mix), not --method {args.method}")
    if args.shard or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("experiments/baselines.py trains in one process: run it without torchrun and --shard")


def sample_all(teacher: Teacher, base: Teacher, tok, plan: list, dpo: bool, recipe: Recipe,
               loop: Loop) -> dict[str, Answers]:
    """Every answer the run trains on, before its first step: πt's to the harmful prompts, π0's to the
    anchors; for DPO also π0's to the harmful prompts and πt's to the anchors. {"teacher": .., "base": ..}"""
    harmful = [p for step_harmful, _ in plan for p in step_harmful]
    anchors = [p for _, step_anchors in plan for p in step_anchors]
    answers = {"teacher": sample_answers(teacher, tok, harmful + (anchors if dpo else []), recipe, loop)}
    if dpo or anchors:
        answers["base"] = sample_answers(base, tok, (harmful if dpo else []) + anchors, recipe, loop)
    return answers


def answer_stats(tok, answers: Answers) -> dict:
    """How often a set of answers refuses (safesteer/metrics.py's judge), and their mean length in tokens."""
    tokens = torch.cat([a[0] for a in answers.values()])
    mask = torch.cat([a[1] for a in answers.values()])
    return {"answers": len(tokens), "refusal": refusal_rate(decode_completions(tok, tokens, mask)),
            "mean_tokens": mask.sum().item() / len(tokens)}


def startup_line(args, steps: int, teacher: Teacher, student) -> str:
    """The line printed before sampling: the plan, πt, what trains, β, the anchors."""
    n_train = sum(p.numel() for p in trainable(student).values())
    text = f"{args.method}: {steps} steps x {args.prompts_per_step} prompts x {args.samples} answers"
    text += f" sampled once; teacher {teacher.describe()}; {n_train / 1e6:.1f}M trainable weights"
    if args.lora_rank:
        text += " (LoRA)"
    if args.method.startswith("dpo"):
        text += f"; β = {args.beta}"
    if args.anchor:
        text += f"; anchor {args.anchor_per_step} prompts per step, λ = {args.anchor_weight}"
    return text


def train(student, tok, ref: Teacher, answers: dict[str, Answers], plan: list, recipe: Recipe, loop: Loop,
          method: str, beta: float, start: int, log: list[dict]) -> list[dict]:
    """Steps start + 1 ... len(plan), one train_step each; the log and checkpoints written (after_step)."""
    bar = tqdm(range(start, len(plan)), desc=method, unit="step", initial=start, total=len(plan))
    for step in bar:
        groups = step_groups(*plan[step], answers, method.startswith("dpo"), recipe.anchor_weight,
                             recipe.samples)
        log.append({"step": step + 1, **train_step(student, tok, groups, ref, recipe, loop, beta)})
        bar.set_postfix(loss=f"{log[-1]['loss']:.4f}", s=f"{log[-1]['step_seconds']:.0f}")
        loop.after_step(student, log, step + 1, len(plan))
    return log


def main(argv=None):
    args = parse_args(argv)
    check_method(args)
    out, name = run_dir(args.out), args.student or args.method
    with exclusive(out / f"{name}.lock", out / name):  # one writer per student
        final_dir, work = prepare_output_dirs(out, name, args.overwrite, args.resume)
        run(args, out, final_dir, work)


def run(args, out: Path, final_dir: Path, work: Path) -> None:
    """A baseline from the checked arguments to the saved student: πt's (and π0's) answers, train, write."""
    every, dpo = checkpoint_interval(args.checkpoint_every, None), args.method.startswith("dpo")
    device, t0 = pick_device(args.device), time.time()
    recipe = Recipe(**{recipe_field(o): getattr(args, recipe_field(o)) for o, _, _ in BUDGET + MIX},
                    sample_batch=args.sample_batch)  # a scale option (parallel.add_scale_args)
    prompts, anchors = read_prompts(args.prompts), [a for f in args.anchor or [] for a in read_prompts(f)]
    student, tok, teacher, base, dmeta = build_models(args, out, device)
    check_lengths(student, max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens)
    prompts = truncate_prompts(tok, prompts, args.max_prompt_tokens, args.prompts)
    anchors = truncate_prompts(tok, anchors, args.max_prompt_tokens, "the anchor files")
    harmful = step_prompts(prompts, recipe.prompts_per_step, recipe.epochs, args.seed)[:args.max_steps]
    plan = list(zip(harmful, anchor_steps(anchors, len(harmful), recipe.anchor_per_step, args.seed)))
    replace_along = args.overwrite or args.resume  # --save-at's folders, checked before step 1
    saved_along(out, final_dir.name, args.save_at, len(plan), replace_along, False)
    direction = args.direction or out / "direction.safetensors"
    loop = Loop(*make_optimizer(student, recipe, len(plan)), seed_everything(args.seed), World(device), work,
                every, recipe_record(args, {"direction": direction}), save_at=frozenset(args.save_at))
    print(startup_line(args, len(plan), teacher, student))

    answers = sample_all(teacher, base, tok, plan, dpo, recipe, loop)
    stats = {who: answer_stats(tok, a) for who, a in answers.items()}
    for who, s in stats.items():
        print(f"{'πt' if who == 'teacher' else 'π0'}: {s['answers']} answers, "
              f"{s['refusal']:.0%} refusing, {s['mean_tokens']:.1f} tokens on average")
    if not args.no_grad_checkpointing:
        enable_grad_checkpointing(student, lora=bool(args.lora_rank))

    def info_at(steps: int) -> dict:  # safesteer.json after `steps` steps
        return {"method": args.method, "beta": args.beta if dpo else None, "answers": stats, "steps": steps,
                "teacher": {"kind": "hook", "file": str(direction), "layer": dmeta["layer"],
                            "coefficient": teacher.coefficient},
                "lora_rank": args.lora_rank, "base_model": args.model, "args": vars(args),
                "seconds": round(time.time() - t0, 1), **run_info()}
    loop.keep = keeper(out, final_dir.name, tok, bool(args.lora_rank), info_at)  # --save-at's copies
    start, log = loop.open(student, args.resume, allowed_changes(args.resume_changing))
    log = train(student, tok, base, answers, plan, recipe, loop, args.method, args.beta, start, log)
    info = {**info_at(len(plan)), **loop.resume_record(start)}
    save_student(student, tok, final_dir, info, lora=bool(args.lora_rank), log=log)  # whole, log inside
    shutil.rmtree(work, ignore_errors=True)
    seconds = sum(r["step_seconds"] for r in log) / len(log)
    print(f"loss {log[0]['loss']:.4f} -> {log[-1]['loss']:.4f}; {seconds:.1f} s/step; "
          f"peak memory {max(r['peak_memory_mb'] for r in log):.0f} MB")
    adapter = ", adapter/" if args.lora_rank else ""
    print(f"took {time.time() - t0:.0f} s; wrote {final_dir} "
          f"(model, safesteer.json, train_log.jsonl{adapter})")


if __name__ == "__main__":
    run_cli(main)
