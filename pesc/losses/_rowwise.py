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


class RowReader:
    """Reads chunks of rows x[bi, ti, :vocab] as `dtype`, scaled by 1/tau, into a reused buffer.

    Large temporaries are expensive mostly through page faults on fresh memory, so each reader owns
    one (chunk x vocab) buffer; the tensor `read` returns is valid until the next read. When x's
    (batch, length) axes can be viewed as one (contiguous logits, or the trainer's packed (1, N, V)),
    rows are gathered with index_select straight into the buffer.
    """

    def __init__(self, x: torch.Tensor, bi: torch.Tensor, ti: torch.Tensor, vocab: int, dtype: torch.dtype,
                 chunk: int, tau: float = 1.0):
        x = x.detach()
        self.x, self.bi, self.ti, self.vocab, self.dtype, self.tau = x, bi, ti, vocab, dtype, tau
        try:
            self.flat = x.view(x.shape[0] * x.shape[1], x.shape[2])
            self.idx = bi * x.shape[1] + ti
        except RuntimeError:
            self.flat = None
        direct = self.flat is not None and x.dtype == dtype and x.shape[-1] == vocab
        self.raw = (torch.empty(chunk, x.shape[-1], dtype=x.dtype, device=x.device)
                    if self.flat is not None and not direct else None)
        self.buf = torch.empty(chunk, vocab, dtype=dtype, device=x.device)
        self.direct = direct

    def view(self, start: int, end: int) -> torch.Tensor | None:
        """The rows as a view of x (no copy, must not be modified) when they are consecutive rows of
        a tensor already in the compute dtype and tau == 1; else None."""
        if not (self.direct and self.tau == 1.0):
            return None
        first, last = int(self.idx[start]), int(self.idx[end - 1])
        if last - first != end - start - 1:
            return None
        return self.flat[first:last + 1]

    def read(self, start: int, end: int) -> torch.Tensor:
        r = end - start
        out = self.buf[:r]
        if self.direct:
            torch.index_select(self.flat, 0, self.idx[start:end], out=out)
        else:
            if self.flat is not None:
                raw = self.raw[:r]
                torch.index_select(self.flat, 0, self.idx[start:end], out=raw)
            else:
                raw = self.x[self.bi[start:end], self.ti[start:end]]
            out.copy_(raw[:, : self.vocab])
        if self.tau != 1.0:
            out.mul_(1.0 / self.tau)
        return out


def grad_buffer(x: torch.Tensor, n_rows: int, vocab: int) -> torch.Tensor:
    """A gradient buffer shaped like x: uninitialised when the rows written cover all of it."""
    full = n_rows == x.shape[0] * x.shape[1] and vocab == x.shape[-1]
    return torch.empty_like(x, memory_format=torch.contiguous_format) if full else torch.zeros_like(
        x, memory_format=torch.contiguous_format)


def write_rows(grad: torch.Tensor, bi, ti, start: int, end: int, vocab: int, values: torch.Tensor) -> None:
    """grad[bi, ti, :vocab] = values for the rows start:end (cast to grad's dtype)."""
    b, t = bi[start:end], ti[start:end]
    if vocab == grad.shape[-1]:
        grad[b, t] = values.to(grad.dtype)
    else:
        grad[b, t, :vocab] = values.to(grad.dtype)


def logsumexp_(x: torch.Tensor, scratch: torch.Tensor, return_shift: bool = False):
    """log sum exp over the last axis (R, 1), using `scratch` (same shape) as workspace, which is
    left holding exp(x - shift) (shift = the row maximum, 0 for rows without a finite one)."""
    m = x.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    torch.sub(x, m, out=scratch)
    lse = scratch.exp_().sum(-1, keepdim=True).log_().add_(m)
    return (lse, m) if return_shift else lse


class DenseForwardKL:
    """Fast row function for KL(p || q) against dense teacher logits, with the generic rule as a
    fallback for rows holding -inf logits (where the closed form below would give NaN).

    value = sum_v p_v (z_T - z_S)_v - lse(z_T) + lse(z_S);  d value / d z_S = q - p.
    About half the memory passes of the generic path, in two reused buffers: no log-softmax
    tensors, no clamps.
    """

    def __init__(self, rule: RowRule, teacher_logits: torch.Tensor, teacher_vocab: int, tau: float):
        self.logits, self.vocab, self.tau = teacher_logits.detach(), teacher_vocab, tau
        self.generic = dense_rows(rule, teacher_logits, teacher_vocab, tau)
        self.reader = None

    def __call__(self, b, t, lq, q, floor):
        return self.generic(b, t, lq, q, floor)

    def raw(self, start, end, bi, ti, zs, out, need_grad):
        """zs: the student rows (not modified); out: a buffer of zs's shape for the gradient."""
        r = zs.shape[0]
        if self.reader is None or self.reader.buf.shape[0] < r:
            self.reader = RowReader(self.logits, bi, ti, self.vocab, zs.dtype, r, self.tau)
            self.scratch = torch.empty_like(self.reader.buf)
            self.scratch2 = torch.empty_like(self.reader.buf)
        zt = self.reader.view(start, end)
        zt = self.reader.read(start, end) if zt is None else zt
        p, d = self.scratch[:r], self.scratch2[:r]
        lse_t = logsumexp_(zt, p)
        lse_s = logsumexp_(zs, p)
        torch.sub(zt, lse_t, out=p).exp_()
        torch.sub(zt, zs, out=d).mul_(p)        # one product, summed pairwise: no cancellation
        value = d.sum(-1) + (lse_s - lse_t).view(-1)
        if not bool(torch.isfinite(value).all()):
            return None
        if not need_grad:
            return value, None
        gz = torch.sub(zs, lse_s, out=out).exp_().sub_(p)       # q - p
        return value, gz

    def release(self):
        self.reader = self.scratch = self.scratch2 = None


def _run(student, rows, bi, ti, vocab, tau, coef, chunk, need_grad):
    dtype = compute_dtype(student)
    floor = log_tiny(dtype)
    total = torch.zeros((), dtype=torch.float64, device=student.device)
    grad = grad_buffer(student, bi.numel(), vocab) if need_grad else None
    raw = getattr(rows, "raw", None)
    n = bi.numel()
    reader = RowReader(student, bi, ti, vocab, dtype, min(chunk, n), tau)
    try:
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            s = reader.view(start, end) if raw is not None else None
            s = reader.read(start, end) if s is None else s
            out = raw(start, end, bi, ti, s, reader.buf[: end - start], need_grad) if raw is not None else None
            if out is not None:
                value, gz = out
            else:
                b, t = bi[start:end], ti[start:end]
                lq = torch.log_softmax(s, dim=-1)      # (the fast path, if any, left s intact)
                q = lq.exp()
                value, gz = rows(b, t, lq, q, floor)
                del lq
                if need_grad:
                    gz.sub_(q * gz.sum(-1, keepdim=True))   # softmax Jacobian: qG - q sum(qG)
                del q
            total += value.sum(dtype=torch.float64)
            if need_grad:
                gz.mul_(coef / tau)
                write_rows(grad, bi, ti, start, end, vocab, gz)
            del gz, out
    finally:
        if hasattr(rows, "release"):
            rows.release()
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
    q * dvalue/dq. A row function may also offer `raw(start, end, bi, ti, z, out, need_grad)` taking
    the scaled logits z = s / tau (read-only) and a buffer `out` of z's shape, returning (value,
    d value / d z), or None to fall back to the generic path.
    """
    return _RowLoss.apply(student, rows, bi, ti, vocab, tau, coef, chunk)
