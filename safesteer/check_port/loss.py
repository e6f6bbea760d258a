"""The loss a port computes, against the method's formulas in float64 (written here, not imported) on random
and edge-case inputs: a very confident teacher, logits shifted by a constant, |S| = 1, S holding most of the
mass, padded rows, an end of turn inside the window; value and gradient."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from safesteer.check_port.results import KINDS, Result, close


# ----------------------------------------------------------------------------- the loss

def per_position(ls, lt, s_ids, kind: str, rest: str = "logsumexp") -> torch.Tensor:
    """The method's loss at each position in float64: [b, T, V] x 2 -> [b, T]. rest="subtract" is the
    mistake, as a port would write it: log π(R) = log(1 − Σ_S π) in float32."""
    lp, lq = ls.double().log_softmax(-1), lt.double().log_softmax(-1)
    if kind == "full":
        return (lp.exp() * (lp - lq)).sum(-1)
    lp_s, lq_s = lp[..., s_ids], lq[..., s_ids]
    loss = (lp_s.exp() * (lp_s - lq_s)).sum(-1)
    if kind == "partial":
        return loss
    if rest == "subtract":
        lp_r, lq_r = (torch.log(1 - z.float().softmax(-1)[..., s_ids].sum(-1)).double() for z in (ls, lt))
    else:  # log π(R) = logsumexp over V with S masked out, minus logsumexp over V
        in_s = torch.zeros(ls.shape[-1], dtype=torch.bool, device=ls.device)
        in_s[s_ids] = True
        lp_r, lq_r = (x.masked_fill(in_s, float("-inf")).logsumexp(-1) for x in (lp, lq))
    return loss + torch.where(lp_r > float("-inf"), lp_r.exp() * (lp_r - lq_r), torch.zeros_like(lp_r))


def _position_mean(per, m):
    """The mean over the sequences at each position, then over the positions any sequence has."""
    at_each = (per * m).sum(0) / m.sum(0).clamp_min(1)
    return at_each.sum() / (m.sum(0) > 0).sum()


REDUCTIONS = {  # per-position losses [b, T], mask [b, T] -> the step's loss
    "sequence mean": lambda per, m: ((per * m).sum(-1) / m.sum(-1).clamp_min(1)).mean(),  # the method's
    "token mean": lambda per, m: (per * m).sum() / m.sum(),
    "all positions": lambda per, m: (per * m).mean(),
    "sequence sum": lambda per, m: (per * m).sum(-1).mean(),
    "position mean": _position_mean,
}


def loss_value(ls, lt, mask, s_ids, kind: str, rest: str = "logsumexp", reduce: str = "sequence mean",
               shift: int = 0, swap: bool = False, edit_mask=None) -> torch.Tensor:
    """The step's loss; with any argument after `kind`, a known mistake's value of it."""
    if shift == 1:  # the logits of position i with the mask of position i + 1
        ls, lt, mask = ls[:, :-1], lt[:, :-1], mask[:, 1:]
    elif shift == -1:
        ls, lt, mask = ls[:, 1:], lt[:, 1:], mask[:, :-1]
    if swap:
        ls, lt = lt, ls
    m = (edit_mask(mask) if edit_mask else mask).double()
    return REDUCTIONS[reduce](per_position(ls, lt, s_ids, kind, rest), m)


def loss_mistakes(kind: str) -> list[tuple[str, dict]]:
    """(what is wrong, the arguments of loss_value that reproduce it), the most specific first."""
    wrong_axis = "mean over the wrong axis: "
    found = [
        # logits[:, :-1] with mask[:, 1:] leaves out each row's last masked position, whatever it holds
        ("off by one position: each row's last masked position, its end-of-turn token, is left out, as a "
         "second label shift does (logits[:, :-1] with mask[:, 1:]; completion_logits(...)[:, i] already "
         "predicts token i)", dict(shift=1)),
        ("off by one position: positions 1 … n + 1 count instead of 0 … n (logits[:, 1:] with "
         "mask[:, :-1]): the first completion token is left out, the one after the end of turn counted",
         dict(shift=-1)),
        (wrong_axis + "a mean over the batch's tokens, so a long sequence counts more; take each sequence's "
         "mean over its positions, then the mean over sequences", dict(reduce="token mean")),
        (wrong_axis + "a mean over all b·T positions, padding counted", dict(reduce="all positions")),
        (wrong_axis + "each sequence's sum over its positions, not its mean", dict(reduce="sequence sum")),
        (wrong_axis + "a mean over the sequences at each position, then over the positions",
         dict(reduce="position mean")),
        ("the mask is ignored: padding and positions after the end of turn count",
         dict(edit_mask=torch.ones_like)),
        ("the forward KL(q ‖ p): the method's is the reverse KL(p ‖ q), p the student's",
         dict(swap=True)),
    ]
    if kind == "collapsed":
        found.insert(0, ("log π(R) taken as log(1 − Σ_S π), by subtraction: noise once π(R) < ~1e-4 in "
                         "float32; use logsumexp over V with S masked to −inf, minus logsumexp over V",
                         dict(rest="subtract")))
    names = {"collapsed": "`collapsed` (S and the rest R)", "partial": "the authors' `partial` (S alone)",
             "full": "a full-vocabulary KL"}
    found += [(f"this is {names[other]}, not {names[kind]} (--kind names the loss you port)",
               dict(kind=other)) for other in KINDS if other != kind]
    return found


@dataclass
class LossCase:
    name: str
    student: torch.Tensor  # [b, T, V] logits
    teacher: torch.Tensor  # [b, T, V]
    mask: torch.Tensor     # [b, T]
    s_ids: torch.Tensor    # [k]
    hint: str = ""         # said when the port fails and no known mistake matches


def loss_cases(seed: int = 0) -> list[LossCase]:
    g = torch.Generator().manual_seed(seed)
    b, t, v = 3, 6, 48
    s = torch.tensor([3, 7, 11, 19, 23, 31])
    full, rows = torch.ones(b, t), torch.arange(b)

    def logits(scale: float = 2.0):
        return torch.randn(b, t, v, generator=g) * scale
    ls, lt = logits(), logits()
    confident = logits()
    confident[..., s[0]] += 70  # q(R) ≈ 42·e^-70: 1 − Σ_S q is 0 in float32 and in float64
    mass_s, mass_t = logits(), logits()
    mass_s[..., s] += 9
    mass_t[..., s] += 9
    padded = (torch.arange(t)[None] < torch.tensor([6, 4, 1])[:, None]).float()
    pad_s, pad_t = ls.clone(), lt.clone()
    pad_s[padded == 0] = logits(10.0)[padded == 0]  # large logits where the mask is 0
    pad_t[padded == 0] = logits(10.0)[padded == 0]
    eot = torch.tensor([1, 3, 5])  # each row's first end-of-turn token
    to_eot = (torch.arange(t)[None] <= eot[:, None]).float()
    eot_t = lt.clone()
    eot_t[rows, eot] = logits(6.0)[rows, eot]  # the end-of-turn position carries a large loss
    subtraction = "log q(R) must be a logsumexp over R, not log(1 − Σ_S q)"
    return [
        LossCase("random logits", ls, lt, full, s),
        LossCase("a very confident teacher (q(R) ≈ 1e-29)", logits(), confident, full, s,
                 f"q(R) is far below float32's resolution: {subtraction}"),
        LossCase("logits shifted by a constant (student +100, teacher −50)", ls + 100, lt - 50, full, s,
                 "a softmax ignores a constant added to the logits, and so must the loss"),
        LossCase("|S| = 1", ls, lt, full, s[:1]),
        LossCase("S holding most of the mass (p(S), q(S) ≈ 0.999)", mass_s, mass_t, full, s,
                 f"p(R) and q(R) are small: {subtraction}"),
        LossCase("padded rows (lengths 6, 4, 1; large logits in the padding)", pad_s, pad_t, padded, s,
                 "positions where the mask is 0 must not count"),
        LossCase("an end-of-turn token inside the window (mask 1 through it)", ls, eot_t, to_eot, s),
        LossCase("bf16 logits, as on a GPU", ls.bfloat16(), lt.bfloat16(), full, s,
                 "upcast bf16 logits to float32 before the softmax"),
    ]


def check_loss_case(loss_fn, case: LossCase, kind: str) -> Result:
    z = case.student.clone().requires_grad_()
    try:
        out = loss_fn(z, case.teacher.clone(), case.mask.clone(), case.s_ids.clone())
    except Exception as e:  # the porter's code: any failure is this case's result
        return Result(case.name, False, f"raised {type(e).__name__}: {e}")
    if not torch.is_tensor(out) or out.numel() != 1:
        shape = list(out.shape) if torch.is_tensor(out) else type(out).__name__
        return Result(case.name, False, f"returned {shape}: the loss must be one number, the step's loss")
    out = out.reshape(())
    ref_z = case.student.detach().double().requires_grad_()
    ref = loss_value(ref_z, case.teacher, case.mask, case.s_ids, kind)
    if not close(out, ref, 1e-4):
        numbers = f"(got {out.item():.6g}, the method's {ref.item():.6g})"
        for what, kwargs in loss_mistakes(kind):
            inputs = (case.student, case.teacher, case.mask, case.s_ids)
            if close(out, loss_value(*inputs, **{"kind": kind, **kwargs}), 1e-4):
                return Result(case.name, False, f"{what} {numbers}")
        hint = f": {case.hint}" if case.hint else ""
        return Result(case.name, False, f"{numbers}, no known mistake matches{hint}")
    if not out.requires_grad:
        return Result(case.name, False, "the value is right, but no gradient reaches the student's logits")
    out.backward()
    ref.backward()
    scale = ref_z.grad.abs().max()
    rtol = 2e-2 if case.student.dtype == torch.bfloat16 else 1e-4  # a bf16 gradient keeps 8 bits
    if z.grad is None or not close(z.grad / scale, ref_z.grad / scale, rtol):
        return Result(case.name, False, "the value is right, the gradient is not (a detached piece, or a "
                                        "hand-written backward?)")
    return Result(case.name, True, f"|Δ| = {abs(out.item() - ref.item()):.1e}")


def check_loss(loss_fn, kind: str = "collapsed", seed: int = 0) -> list[Result]:
    results = [check_loss_case(loss_fn, case, kind) for case in loss_cases(seed)]
    case, name = loss_cases(seed)[0], "the teacher's logits get no gradient"
    teacher = case.teacher.clone().requires_grad_()
    try:
        loss_fn(case.student.clone().requires_grad_(), teacher, case.mask, case.s_ids).sum().backward()
    except Exception as e:  # the porter's code
        return results + [Result(name, False, f"raised {type(e).__name__}: {e}")]
    leaks = teacher.grad is not None and bool(teacher.grad.abs().max() > 0)
    return results + [Result(name, not leaks, "they get one: detach the teacher's logits" if leaks else "")]
