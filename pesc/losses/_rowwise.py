"""Machinery shared by the per-position losses: a fused, chunked forward+gradient over vocabulary rows.

Each masked position is a row of V logits. Rows are processed in chunks (sized by a memory budget);
for each chunk the loss value *and* its gradient with respect to the student logits are computed at
once, and the gradient is written into one buffer shaped like the student logits. That buffer is the
only full-size tensor the loss creates: autograd never stores per-chunk softmaxes. The backward pass
returns the buffer (scaled by the incoming gradient); if backward is called a second time (e.g. by
gradcheck with retain_graph) the gradient is recomputed.

A row function gets a chunk of student rows and returns values and q * dvalue/dq; `dense_rows`
and `bucket_rows` build one from a rule and a dense teacher or a top-k cache. A rule is a function
`rule(lp, lq, p, q) -> (value (R,), qG (R, W))` on teacher/student log-probs (floored at
log(tiny), never -inf) and probabilities. `qG` is q * dvalue/dq: the gradient of the value
with respect to the student's logits z = s / tau is then `qG - q * sum(qG)` (softmax Jacobian), up to
any constant added to dvalue/dq, which cancels because sum(q) = 1.
"""

from __future__ import annotations

from typing import Callable

import torch

from pesc.losses.base import compute_dtype, log_tiny

RowRule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
RowFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


def dense_rows(rule: RowRule, teacher_logits: torch.Tensor, teacher_vocab: int, tau: float) -> RowFn:
    """Row function comparing with the teacher's full distribution softmax(z_T[:V_T] / tau)."""
    logits = teacher_logits.detach()

    def rows(b, t, lq, q, floor):
        lp = logits[b, t, :teacher_vocab].to(lq.dtype)
        lp.div_(tau)
        lp = torch.log_softmax(lp, dim=-1)
        p = lp.exp()
        return rule(lp.clamp_(min=floor), lq.clamp(min=floor), p, q)

    return rows


def bucket_rows(rule: RowRule, ids: torch.Tensor, logprobs: torch.Tensor, rest: torch.Tensor) -> RowFn:
    """Row function on k + 1 buckets: the teacher's cached top-k ids, then all other tokens.

    The cached teacher log-probs (and the rest mass) are renormalised to sum to 1; the student's
    bucket masses are its probabilities at the ids and the exact log-sum-exp of everything else.
    """
    logprobs, rest = logprobs.detach(), rest.detach()

    def rows(b, t, lq, q, floor):
        dtype = lq.dtype
        idx = ids[b, t]
        lp_b = torch.cat([logprobs[b, t].to(dtype), rest[b, t].to(dtype).unsqueeze(-1)], dim=-1)
        lp_b = lp_b - torch.logsumexp(lp_b, dim=-1, keepdim=True)
        lq_b = torch.cat([lq.gather(-1, idx),
                          torch.logsumexp(lq.scatter(-1, idx, float("-inf")), dim=-1, keepdim=True)], dim=-1)
        q_b = lq_b.exp()
        value, qg_b = rule(lp_b.clamp(min=floor), lq_b.clamp(min=floor), lp_b.exp(), q_b)
        q_rest = q_b[:, -1:]
        g_rest = torch.where(q_rest > 0, qg_b[:, -1:] / q_rest.clamp(min=torch.finfo(dtype).tiny),
                             torch.zeros_like(q_rest))
        qg = q * g_rest
        qg.scatter_(-1, idx, qg_b[:, :-1])
        return value, qg

    return rows


class DenseForwardKL:
    """Fast row function for KL(p || q) against dense teacher logits, with the generic rule as a
    fallback for rows holding -inf logits (where the closed form below would give NaN).

    value = sum_v p_v (z_T - z_S)_v - lse(z_T) + lse(z_S);  d value / d z_S = q - p.
    About half the memory passes of the generic path: no log-softmax tensors, no clamps.
    """

    def __init__(self, rule: RowRule, teacher_logits: torch.Tensor, teacher_vocab: int, tau: float):
        self.logits, self.vocab, self.tau = teacher_logits.detach(), teacher_vocab, tau
        self.generic = dense_rows(rule, teacher_logits, teacher_vocab, tau)

    def __call__(self, b, t, lq, q, floor):
        return self.generic(b, t, lq, q, floor)

    def raw(self, b, t, zs, need_grad):
        zt = self.logits[b, t, : self.vocab].to(zs.dtype)
        if self.tau != 1.0:
            zt.div_(self.tau)
        lse_t = torch.logsumexp(zt, dim=-1, keepdim=True)
        lse_s = torch.logsumexp(zs, dim=-1, keepdim=True)
        p = zt - lse_t
        p.exp_()
        zt.sub_(zs)
        value = torch.bmm(p.unsqueeze(1), zt.unsqueeze(2)).view(-1) + (lse_s - lse_t).view(-1)
        del zt
        if not bool(torch.isfinite(value).all()):
            return None
        if not need_grad:
            return value, None
        gz = zs.sub_(lse_s).exp_().sub_(p)       # q - p, in place on the student rows
        return value, gz


def _run(student, rows, bi, ti, vocab, tau, coef, chunk, need_grad):
    dtype = compute_dtype(student)
    floor = log_tiny(dtype)
    total = torch.zeros((), dtype=torch.float64, device=student.device)
    grad = torch.zeros_like(student) if need_grad else None
    raw = getattr(rows, "raw", None)
    n = bi.numel()
    for start in range(0, n, chunk):
        b, t = bi[start:start + chunk], ti[start:start + chunk]
        s = student[b, t, :vocab].to(dtype)
        if tau != 1.0:
            s.div_(tau)
        out = raw(b, t, s, need_grad) if raw is not None else None
        if out is not None:
            value, gz = out
        else:
            lq = torch.log_softmax(s, dim=-1)
            del s
            q = lq.exp()
            value, gz = rows(b, t, lq, q, floor)
            del lq
            if need_grad:
                gz.sub_(q * gz.sum(-1, keepdim=True))   # softmax Jacobian: qG - q sum(qG)
            del q
        total += value.sum(dtype=torch.float64)
        if need_grad:
            gz.mul_(coef / tau)
            grad[b, t, :vocab] = gz.to(grad.dtype)
        del gz, out
    return total * coef, grad


class _RowLoss(torch.autograd.Function):
    """sum over rows of coef * rule(teacher row, student row); gradient only to the student logits."""

    @staticmethod
    def forward(ctx, student, rows, bi, ti, vocab, tau, coef, chunk):
        need_grad = ctx.needs_input_grad[0]
        total, grad = _run(student, rows, bi, ti, vocab, tau, coef, chunk, need_grad)
        ctx.grad = grad
        ctx.args = (rows, bi, ti, vocab, tau, coef, chunk)
        if need_grad:
            ctx.save_for_backward(student)
        return total.to(compute_dtype(student))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        grad, ctx.grad = ctx.grad, None
        if grad is None:  # second backward through a retained graph: recompute
            (student,) = ctx.saved_tensors
            _, grad = _run(student, *ctx.args, need_grad=True)
        if not (g.numel() == 1 and float(g) == 1.0):
            grad.mul_(g.to(grad.dtype))
        return grad, None, None, None, None, None, None, None


def row_loss(student, rows: RowFn, bi, ti, vocab: int, tau: float, coef: float, chunk: int):
    """Differentiable sum over the masked rows (bi, ti) of coef * value, computed chunk by chunk.

    `rows(b, t, lq, q, floor) -> (value (R,), qG (R, vocab))` gets the student's log-probs / probs
    at temperature tau for a chunk of rows (first `vocab` logits) and returns the per-row values and
    q * dvalue/dq.
    """
    return _RowLoss.apply(student, rows, bi, ti, vocab, tau, coef, chunk)
