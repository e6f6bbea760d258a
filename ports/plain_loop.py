"""SafeSteer's Stage 3 step on one screen, with no trainer class: the piece to paste into your own loop.

One step, as distill.train_step takes it, with p = πs(·|x, y<t), q = πt(·|x, y<t), πt = π0 + c·r:

    sample    G completions per prompt from the student (safesteer.sampling.sample, KV-cached); its mask
              is 1 through each row's first end-of-turn token, inclusive: the positions the loss counts
    force     both models score prompt + completion (safesteer.forcing.completion_logits): [:, i] is the
              distribution completion token i was drawn from, the output one position before it
    loss      the reverse KL on S per position (safesteer.losses: collapsed, partial or full), a mean over
              each sequence's positions, then over the sequences
    update    backward, clip the gradient norm, AdamW step, schedule step

What distill.train_step adds around it (micro-batches, anchoring, logging, torchrun) changes no number:
from the same seed, two steps of this loop and of distill.py give the same weights (tests/test_ports.py).

    teacher, s_ids = load_run(copy.deepcopy(student).requires_grad_(False).eval(), tok, "runs/demo")
    for prompts in batches_of_4:
        train_step(student, teacher, tok, prompts, s_ids, opt, sched, generator=gen)
"""
from pathlib import Path

import torch

from safesteer.artifacts import load_safety_tokens
from safesteer.chat import encode_chats, stop_token_ids
from safesteer.forcing import completion_logits
from safesteer.losses import collapsed_kl, full_kl, partial_kl
from safesteer.sampling import sample
from safesteer.teacher import load_teacher

LOSSES = {"collapsed": collapsed_kl, "partial": partial_kl, "full": full_kl}


def load_run(frozen, tok, run_dir, coefficient: float | None = None):
    """(πt, S) from a run directory: the hook of Stage 1's direction.safetensors/.json on `frozen` (a frozen
    copy of π0; c from direction.json unless given) and Stage 2's safety_tokens.json, refused if it was made
    for another tokenizer (its fingerprint)."""
    run = Path(run_dir)
    teacher, _ = load_teacher(frozen, run / "direction.safetensors", coefficient=coefficient)
    s_ids, _ = load_safety_tokens(run / "safety_tokens.json", tok, frozen)
    return teacher, s_ids.to(next(frozen.parameters()).device)


def sequence_losses(student_logits, teacher_logits, mask, s_ids, kind: str = "collapsed") -> torch.Tensor:
    """Each sequence's loss: the per-position loss on its masked positions, averaged. [b, T, V] x 2 -> [b]."""
    b, t, v = student_logits.shape
    per_position = LOSSES[kind](student_logits.reshape(b * t, v), teacher_logits.reshape(b * t, v), s_ids)
    m = mask.to(per_position.dtype)
    return (per_position.view(b, t) * m).sum(-1) / m.sum(-1).clamp_min(1)


def localized_loss(student_logits, teacher_logits, mask, s_ids, kind: str = "collapsed") -> torch.Tensor:
    """The step's loss: the mean over sequences of their losses (python -m safesteer.check_port checks it)."""
    return sequence_losses(student_logits, teacher_logits, mask, s_ids, kind).mean()


def train_step(student, teacher, tok, prompts: list[str], s_ids, opt, sched=None, *, samples: int = 8,
               max_new_tokens: int = 64, kind: str = "collapsed", clip: float = 1.0, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> dict:
    """One on-policy step: sample, teacher-force both models, the localized loss, one optimiser step.
    teacher: a safesteer.teacher.Teacher (πt); returns the loss, the gradient norm before clipping and the
    number of completion tokens the loss counted."""
    device = next(student.parameters()).device
    rows = [p for p in prompts for _ in range(samples)]  # each prompt G times, as in distill.py
    ids, mask = encode_chats(tok, rows, device=device)  # [b, plen], left-padded
    comp, comp_mask = sample(student.eval(), ids, mask, max_new_tokens, stop_ids=stop_token_ids(tok),
                             pad_id=tok.pad_token_id, temperature=temperature, generator=generator)  # [b, T]
    with torch.no_grad(), teacher.steer():
        teacher_logits = completion_logits(teacher.model, ids, mask, comp)  # [b, T, V]
    student_logits = completion_logits(student.train(), ids, mask, comp)  # [b, T, V], with autograd
    loss = localized_loss(student_logits, teacher_logits, comp_mask, s_ids, kind)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in student.parameters() if p.requires_grad], clip)
    opt.step()
    if sched is not None:
        sched.step()
    opt.zero_grad(set_to_none=True)
    return {"loss": loss.item(), "grad_norm": grad_norm.item(), "completion_tokens": int(comp_mask.sum())}
