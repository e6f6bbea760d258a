"""A run's plan, shared by Stage 3 and the baselines: which prompts each step trains on and the optimiser.

    step_prompts     a seeded shuffle of the prompts per epoch, cut into groups of P (the paper: 100 prompts,
                     P = 4, one epoch: 25 steps)
    anchor_steps     the harmless anchor prompts beside them (ours), as many seeded passes as the steps need
    make_optimizer   AdamW on what trains, linear warm-up, cosine decay (the paper's)
"""
from __future__ import annotations

import math
import random

import torch

from safesteer.scale.parallel import trainable


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


def make_optimizer(student, recipe, n_steps: int):
    """AdamW on what trains (fused on CUDA: no foreach temporary), warm-up, cosine decay. (opt, sched)
    recipe: anything with lr, weight_decay and warmup (the fraction of steps warming up)."""
    from transformers import get_cosine_schedule_with_warmup
    opt = torch.optim.AdamW(trainable(student).values(), lr=recipe.lr, weight_decay=recipe.weight_decay,
                            fused=next(student.parameters()).is_cuda)
    return opt, get_cosine_schedule_with_warmup(opt, math.ceil(recipe.warmup * n_steps), n_steps)
