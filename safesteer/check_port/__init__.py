"""Check a port of SafeSteer against the method's conventions: its loss, its steering hook, its positions.

    results   a check's verdict: ok, or the known mistake whose numbers the port reproduces
    loss      check_loss: value and gradient against float64 formulas, on edge cases
    model     check_hook, check_logits, check_mask: the hook's block and positions, which logits predict
              completion token i, the end-of-turn mask
    command   python -m safesteer.check_port ... (its --help says what each function must take and return)
"""
from safesteer.check_port.command import main, resolve
from safesteer.check_port.loss import check_loss, loss_cases
from safesteer.check_port.model import check_hook, check_logits, check_mask, tiny_model
from safesteer.check_port.results import KINDS, Result, verdict
from safesteer.cli import run_cli

__all__ = ["KINDS", "Result", "check_hook", "check_logits", "check_loss", "check_mask", "loss_cases", "main",
           "resolve", "run_cli", "tiny_model", "verdict"]
