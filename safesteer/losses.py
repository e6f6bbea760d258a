"""Stage 3's losses without [positions, V] temporaries: the memory-lean twin of distill.py's formulas.

distill.py states each loss as a few lines on log_softmax outputs and lets autograd differentiate them; that
builds several [positions, V] float32 tensors per model (log-softmaxes, exponentials, their gradients). Here
the same losses are torch.autograd.Functions whose forward keeps only logsumexps (over chunks of positions)
and the |S| gathered columns, and whose backward writes the closed-form gradient ∂L/∂z_u = p_u (a_u - ā)
straight into the one [positions, V] buffer any loss must return. Logits of any dtype (bf16 on a GPU) are
upcast a chunk at a time. tests/test_distill.py checks values and gradients against the formulas and a float64
brute force; bench/loss_memory.py measures the saving.

    collapsed_kl   Σ_S p log p/q + p(R) log p(R)/q(R)     (LocalizedKL, with_rest=True)
    partial_kl     Σ_S p log p/q                           (LocalizedKL, with_rest=False)
    full_kl        Σ_V p log p/q                           (FullKL)
"""
from __future__ import annotations

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Upcast bf16/fp16 logits to float32; float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def rest_term(lp_r, lq_r):
    """p(R) log p(R)/q(R), taken as 0 where R holds no mass (p(R) = 0, or S = V)."""
    return torch.where(lp_r > float("-inf"), lp_r.exp() * (lp_r - lq_r), torch.zeros_like(lp_r))


def _logsumexp(z: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """logsumexp over the last axis in float64 (optionally with the columns `exclude` masked out), from logits
    of any dtype: the max is exact, the sum of exp(z - max) carries ~1e-7 relative error. [c, V] -> [c]."""
    z = upcast(z)
    if exclude is not None:
        z = z.index_fill(-1, exclude, float("-inf"))
    m = z.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an all -inf row (S = V) gives -inf, not NaN
    return m.squeeze(-1).double() + (z - m).exp_().sum(-1).double().log()


class LocalizedKL(torch.autograd.Function):
    """`collapsed` (with_rest) and `partial` per position, from chunked logsumexps and the |S| columns.

    Backward: with a_v = ∂L/∂p_v = log(p_v/q_v) + 1 on S, a_R = log(p_R/q_R) + 1 for every token of R (0 in
    `partial`), and ā = Σ_S p_v a_v + p_R a_R, the softmax Jacobian gives ∂L/∂z_u = p_u (a_u - ā), written
    chunk by chunk into the one [n, V] buffer any loss must return: p = exp(z - lse) times (a_R - ā), then the
    S columns overwritten. a_R - ā is computed as -Σ_S p_v (a_v - a_R) (in `partial`, -Σ_S p_v a_v), which is
    the same number (p_R = 1 - Σ_S p_v) without the cancellation of a_R - ā when S holds little mass.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, s_ids, with_rest: bool, chunk: int):
        def logs(z):  # log π on S [n, |S|] and log π(R) [n] (R: logsumexp with S masked out), float64
            chunks = range(0, z.shape[0], chunk)
            lse = torch.cat([_logsumexp(z[i:i + chunk]) for i in chunks])
            lse_r = torch.cat([_logsumexp(z[i:i + chunk], s_ids) for i in chunks]) if with_rest else lse
            return z.gather(-1, s_ids.expand(z.shape[0], -1)).double() - lse[:, None], lse_r - lse, lse
        lp, lp_r, lse = logs(student_logits)
        lq, lq_r, _ = logs(teacher_logits)
        p = lp.exp()
        loss = (p * (lp - lq)).sum(-1)
        if with_rest:
            loss = loss + rest_term(lp_r, lq_r)
            # d_v = a_v - a_R, taken as one difference of logs (a_R = 0 where R is empty)
            d = (lp - lq) - torch.where(lp_r > float("-inf"), lp_r - lq_r, torch.zeros_like(lp_r))[:, None]
        else:
            d = lp - lq + 1  # a_R = 0: tokens of R enter only through the normaliser
        # a_R - ā = -Σ_S p_v d_v: exact, where forming ā and subtracting it from a_R would cancel (p(S) tiny)
        scale_r = -(p * d).sum(-1)
        ctx.save_for_backward(student_logits, lse, s_ids, p, d, scale_r)
        ctx.chunk = chunk
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        z, lse, s_ids, p, d, scale_r = ctx.saved_tensors
        g = grad_out.double()
        work = upcast(z[:1]).dtype
        grad = torch.empty_like(z)
        grad_s = (p * (d + scale_r[:, None]) * g[:, None]).to(z.dtype)  # tokens of S: p_v (a_v - ā) g
        scale_r = (scale_r * g).to(work)[:, None]  # every token of R: p_u (a_R - ā) g
        lse_w = lse.to(work)
        for i in range(0, z.shape[0], ctx.chunk):
            j = min(i + ctx.chunk, z.shape[0])
            if z.dtype == work:  # write straight into the gradient buffer, no temporary
                torch.sub(z[i:j], lse_w[i:j, None], out=grad[i:j]).exp_().mul_(scale_r[i:j])
            else:
                grad[i:j] = (upcast(z[i:j]) - lse_w[i:j, None]).exp_().mul_(scale_r[i:j])
            grad[i:j].scatter_(-1, s_ids.expand(j - i, -1), grad_s[i:j])
        return grad, None, None, None, None


class FullKL(torch.autograd.Function):
    """Ordinary reverse KL over all of V per position, in chunks, with a hand-written backward:
    ∂KL/∂z_u = p_u (log(p_u/q_u) - KL), recomputed per chunk from the saved logsumexps."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, chunk: int):
        losses, lse_p, lse_q = [], [], []
        for i in range(0, student_logits.shape[0], chunk):
            z, t = upcast(student_logits[i:i + chunk]), upcast(teacher_logits[i:i + chunk])
            lse_p.append(torch.logsumexp(z, -1, keepdim=True))
            lse_q.append(torch.logsumexp(t, -1, keepdim=True))
            lp, lq = z - lse_p[-1], t - lse_q[-1]
            losses.append((lp.exp() * (lp - lq)).sum(-1))
        loss = torch.cat(losses)
        ctx.save_for_backward(student_logits, teacher_logits, torch.cat(lse_p), torch.cat(lse_q), loss)
        ctx.chunk = chunk
        return loss.double()

    @staticmethod
    def backward(ctx, grad_out):
        z, t, lse_p, lse_q, loss = ctx.saved_tensors
        grad = torch.empty_like(z)
        for i in range(0, z.shape[0], ctx.chunk):
            sl = slice(i, i + ctx.chunk)
            lp = upcast(z[sl]) - lse_p[sl]
            log_ratio = lp - (upcast(t[sl]) - lse_q[sl])
            grad[sl] = log_ratio.sub_(loss[sl, None]).mul_(lp.exp_()).mul_(grad_out[sl, None].to(lp.dtype))
        return grad, None, None


def collapsed_kl(student_logits, teacher_logits, s_ids, chunk: int = 256):
    return LocalizedKL.apply(student_logits, teacher_logits.detach(), s_ids, True, chunk)


def partial_kl(student_logits, teacher_logits, s_ids, chunk: int = 256):
    return LocalizedKL.apply(student_logits, teacher_logits.detach(), s_ids, False, chunk)


def full_kl(student_logits, teacher_logits, s_ids=None, chunk: int = 128):
    return FullKL.apply(student_logits, teacher_logits.detach(), chunk)
