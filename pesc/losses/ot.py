r"""Optimal-transport core: plain functions of tensors (no model or trainer types).

Entropic OT between discrete measures a (n points) and b (m points) with cost C (n x m):

    W_eps(a, b; C) = min_{T >= 0, T 1 = a, T^T 1 = b}  <T, C> + eps KL(T | a b^T)

Its dual, with potentials f (n) and g (m):

    W_eps = max_{f, g}  <f, a> + <g, b> - eps <a b^T, exp((f + g^T - C) / eps) - 1>,
    T_ij  = a_i b_j exp((f_i + g_j - C_ij) / eps).

Sinkhorn's algorithm alternates the two c-transforms

    g_j = -eps log sum_i a_i exp((f_i - C_ij) / eps),   f_i = -eps log sum_j b_j exp((g_j - C_ij) / eps)

(column update first, then row update, as POT's `sinkhorn_knopp`/`sinkhorn_log`, starting from
POT's u = 1 on the support of a, so zero-mass padding never changes the iterates). After the row
update the plan has the exact row marginal a.

Everything is batched over a leading problem axis: C (N, n, m), a (N, n), b (N, m). Masses may be 0
(padding or duplicate support points): those rows/columns carry no plan mass and their potentials
are still finite (c-transforms), so gradients never become NaN.

Two numerical regimes, chosen per batch (`method="auto"`):
- scaling domain when (max_j C_ij - min_j C_ij) / eps is small (<= 30 in float32): K = exp(-(C -
  min_j C) / eps) is computed once and each iteration is two batched vector-matrix products, which
  is an order of magnitude faster than log-sum-exp and exact in float32 in that range;
- log domain otherwise (small epsilon): log-sum-exp updates, stable for any epsilon.

Values per problem: `linear` = <T, C> (what POT's `sinkhorn2` returns) or `entropic` =
<f, a> + <g, b> (the dual value of W_eps, with g the c-transform of the final f).

Gradients: `grad="envelope"` uses the envelope theorem at the computed solution: dW/dC = T,
dW/da = f, dW/db = g (exact for the entropic value at convergence; for the linear value it is the
usual first-order shortcut that ignores how the plan moves). No iteration is stored: memory is one
cost-sized tensor per problem batch. `grad="autodiff"` back-propagates through every iteration
(exact gradient of whatever was computed, memory grows with the iteration count).

Debiased Sinkhorn divergence: S(a, b) = W(a, b; C_xy) - (W(a, a; C_xx) + W(b, b; C_yy)) / 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Value = Literal["linear", "entropic"]
Grad = Literal["envelope", "autodiff"]
Method = Literal["auto", "scaling", "log"]

# Largest per-row cost range / eps for which the scaling domain is used.
SCALING_MAX_RANGE = {torch.float32: 30.0, torch.float64: 200.0}
# Bytes of K and K^T per iteration block: the block stays in cache (L2 plus a share of L3); smaller
# blocks make the iterations dispatch-bound (2048 problems of 139 x 139: 1 MiB 0.47 s, 4 MiB 0.39 s).
_CACHE_BYTES = 4 * 2**20


@dataclass
class SinkhornResult:
    """Solution of a batch of entropic OT problems (no autograd graph).

    T_ij = exp(log_u_i + log_v_j - C_ij / eps); f, g are the dual potentials (finite everywhere).
    """

    log_u: torch.Tensor
    log_v: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    epsilon: float
    n_iters: int
    method: str
    T: torch.Tensor        # the plan (N, n, m), formed inside the solver (scaling form when possible)
    linear: torch.Tensor   # <T, C> (N,)
    err: torch.Tensor      # L1 error of the column marginal (N,)

    def plan(self, C: torch.Tensor) -> torch.Tensor:
        """The plan recomputed from the potentials and C."""
        T = torch.add(self.log_u.unsqueeze(-1), self.log_v.unsqueeze(-2))
        return safe_exp_(T.add_(C, alpha=-1.0 / self.epsilon))


def safe_exp_(z: torch.Tensor) -> torch.Tensor:
    """exp, in place, with arguments floored at log(smallest normal): entries that would be
    subnormal (or 0) become ~1e-38 instead. Subnormal results make exp tens of times slower on x86,
    and such entries are zero for every purpose here."""
    return z.clamp_(min=math.log(torch.finfo(z.dtype).tiny)).exp_()


def pairwise_cost(x: torch.Tensor, y: torch.Tensor, cost: Literal["cosine", "euclidean"]) -> torch.Tensor:
    """Cost matrices between point sets x (..., n, d) and y (..., m, d) -> (..., n, m).

    cosine:    C_ij = 1 - cos(x_i, y_j)               in [0, 2]
    euclidean: C_ij = ||x_i - y_j||^2 / d             (squared distance per dimension)
    """
    if cost == "cosine":
        xn = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        yn = y / y.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return (1.0 - xn @ yn.transpose(-1, -2)).clamp_(min=0.0)
    if cost == "euclidean":
        d = x.shape[-1]
        x2 = x.square().sum(-1, keepdim=True)
        y2 = y.square().sum(-1).unsqueeze(-2)
        return (x2 + y2 - 2.0 * (x @ y.transpose(-1, -2))).clamp_(min=0.0) / d
    raise ValueError(f"unknown cost {cost!r}; use 'cosine' or 'euclidean'")


def _choose(C: torch.Tensor, epsilon: float, method: str) -> str:
    if method in ("scaling", "log"):
        return method
    if method != "auto":
        raise ValueError(f"unknown Sinkhorn method {method!r}; use auto, scaling or log")
    if C.numel() == 0:
        return "log"
    rng = (C.amax(-1) - C.amin(-1)).max().item() / epsilon
    return "scaling" if rng <= SCALING_MAX_RANGE.get(C.dtype, 30.0) else "log"


def _block(n: int, m: int, itemsize: int) -> int:
    return max(1, min(256, _CACHE_BYTES // max(1, 2 * n * m * itemsize)))


@torch.no_grad()
def sinkhorn(C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, epsilon: float, n_iters: int = 50,
             tol: float | None = None, method: Method = "auto", check_every: int = 10) -> SinkhornResult:
    """Solve N entropic OT problems at once. C (N, n, m), a (N, n), b (N, m), each summing to 1.

    Runs `n_iters` iterations, or stops earlier once the L1 error of the column marginal is below
    `tol` for every problem (checked every `check_every` iterations).
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    C, a, b = C.detach(), a.detach(), b.detach()
    N, n, m = C.shape
    how = _choose(C, epsilon, method)
    dtype = C.dtype
    log_u = torch.empty(N, n, dtype=dtype, device=C.device)
    log_v = torch.empty(N, m, dtype=dtype, device=C.device)
    f = torch.empty_like(log_u)
    g = torch.empty_like(log_v)
    T = torch.empty_like(C)
    linear = torch.empty(N, dtype=dtype, device=C.device)
    err = torch.empty_like(linear)
    blk = _block(n, m, C.element_size())
    run = _scaling_block if how == "scaling" else _log_block

    def solve(sl):
        it = run(C[sl], a[sl], b[sl], epsilon, n_iters, tol, check_every,
                 (log_u[sl], log_v[sl], f[sl], g[sl], T[sl], linear[sl], err[sl]))
        return it

    iters_done = max(_map_blocks(solve, [slice(s, s + blk) for s in range(0, N, blk)]))
    return SinkhornResult(log_u, log_v, f, g, float(epsilon), iters_done, how, T, linear, err)


def _map_blocks(fn, blocks: list) -> list:
    """Run fn over independent problem blocks. The iterations are many small operations: instead of
    splitting each one over the intra-op threads (a barrier per operation, which stalls whenever a
    core is busy elsewhere), each of the threads solves whole blocks with single-threaded operations.
    The intra-op thread count is restored afterwards."""
    threads = torch.get_num_threads()
    workers = min(threads, len(blocks))
    if workers <= 1:
        return [fn(bl) for bl in blocks]
    from concurrent.futures import ThreadPoolExecutor

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            return list(ex.map(fn, blocks))
    finally:
        torch.set_num_threads(threads)


def _start(shift, eps, a):
    """u = 1 on the support of a in the unshifted problem (POT's start, blind to zero-mass padding),
    expressed for K = exp(-(C - shift) / eps)."""
    sh = shift.squeeze(-1)
    return torch.exp((sh.amin(-1, keepdim=True) - sh) / eps) * (a > 0)


def _finish(C, b, T, out, lu, lv, f, g):
    """Write a block's results into the output slices (log_u, log_v, f, g, T, linear, err)."""
    o_lu, o_lv, o_f, o_g, o_T, o_lin, o_err = out
    o_lu.copy_(lu)
    o_lv.copy_(lv)
    o_f.copy_(f)
    o_g.copy_(g)
    if T.data_ptr() != o_T.data_ptr():
        o_T.copy_(T)
    o_lin.copy_(frobenius(T, C))
    o_err.copy_((T.sum(1) - b).abs().sum(-1))


def _scaling_block(C, a, b, eps, n_iters, tol, check_every, out):
    shift = C.amin(-1, keepdim=True)                       # row-wise: every row of K has a 1
    K = torch.sub(shift, C, out=out[4]).div_(eps).exp_()  # (B, n, m), in the plan's output memory
    KT = K.transpose(1, 2).contiguous()                    # (B, m, n): both products read rows
    # rows as (B, 1, n) / (B, 1, m) so each half-iteration is one product and one in-place division
    a3, b3 = a.unsqueeze(1), b.unsqueeze(1)
    u = _start(shift, eps, a).unsqueeze(1)
    v = torch.ones_like(b3)
    it = 0
    for it in range(1, n_iters + 1):
        torch.div(b3, torch.bmm(u, K, out=v), out=v)
        torch.div(a3, torch.bmm(v, KT, out=u), out=u)
        if tol is not None and it % check_every == 0:
            col = torch.bmm(u, K) * v
            if (col - b3).abs().sum(-1).max().item() < tol:
                break
    ktu = torch.bmm(u, K).squeeze(1)                       # sum_i u_i K_ij
    kv = torch.bmm(v, KT).squeeze(1)                       # sum_j K_ij v_j
    u, v = u.squeeze(1), v.squeeze(1)
    tiny = torch.finfo(C.dtype).tiny
    f = shift.squeeze(-1) - eps * torch.log(kv.clamp(min=tiny))
    g = -eps * torch.log(ktu.clamp(min=tiny))
    log_u = torch.log(u) + shift.squeeze(-1) / eps
    log_v = torch.log(v)
    T = K.mul_(u.unsqueeze(-1)).mul_(v.unsqueeze(-2))     # the plan u_i K_ij v_j, in K's memory
    _finish(C, b, T, out, log_u, log_v, f, g)
    return it


def _log_block(C, a, b, eps, n_iters, tol, check_every, out):
    Ce = C / eps
    la, lb = torch.log(a), torch.log(b)
    lu = torch.where(a > 0, 0.0, -math.inf).to(a.dtype)
    lv = torch.zeros_like(b)
    it = 0
    for it in range(1, n_iters + 1):
        lv = lb - torch.logsumexp(lu.unsqueeze(-1) - Ce, dim=1)
        lu = la - torch.logsumexp(lv.unsqueeze(-2) - Ce, dim=2)
        if tol is not None and it % check_every == 0:
            col = torch.exp(torch.logsumexp(lu.unsqueeze(-1) - Ce, dim=1) + lv)
            if (col - b).abs().sum(-1).max().item() < tol:
                break
    f = -eps * torch.logsumexp(lv.unsqueeze(-2) - Ce, dim=2)
    g = -eps * torch.logsumexp(lu.unsqueeze(-1) - Ce, dim=1)
    T = safe_exp_(Ce.neg_().add_(lu.unsqueeze(-1)).add_(lv.unsqueeze(-2)))
    _finish(C, b, T, out, lu, lv, f, g)
    return it


def frobenius(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """<A_r, B_r> for each r of (N, n, m) batches (pairwise summation: a float32 dot product of
    n * m terms through a matrix product loses ~1e-5 relative)."""
    return (A * B).sum((1, 2))


def _values(C, a, b, res: SinkhornResult, value: str):
    """(value (N,), plan (N, n, m), column-marginal L1 error (N,))."""
    T, err = res.T, res.err
    if value == "linear":
        v = res.linear
    elif value == "entropic":
        v = (res.f * a).sum(-1) + (res.g * b).sum(-1)
    else:
        raise ValueError(f"unknown OT value {value!r}; use 'linear' or 'entropic'")
    return v, T, err


class _EnvelopeOT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, C, a, b, epsilon, n_iters, tol, method, value):
        res = sinkhorn(C, a, b, epsilon, n_iters, tol, method)
        v, T, err = _values(C.detach(), a.detach(), b.detach(), res, value)
        ctx.save_for_backward(T, res.f, res.g)
        ctx.mark_non_differentiable(err)
        return v, err

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gv, _gerr):
        T, f, g = ctx.saved_tensors
        gC = T * gv[:, None, None] if ctx.needs_input_grad[0] else None
        ga = f * gv[:, None] if ctx.needs_input_grad[1] else None
        gb = g * gv[:, None] if ctx.needs_input_grad[2] else None
        return gC, ga, gb, None, None, None, None, None


def _unrolled(C, a, b, epsilon, n_iters, method, value):
    """Differentiable Sinkhorn iterations (same updates as `sinkhorn`, with autograd)."""
    how = _choose(C.detach(), epsilon, method)
    eps = epsilon
    if how == "scaling":
        shift = C.detach().amin(-1, keepdim=True)
        K = torch.exp((shift - C) / eps)
        u = _start(shift, eps, a)
        v = torch.ones_like(b)
        for _ in range(n_iters):
            v = b / torch.bmm(u.unsqueeze(1), K).squeeze(1)
            u = a / torch.bmm(K, v.unsqueeze(-1)).squeeze(-1)
        T = u.unsqueeze(-1) * K * v.unsqueeze(-2)
        tiny = torch.finfo(C.dtype).tiny
        f = shift.squeeze(-1) - eps * torch.log(torch.bmm(K, v.unsqueeze(-1)).squeeze(-1).clamp(min=tiny))
        g = -eps * torch.log(torch.bmm(u.unsqueeze(1), K).squeeze(1).clamp(min=tiny))
    else:
        Ce = C / eps
        tiny = torch.finfo(C.dtype).tiny
        la, lb = torch.log(a.clamp(min=tiny)), torch.log(b.clamp(min=tiny))
        la = torch.where(a > 0, la, torch.full_like(la, -math.inf))
        lb = torch.where(b > 0, lb, torch.full_like(lb, -math.inf))
        lu = torch.where(a > 0, 0.0, -math.inf).to(a.dtype)
        lv = torch.zeros_like(b)
        for _ in range(n_iters):
            lv = lb - torch.logsumexp(lu.unsqueeze(-1) - Ce, dim=1)
            lu = la - torch.logsumexp(lv.unsqueeze(-2) - Ce, dim=2)
        T = torch.exp(lu.unsqueeze(-1) + lv.unsqueeze(-2) - Ce)
        f = -eps * torch.logsumexp(lv.unsqueeze(-2) - Ce, dim=2)
        g = -eps * torch.logsumexp(lu.unsqueeze(-1) - Ce, dim=1)
    err = (T.detach().sum(1) - b.detach()).abs().sum(-1)
    if value == "linear":
        return (T * C).sum((1, 2)), err
    if value == "entropic":
        # primal value <T, C> + eps KL(T | a b^T) of the unrolled plan
        tiny = torch.finfo(C.dtype).tiny
        ab = a.unsqueeze(-1) * b.unsqueeze(-2)
        kl = torch.where(T > 0, T * (torch.log(T.clamp(min=tiny)) - torch.log(ab.clamp(min=tiny))),
                         torch.zeros_like(T)).sum((1, 2)) - T.sum((1, 2)) + ab.sum((1, 2))
        return (T * C).sum((1, 2)) + eps * kl, err
    raise ValueError(f"unknown OT value {value!r}; use 'linear' or 'entropic'")


def entropic_ot(C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, epsilon: float, n_iters: int = 50,
                tol: float | None = None, value: Value = "linear", grad: Grad = "envelope",
                method: Method = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Batched entropic OT. Returns (value (N,), column-marginal L1 error (N,), no grad).

    Differentiable with respect to C, a and b (see the module docstring for the two gradient modes).
    """
    if grad == "envelope":
        return _EnvelopeOT.apply(C, a, b, float(epsilon), int(n_iters), tol, method, value)
    if grad == "autodiff":
        if tol is not None:
            raise ValueError("grad='autodiff' runs a fixed number of iterations; tol is not supported")
        return _unrolled(C, a, b, float(epsilon), int(n_iters), method, value)
    raise ValueError(f"unknown gradient mode {grad!r}; use 'envelope' or 'autodiff'")


def sinkhorn_divergence(Cxy, Cxx, Cyy, a, b, epsilon, n_iters=50, tol=None, value: Value = "entropic",
                        grad: Grad = "envelope", method: Method = "auto"):
    """Debiased S(a, b) = W(a, b; Cxy) - (W(a, a; Cxx) + W(b, b; Cyy)) / 2, per problem (N,)."""
    wab, err = entropic_ot(Cxy, a, b, epsilon, n_iters, tol, value, grad, method)
    waa, _ = entropic_ot(Cxx, a, a, epsilon, n_iters, tol, value, grad, method)
    wbb, _ = entropic_ot(Cyy, b, b, epsilon, n_iters, tol, value, grad, method)
    return wab - 0.5 * (waa + wbb), err


# --------------------------------------------------------------------------------------------------
# Point clouds given by index into point tables (memory-lean, chunked)
# --------------------------------------------------------------------------------------------------

Normalize = Literal["max", "mean", "none"]


def cost_scale(C: torch.Tensor, valid: torch.Tensor | None, normalize: str) -> torch.Tensor:
    """Per-problem cost unit (N,): the largest ("max") or mean ("mean") cost over valid entries
    (all entries when `valid` is None), or 1 ("none"); never 0."""
    if normalize == "none":
        return torch.ones(C.shape[0], dtype=C.dtype, device=C.device)
    if normalize == "max":
        s = C.amax((1, 2)) if valid is None else torch.where(valid, C, torch.zeros_like(C)).amax((1, 2))
    elif normalize == "mean":
        if valid is None:
            s = C.mean((1, 2))
        else:
            s = torch.where(valid, C, torch.zeros_like(C)).sum((1, 2)) / valid.sum((1, 2)).clamp(min=1)
    else:
        raise ValueError(f"unknown cost normalisation {normalize!r}; use max, mean or none")
    return torch.where(s > 0, s, torch.ones_like(s))


def with_rest(C: torch.Tensor, rest_cost: torch.Tensor) -> torch.Tensor:
    """Append one "rest" point to both sides: cost rest_cost (N,) to every real point, 0 rest-rest."""
    N, n, m = C.shape
    out = C.new_empty(N, n + 1, m + 1)
    out[:, :n, :m] = C
    out[:, :n, m] = rest_cost[:, None]
    out[:, n, :m] = rest_cost[:, None]
    out[:, n, m] = 0.0
    return out


@dataclass
class _Problem:
    """One family of OT problems (ab, aa or bb) over the chunks, for the backward pass."""

    f: torch.Tensor
    g: torch.Tensor
    log_u: torch.Tensor
    log_v: torch.Tensor


class _Table:
    """A point table prepared once per call: unit rows for cosine, squared norms for euclidean."""

    def __init__(self, P: torch.Tensor, cost: str, capacity: int = 0, precision: str = "float32"):
        self.cost, self.d, self.capacity = cost, P.shape[-1], capacity
        if cost == "cosine":
            self.norm = torch.linalg.vector_norm(P, dim=-1).clamp(min=1e-12)
            self.pts = P / self.norm[:, None]
            self.sq = None
        elif cost == "euclidean":
            self.pts, self.sq, self.norm = P, torch.linalg.vecdot(P, P), None
        else:
            raise ValueError(f"unknown cost {cost!r}; use 'cosine' or 'euclidean'")
        self.H = None   # backward accumulators: sum of G-weighted partner points, and of G
        self.s = None
        self._bufs: dict[int, torch.Tensor] = {}
        if precision not in ("float32", "bfloat16"):
            raise ValueError(f"unknown precision {precision!r}; use float32 or bfloat16")
        # bfloat16: the batched products (not the norms, sums or solver) run on bfloat16 copies
        self.gpts = self.pts.to(torch.bfloat16) if (precision == "bfloat16" and P.dtype == torch.float32) else self.pts

    def _buffer(self, slot: int, n: int, dtype: torch.dtype) -> torch.Tensor:
        """(n, d) rows of a workspace kept between chunks (fresh memory costs page faults)."""
        buf = self._bufs.get(slot)
        if buf is None or buf.shape[0] < n or buf.dtype != dtype:
            buf = self._bufs[slot] = torch.empty(max(n, self.capacity), self.d, dtype=dtype, device=self.pts.device)
        return buf[:n]

    def gather(self, idx: torch.Tensor, slot: int = 0) -> torch.Tensor:
        """pts[idx] (N, n, d) in a buffer reused between calls with the same slot."""
        out = self._buffer(slot, idx.numel(), self.gpts.dtype)
        torch.index_select(self.gpts, 0, idx.reshape(-1), out=out)
        return out.view(*idx.shape, -1)

    def costs(self_x, ix: torch.Tensor, other: "_Table", iy: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Costs (N, n, m) between rows ix (N, n) of this table and rows iy (N, m) of `other`
        (written into `out` when given)."""
        x, y = self_x.gather(ix, 0), other.gather(iy, 1)
        shape = (ix.shape[0], ix.shape[1], iy.shape[1])
        dtype = self_x.pts.dtype
        C = torch.empty(shape, dtype=dtype, device=x.device) if out is None else out.view(-1)[:math.prod(shape)].view(shape)
        alpha = -1.0 if self_x.cost == "cosine" else -2.0
        if self_x.cost == "cosine":
            C.fill_(1.0)
        else:
            torch.add(self_x.sq[ix].unsqueeze(-1), other.sq[iy].unsqueeze(-2), out=C)
        if x.dtype == dtype:
            C.baddbmm_(x, y.transpose(1, 2), alpha=alpha)
        else:
            C.add_(torch.bmm(x, y.transpose(1, 2)), alpha=alpha)
        C.clamp_(min=0.0)
        return C if self_x.cost == "cosine" else C.div_(self_x.d)

    def accumulate(self, idx: torch.Tensor, G: torch.Tensor, partner: torch.Tensor) -> None:
        """Add dC-weighted terms for the rows idx (N, n): G (N, n, m) = dvalue/dC, partner (N, m, d)
        the other side's points (unit rows for cosine)."""
        if self.H is None:
            self.H = torch.zeros_like(self.pts)
            self.s = torch.zeros_like(self.pts[:, 0])
        n = G.shape[0] * G.shape[1]
        gp = torch.bmm(G.to(partner.dtype), partner, out=self._buffer(2, n, partner.dtype).view(G.shape[0], G.shape[1], -1))
        gp = gp.view(n, -1)
        if gp.dtype != self.H.dtype:
            gp = self._buffer(3, n, self.H.dtype).copy_(gp)
        self.H.index_add_(0, idx.reshape(-1), gp)
        if self.cost == "euclidean":
            self.s.index_add_(0, idx.reshape(-1), G.sum(-1).reshape(-1))

    def grad(self) -> torch.Tensor:
        """d value / d P of the accumulated terms.

        euclidean, C = ||x - y||^2 / d:  dx = 2/d (x sum_j G_j - sum_j G_j y_j)
        cosine,    C = 1 - <x^, y^>:     dx = (h - x^ <x^, h>) / ||x||,  h = -sum_j G_j y^_j
        """
        if self.H is None:
            return torch.zeros_like(self.pts)
        H, self.H = self.H, None                         # consumed: computed in place
        if self.cost == "euclidean":
            return H.neg_().addcmul_(self.pts, self.s[:, None]).mul_(2.0 / self.d)
        H.neg_()                                         # h
        dot = torch.linalg.vecdot(self.pts, H)
        return H.addcmul_(self.pts, dot[:, None], value=-1.0).div_(self.norm[:, None])


class _PointCloudOT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, a_rest, b_rest, X, Y, ix, iy, n_valid, cfg):
        N, W = a.shape
        rest = a_rest is not None
        dtype = a.dtype
        order = torch.argsort(n_valid, stable=True)
        Wr = W + (1 if rest else 0)
        kinds = ("ab", "aa", "bb") if cfg["debias"] else ("ab",)
        probs = {k: _Problem(*(torch.zeros(N, Wr, dtype=dtype, device=a.device) for _ in range(4))) for k in kinds}
        values = {k: torch.zeros(N, dtype=dtype, device=a.device) for k in kinds}
        linear = torch.zeros(N, dtype=dtype, device=a.device)
        err = torch.zeros(N, dtype=dtype, device=a.device)
        sigma = torch.ones(N, dtype=dtype, device=a.device)
        d = X.shape[-1]
        isz = dtype.itemsize
        per_pos = Wr * Wr * isz * 6 * len(kinds) + 3 * W * d * isz
        chunk = max(1, int(cfg["memory_mb"] * 2**20 // per_pos))
        need_points = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]
        # keep the plans for backward when they fit in the budget; else recompute them there
        keep = need_points and (n_valid.double().square().sum().item() * isz * len(kinds) <= cfg["memory_mb"] * 2**20)
        chunks, plans = [], []
        with torch.no_grad():
            tx = _Table(X.detach(), cfg["cost"], chunk * W, cfg["precision"])
            ty = tx if Y is X else _Table(Y.detach(), cfg["cost"], chunk * W, cfg["precision"])
            cbuf = torch.empty(min(chunk, N) * W * W, dtype=dtype, device=a.device)
            A = torch.cat([a, a_rest[:, None]], 1) if rest else a
            B = torch.cat([b, b_rest[:, None]], 1) if rest else b
            for s in range(0, N, chunk):
                rows = order[s:s + chunk]
                w = max(1, int(n_valid[rows].max()))
                chunks.append((rows, w))
                cols = _cols(w, W, rest, a.device)
                jx, jy = ix[rows, :w], iy[rows, :w]
                # padding repeats each problem's first point (see point_cloud_ot), so maxima over
                # all entries are maxima over the valid ones; only the mean needs the mask
                padded = bool((n_valid[rows] < w).any())
                valid = _valid(n_valid[rows], w) if (padded and cfg["normalize"] == "mean") else None
                C = tx.costs(jx, ty, jy, out=cbuf)
                sg = cost_scale(C, valid, cfg["normalize"])
                C.div_(sg[:, None, None])
                rc = torch.ones_like(sg) if cfg["normalize"] == "max" else C.amax((1, 2))
                sigma[rows] = sg
                ak, bk = A[rows][:, cols], B[rows][:, cols]
                pts = {"ab": (C, ak, bk)}
                if cfg["debias"]:
                    pts["aa"] = (tx.costs(jx, tx, jx).div_(sg[:, None, None]), ak, ak)
                    pts["bb"] = (ty.costs(jy, ty, jy).div_(sg[:, None, None]), bk, bk)
                kept = {}
                for k, (Ck, ak_, bk_) in pts.items():
                    if rest:
                        Ck = with_rest(Ck, rc)
                    res = sinkhorn(Ck, ak_, bk_, cfg["epsilon"], cfg["n_iters"], cfg["tol"], cfg["method"])
                    v, T, e = _values(Ck, ak_, bk_, res, cfg["value"])
                    P = probs[k]
                    P.f[rows[:, None], cols], P.g[rows[:, None], cols] = res.f, res.g
                    P.log_u[rows[:, None], cols], P.log_v[rows[:, None], cols] = res.log_u, res.log_v
                    values[k][rows] = v
                    if k == "ab":
                        linear[rows] = res.linear
                        err[rows] = e
                    if keep:
                        kept[k] = T[:, :w, :w].clone() if rest else T
                    del T, Ck
                plans.append(kept)
        out = values["ab"] - 0.5 * (values["aa"] + values["bb"]) if cfg["debias"] else values["ab"]
        ctx.cfg, ctx.chunks, ctx.probs, ctx.rest, ctx.W, ctx.plans = cfg, chunks, probs, rest, W, plans
        ctx.same_table = Y is X
        ctx.save_for_backward(X, Y, ix, iy, sigma)
        ctx.mark_non_differentiable(linear, err)
        return out, linear, err

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gv, _glin, _gerr):
        X, Y, ix, iy, sigma = ctx.saved_tensors
        cfg, probs, rest, W = ctx.cfg, ctx.probs, ctx.rest, ctx.W
        debias = cfg["debias"]
        ab = probs["ab"]
        ga, gb = ab.f.clone(), ab.g.clone()
        if debias:
            ga -= 0.5 * (probs["aa"].f + probs["aa"].g)
            gb -= 0.5 * (probs["bb"].f + probs["bb"].g)
        ga, gb = ga * gv[:, None], gb * gv[:, None]
        g_a, g_ar = (ga[:, :W], ga[:, W]) if rest else (ga, None)
        g_b, g_br = (gb[:, :W], gb[:, W]) if rest else (gb, None)
        gX = gY = None
        need_x, need_y = ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        if ctx.same_table:
            need_x = need_y = need_x or need_y
        if need_x or need_y:
            # dvalue/dC = T (envelope theorem); C = cost(x, y) / sigma with sigma a constant
            cap = max(len(rows) * w for rows, w in ctx.chunks)
            tx = _Table(X.detach(), cfg["cost"], cap, cfg["precision"])
            ty = tx if ctx.same_table else _Table(Y.detach(), cfg["cost"], cap, cfg["precision"])
            eps = cfg["epsilon"]
            for (rows, w), kept in zip(ctx.chunks, ctx.plans or [{}] * len(ctx.chunks)):
                jx, jy = ix[rows, :w], iy[rows, :w]
                scale = (gv[rows] / sigma[rows])[:, None, None]
                terms = [("ab", tx, jx, ty, jy, 1.0)]
                if debias:
                    terms += [("aa", tx, jx, tx, jx, -0.5)] if need_x else []
                    terms += [("bb", ty, jy, ty, jy, -0.5)] if need_y else []
                for k, t1, j1, t2, j2, coef in terms:
                    T = kept.pop(k, None)
                    if T is None:
                        P = probs[k]
                        C = t1.costs(j1, t2, j2).div_(sigma[rows][:, None, None])
                        T = torch.add(P.log_u[rows, :w, None], P.log_v[rows, None, :w]).add_(C, alpha=-1.0 / eps)
                        T = safe_exp_(T)
                        del C
                    G = T.mul_(scale * coef)         # the kept plan is not needed again
                    if k == "ab":
                        if need_x:
                            tx.accumulate(j1, G, ty.gather(j2, 1))
                        if need_y:
                            ty.accumulate(j2, G.transpose(1, 2), tx.gather(j1, 0))
                    else:   # both arguments are the same table
                        t1.accumulate(j1, G + G.transpose(1, 2), t1.gather(j1, 0))
            if ctx.same_table:
                gX = tx.grad()
                gY = None if not ctx.needs_input_grad[5] else torch.zeros_like(Y)
                if not ctx.needs_input_grad[4]:
                    gX, gY = None, gX
            else:
                gX = tx.grad() if need_x else None
                gY = ty.grad() if need_y else None
        ctx.plans = None
        return g_a, g_b, g_ar, g_br, gX, gY, None, None, None, None


def _cols(w: int, W: int, rest: bool, device) -> torch.Tensor:
    cols = torch.arange(w, device=device)
    return torch.cat([cols, torch.tensor([W], device=device)]) if rest else cols


def _valid(n_valid: torch.Tensor, w: int) -> torch.Tensor:
    r = torch.arange(w, device=n_valid.device) < n_valid[:, None]
    return r[:, :, None] & r[:, None, :]


def point_cloud_ot(a: torch.Tensor, b: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, ix: torch.Tensor,
                   iy: torch.Tensor, *, cost: Literal["cosine", "euclidean"], epsilon: float, n_iters: int = 50,
                   tol: float | None = None, value: Value = "entropic", grad: Grad = "envelope",
                   normalize: Normalize = "max", a_rest: torch.Tensor | None = None,
                   b_rest: torch.Tensor | None = None, n_valid: torch.Tensor | None = None,
                   debias: bool = False, method: Method = "auto", memory_mb: float = 256.0,
                   precision: Literal["float32", "bfloat16"] = "float32"):
    """Entropic OT between point clouds read from point tables, one problem per row.

    Problem r: points x_i = X[ix[r, i]] with masses a[r, i] and y_j = Y[iy[r, j]] with masses
    b[r, j], i, j < n_valid[r] (later columns are padding: their masses must be 0; their points are
    replaced by the problem's first point, so they never move the cost scale). Costs
    `pairwise_cost(x, y, cost)` are divided by a per-problem unit (`normalize`: the largest or the
    mean valid cost, a constant for the gradient) so that epsilon is a fraction of the cost scale.
    With `a_rest`/`b_rest` (N,) each side gets one more point holding that mass, at cost = the
    largest normalised cost from every real point and 0 from the other rest point.

    Returns (value (N,), linear value <T, C> (N,), column-marginal L1 error (N,)); the value is the
    debiased Sinkhorn divergence when `debias`. Differentiable with respect to a, b, a_rest, b_rest,
    X and Y. grad="envelope" processes problems in chunks sized by `memory_mb` and keeps the plans
    for backward when they fit in that budget (else only the potentials, and recomputes costs);
    grad="autodiff" builds each chunk's costs and iterations with autograd (exact for the computed
    value, memory grows with n_iters). precision="bfloat16" runs the two batched products (point
    inner products, and the cost gradient) on bfloat16 copies with float32 norms, sums and solver:
    about 3x faster on CPUs with bfloat16 units, costs within ~1e-3 relative (grad="envelope").
    """
    N, W = a.shape
    if b.shape != (N, W) or ix.shape != (N, W) or iy.shape != (N, W):
        raise ValueError(f"masses {tuple(a.shape)}/{tuple(b.shape)} and indices {tuple(ix.shape)}/"
                         f"{tuple(iy.shape)} must all be (N, W)")
    if (a_rest is None) != (b_rest is None):
        raise ValueError("give both a_rest and b_rest, or neither")
    if n_valid is None:
        n_valid = torch.full((N,), W, dtype=torch.long, device=a.device)
    else:   # padding points repeat the problem's first point: costs stay among the valid values
        pad = torch.arange(W, device=a.device)[None, :] >= n_valid[:, None]
        if bool(pad.any()):
            ix = torch.where(pad, ix[:, :1], ix)
            iy = torch.where(pad, iy[:, :1], iy)
    cfg = dict(cost=cost, epsilon=float(epsilon), n_iters=int(n_iters), tol=tol, value=value,
               normalize=normalize, debias=bool(debias), method=method, memory_mb=float(memory_mb),
               precision=precision)
    if grad == "envelope":
        return _PointCloudOT.apply(a, b, a_rest, b_rest, X, Y, ix, iy, n_valid, cfg)
    if grad != "autodiff":
        raise ValueError(f"unknown gradient mode {grad!r}; use 'envelope' or 'autodiff'")
    if tol is not None:
        raise ValueError("grad='autodiff' runs a fixed number of iterations; tol is not supported")
    rest = a_rest is not None
    A = torch.cat([a, a_rest[:, None]], 1) if rest else a
    B = torch.cat([b, b_rest[:, None]], 1) if rest else b
    out, lin, err = [], [], []
    order = torch.argsort(n_valid, stable=True)
    chunk = max(1, int(memory_mb * 2**20 // max(1, (W + 1) ** 2 * a.element_size() * (n_iters + 6))))
    for s in range(0, N, chunk):
        rows = order[s:s + chunk]
        w = max(1, int(n_valid[rows].max()))
        cols = _cols(w, W, rest, a.device)
        x, y = X[ix[rows, :w]], Y[iy[rows, :w]]
        valid = _valid(n_valid[rows], w) if normalize == "mean" else None
        C = pairwise_cost(x, y, cost)
        sg = cost_scale(C.detach(), valid, normalize)[:, None, None]
        C = C / sg
        rc = C.detach().amax((1, 2))
        fix = (lambda M: with_rest(M, rc)) if rest else (lambda M: M)
        ak, bk = A[rows][:, cols], B[rows][:, cols]
        Cab = fix(C)
        v, e = _unrolled(Cab, ak, bk, float(epsilon), int(n_iters), method, value)
        li = v if value == "linear" else _unrolled(Cab, ak, bk, float(epsilon), int(n_iters), method, "linear")[0]
        if debias:
            vaa, _ = _unrolled(fix(pairwise_cost(x, x, cost) / sg), ak, ak, float(epsilon), int(n_iters), method, value)
            vbb, _ = _unrolled(fix(pairwise_cost(y, y, cost) / sg), bk, bk, float(epsilon), int(n_iters), method, value)
            v = v - 0.5 * (vaa + vbb)
        out.append(v)
        lin.append(li.detach())
        err.append(e)
    inv = torch.argsort(order)
    return torch.cat(out)[inv], torch.cat(lin)[inv], torch.cat(err)[inv]


def emd(a: torch.Tensor, b: torch.Tensor, M: torch.Tensor, num_iter_max: int = 100000) -> torch.Tensor:
    """Exact transport plan between histograms a (n) and b (m) for cost M (n x m), via POT's network
    simplex (`ot.emd`, float64). The plan is a constant (no gradient)."""
    import ot  # POT

    a64 = a.detach().double().cpu().numpy()
    b64 = b.detach().double().cpu().numpy()
    a64, b64 = a64 / a64.sum(), b64 / b64.sum()
    F = ot.emd(a64, b64, M.detach().double().cpu().numpy(), numItermax=num_iter_max)
    return torch.as_tensor(F, dtype=M.dtype, device=M.device)
