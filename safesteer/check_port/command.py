"""Check a port of SafeSteer against the method's conventions: its loss, its steering hook, its positions.

A port that gets a convention wrong still trains, toward something else: the loss one position off, the rest
term taken as log(1 − Σ_S π), a mean over the wrong axis, the hook on the wrong block. This module calls a
porter's functions on random and edge-case inputs, compares each result (and the loss's gradient) with a
float64 brute force written here, and prints one line per case; a failing case names the known mistake whose
numbers the port reproduces, where one does.

What it calls, each given as MODULE:FUNCTION (a module on the path, or a file.py):
    LOSS      loss(student_logits [b, T, V], teacher_logits [b, T, V], mask [b, T], s_ids [k]) -> one
              number, the step's loss (distill.localized_reverse_kl, ports.plain_loop.localized_loss)
    --hook    hook(model, layer, vector, coefficient) -> a context manager (or a handle with .remove())
              under which the model is πt = π0 + c·r at the input of block `layer` (hooks.add_vector)
    --logits  logits(model, prompt_ids [b, s], prompt_mask [b, s], completion_ids [b, T]) -> [b, T, V] whose
              [:, i] predicts completion token i, prompts left-padded (forcing.completion_logits)
    --mask    mask(completion_ids [b, T], stop_ids) -> [b, T]: 1 through each row's first stop token,
              inclusive, 0 after (forcing.end_of_turn_mask)

--hook and --logits run on a tiny random Llama built in memory, or on --model DIR. Exit status 0 when every
case passes, 1 when one fails; bad input is one line `error: ...`.

Usage:
    python -m safesteer.check_port ports.plain_loop:localized_loss
    python -m safesteer.check_port my_port.py:my_loss --kind partial
    python -m safesteer.check_port --hook safesteer.hooks:add_vector --mask safesteer.forcing:end_of_turn_mask
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch

from safesteer.check_port.loss import check_loss
from safesteer.check_port.model import check_hook, check_logits, check_mask, tiny_model
from safesteer.check_port.results import KINDS
from safesteer.cli import Parser, seed_value
from safesteer.errors import UserError


# ----------------------------------------------------------------------------- the command line

def resolve(spec: str):
    """MODULE:FUNCTION (a module on the path, or a file ending in .py) -> the function."""
    module, sep, name = spec.rpartition(":")
    if not sep or not module or not name:
        raise UserError(f"{spec!r}: give MODULE:FUNCTION, e.g. ports.plain_loop:localized_loss")
    try:
        if module.endswith(".py"):
            if not Path(module).is_file():
                raise UserError(f"{module}: file not found")
            found = importlib.util.spec_from_file_location(Path(module).stem, module)
            mod = importlib.util.module_from_spec(found)
            found.loader.exec_module(mod)
        else:
            mod = importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"cannot import {module}: {e}") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise UserError(f"{module} has no function {name}")
    return fn


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("loss", nargs="?", metavar="LOSS", help="the port's loss, MODULE:FUNCTION")
    p.add_argument("--kind", choices=KINDS, default="collapsed", help="which of the method's losses it ports")
    p.add_argument("--hook", metavar="MODULE:FUNCTION", help="the port's steering hook")
    p.add_argument("--logits", metavar="MODULE:FUNCTION", help="the port's teacher forcing")
    p.add_argument("--mask", metavar="MODULE:FUNCTION", help="the port's end-of-turn mask")
    p.add_argument("--model", metavar="DIR", help="a transformers model directory for --hook and --logits "
                                                  "(default: a tiny random Llama built in memory)")
    p.add_argument("--seed", type=seed_value, default=0, help="seeds the random inputs")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    named = {k: resolve(getattr(args, k)) for k in ("loss", "hook", "logits", "mask") if getattr(args, k)}
    if not named:
        raise UserError("nothing to check: give a loss MODULE:FUNCTION, --hook, --logits or --mask")
    model = None
    if "hook" in named or "logits" in named:
        from safesteer.models import load_model
        model = load_model(args.model, "cpu", torch.float32, need_template=False)[0] if args.model else None
        model = model or tiny_model(args.seed)
    checks = {"loss": (f"the loss ({args.kind})", lambda f: check_loss(f, args.kind, args.seed)),
              "hook": ("the steering hook", lambda f: check_hook(f, model, args.seed)),
              "logits": ("which logits predict completion token i",
                         lambda f: check_logits(f, model, args.seed)),
              "mask": ("the end-of-turn mask", check_mask)}
    failed = total = 0
    for key, fn in named.items():
        title, check = checks[key]
        print(f"{title}: {getattr(args, key)}")
        for result in check(fn):
            print(f"  {result.line()}")
            failed, total = failed + (not result.ok), total + 1
    ending = "" if failed else ": the port keeps the conventions"
    print(f"{total - failed} of {total} checks passed{ending}")
    if failed:
        raise SystemExit(1)
