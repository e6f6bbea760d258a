"""The stages' command line: one-line errors, argparse with defaults shown, the options every stage has.

    run_cli                 a stage's main(): UserError -> `error: ...`, exit 2; Ctrl-C -> exit 130
    positive_int etc.       the one place for number checks (argparse types)
    Parser, add_renamed     --help as written with every default; an option's old spelling, for one release
    add_common_args         --model, --out, and add_runtime_args' --device, --seed, --max-prompt-tokens,
                            --chat-template
    add_repeats             --repeats, which every benchmark in bench/ has
    pick_device, seed_everything
"""
from __future__ import annotations

import argparse
import math
import random
import signal
import sys

import torch

from safesteer.errors import UserError
from safesteer.models import BUNDLED_MODEL
from safesteer.scale.precision import add_dtype_arg


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds like Ctrl-C: temporary files removed, locks
    released, the last checkpoint kept."""


def _terminate(signum, frame):
    raise Terminated


def run_cli(main) -> None:
    """Run a stage's main(); turn UserError into `error: ...` on stderr and exit 2; Ctrl-C and SIGTERM stop
    it cleanly (exit 130 and 143)."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Terminated:
        print("terminated (SIGTERM); the last checkpoint, if any, is kept", file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _checked(convert, ok, words: str):
    """An argparse type: convert, then check; a bad value is a one-line usage error before any work."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if convert is int else 'a number'}, "
                                             f"got {text!r}") from None
        if convert is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {words}, got {text}")
        return value
    return parse


# The one place for number checks: every stage's options use these types.
positive_int = _checked(int, lambda v: v > 0, "> 0")
non_negative_int = _checked(int, lambda v: v >= 0, ">= 0")
positive_float = _checked(float, lambda v: v > 0, "> 0")
non_negative_float = _checked(float, lambda v: v >= 0, ">= 0")
fraction = _checked(float, lambda v: 0 < v <= 1, "in (0, 1]")
finite_float = _checked(float, lambda v: True, "a number")
warmup_fraction = _checked(float, lambda v: 0 <= v < 1, "in [0, 1): a fraction of the run's steps")
seed_value = _checked(int, lambda v: 0 <= v < 2**32, "in [0, 2**32)")


def folder_name(text: str) -> str:
    """An argparse type for a name that becomes a folder inside --out: one plain name, so that it can neither
    escape the run directory nor be the run directory itself."""
    if not text or text in (".", "..") or text.startswith(".") or "/" in text or "\\" in text or "\0" in text:
        raise argparse.ArgumentTypeError(f"must be one plain folder name (no '/', not '.', '..' or hidden), "
                                         f"got {text!r}")
    return text


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help prints the module docstring as written and every option's default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not any(action.default is x for x in (None, False, argparse.SUPPRESS)) and "default" not in text:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse with the project's error style: one line `error: ...`, exit code 2, no usage dump."""

    def __init__(self, description: str):
        super().__init__(description=description, formatter_class=HelpFormatter)

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def add_renamed(parser, old: str, new: str, **kwargs) -> argparse.Action:
    """Add option `new` (to a parser or an argument group) with `kwargs`, and `old` as its alias for one
    release: hidden from --help, it prints one deprecation line, then does exactly what `new` does."""
    action = parser.add_argument(new, **kwargs)

    class Renamed(argparse.Action):
        def __call__(self, p, namespace, values, option_string=None):
            print(f"warning: {old} is deprecated; use {new}", file=sys.stderr)
            action(p, namespace, values, new)
    parser.add_argument(old, action=Renamed, dest=action.dest, nargs=action.nargs, type=action.type,
                        choices=action.choices, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return action


def add_runtime_args(p) -> None:
    """How any script that loads a model runs it: --device, --seed, --max-prompt-tokens, --chat-template."""
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA if available")
    p.add_argument("--seed", type=seed_value, default=0, help="seeds torch, Python and the sampler")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=512,
                   help="truncate longer user prompts to this many tokens (with a warning that counts them)")
    p.add_argument("--chat-template", metavar="FILE",
                   help="a Jinja chat template to use instead of the tokenizer's, for a model without one "
                        "(default: the tokenizer's)")


def add_common_args(p, out_default: str = "runs/demo", device_map: bool = False, dtype: bool = False) -> None:
    """The options every stage has, on a parser or an argument group (dtype: --dtype, for Stage 4)."""
    p.add_argument("--model", default=BUNDLED_MODEL,
                   help="'smollm2-135m' (bundled), a local transformers directory, or a hub id")
    p.add_argument("--out", default=out_default, help="run directory shared by all stages")
    add_runtime_args(p)
    if device_map:  # the forward-only stages; Stage 3 scales out with torchrun instead
        p.add_argument("--device-map", help="e.g. 'auto': spread a model too big for one GPU over all of "
                                            "them (default: none, the whole model on --device)")
    if dtype:
        add_dtype_arg(p)


def add_repeats(p, default: int, how: str) -> None:
    """--repeats, which every benchmark has: how many times it runs each measurement; `how` says which run
    it reports (the best, the median) and whether the runs are interleaved."""
    p.add_argument("--repeats", type=positive_int, default=default, help=how)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python and torch; return a CPU generator for the sampler (same draws on every device)."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
