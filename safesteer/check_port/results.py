"""The verdict of one check: ok, or the known mistake whose numbers the port reproduces."""
from __future__ import annotations

from dataclasses import dataclass

import torch


KINDS = ("collapsed", "partial", "full")


@dataclass
class Result:
    name: str
    ok: bool
    detail: str = ""

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name}" + (f": {self.detail}" if self.detail else "")


def close(got: torch.Tensor, ref: torch.Tensor, rtol: float) -> bool:
    """Within rtol · max(1, max |ref|) where ref is finite; inf where ref is inf, nan where it is nan."""
    got, ref = got.detach().double(), ref.detach().double()
    if got.shape != ref.shape:
        return False
    finite = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(got), finite):
        return False
    if not torch.equal(got[~finite].nan_to_num(), ref[~finite].nan_to_num()):  # inf = inf, nan = nan
        return False
    scale = max(1.0, ref[finite].abs().max().item()) if finite.any() else 1.0
    return bool(((got - ref)[finite].abs() <= rtol * scale).all())


def verdict(name: str, got, ref, mistakes: list, rtol: float = 1e-4) -> Result:
    """ok if got matches ref; else the first known mistake (what is wrong, its numbers) that got matches."""
    if close(got, ref, rtol):
        return Result(name, True)
    known = (what for what, numbers in mistakes if numbers is not None and close(got, numbers, rtol))
    return Result(name, False, next(known, "no known mistake matches"))
