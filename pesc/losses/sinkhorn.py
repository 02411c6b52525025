"""Top-k optimal transport on token embeddings (`sinkhorn`) and its mixture with KL (`hybrid`).

Per target position:
1. support: the union of the student's and the teacher's top-k token ids (default), or only the
   student's (`support="student"`, the research code) or only the teacher's top k;
2. masses: a_i = q(id_i), b_i = p(id_i) at temperature tau, renormalised to sum 1
   (`masses="renormalize"`; then a = softmax of the support's logits: the full-vocabulary
   normaliser cancels and the gradient reaches only the support's logits), or kept as they are with
   the leftover mass 1 - sum as one extra "rest" point on each side (`masses="rest"`; the gradient
   then reaches every logit through the softmax);
3. points: x_i = E_S[id_i] (student input embeddings), y_i = P E_T[id_i] (teacher input embeddings,
   through a trainable projection P when the widths differ);
4. cost: `cosine` 1 - cos(x_i, y_j) or `euclidean` ||x_i - y_j||^2 / d, divided by the position's
   largest cost (`normalize="max"`, a constant for the gradient) so that epsilon is a fraction of
   the cost scale; the rest point costs 1 (the largest cost) to every token and 0 to the other rest
   point;
5. entropic OT with epsilon, batched over all positions as (N, k', k') problems, chunked by a memory
   budget (see `pesc.losses.ot`).

The value per position is the transport cost <T, C> of the entropic plan (`value="linear"`, the
default: LOSSES.md's definition, what POT's sinkhorn2 returns and what the research runs reported;
always logged as `ot_linear`) or W_eps = min <T, C> + eps KL(T | a b^T) (`value="entropic"`).
Gradients come from the dual potentials (envelope theorem, plan detached; exact for the entropic
value at convergence, the standard first-order gradient for the linear one) and reach
the student's logits through the masses and the projection through the costs; `grad="autodiff"`
back-propagates through the iterations instead (exact for either value, much more memory).
`debias=True` gives the Sinkhorn divergence W(a,b) - (W(a,a) + W(b,b)) / 2, which is 0 when the two
distributions (and embeddings) coincide.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from pesc.errors import ConfigError
from pesc.losses.base import (DistillLoss, LossOutput, TeacherSignal, build_loss, check_vocab, chunk_rows,
                              compute_dtype, masked_rows, register_loss)
from pesc.losses._rowwise import RowReader, grad_buffer, logsumexp_, write_rows
from pesc.losses.ot import point_cloud_ot


class _GatherLogProbs(torch.autograd.Function):
    """log softmax(s / tau) at given ids, (M, W), from logits (B, T, V); gradient chunked.

    Backward writes d/ds into one buffer shaped like the logits: for row r,
    ds_v = (sum_j g_rj [id_rj = v] - softmax_v * sum_j g_rj) / tau.
    """

    @staticmethod
    def forward(ctx, student, bi, ti, ids, lse, vocab, tau, chunk, softmax=None):
        dtype = lse.dtype
        s = student[bi[:, None], ti[:, None], ids].to(dtype)
        ctx.save_for_backward(student, bi, ti, ids, lse)
        ctx.vocab, ctx.tau, ctx.chunk, ctx.softmax = vocab, tau, chunk, softmax
        return s / tau - lse[:, None]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        student, bi, ti, ids, lse = ctx.saved_tensors
        vocab, tau, chunk = ctx.vocab, ctx.tau, ctx.chunk
        M = bi.numel()
        Q, ctx.softmax = ctx.softmax, None
        if Q is not None:    # the softmax rows were kept by the forward pass in a logits-sized
            gs = g * (1.0 / tau)                           # buffer: turn it into the gradient
            rows = Q.view(-1, Q.shape[-1])
            idx = bi * Q.shape[1] + ti
            for s in range(0, M, chunk):
                e = min(s + chunk, M)
                first, last = int(idx[s]), int(idx[e - 1])
                r = rows[first:last + 1, :vocab] if last - first == e - s - 1 else None
                if r is None:                                # not consecutive: gather, write back
                    r = Q[bi[s:e], ti[s:e], :vocab]
                r.mul_(-gs[s:e].sum(-1, keepdim=True)).scatter_add_(-1, ids[s:e], gs[s:e])
                if r.data_ptr() != rows[first:first + 1].data_ptr():
                    write_rows(Q, bi, ti, s, e, vocab, r)
            return Q, None, None, None, None, None, None, None, None
        grad = grad_buffer(student, M, vocab)
        reader = RowReader(student, bi, ti, vocab, lse.dtype, min(chunk, M), tau)
        flat = grad.view(-1, grad.shape[-1]) if (grad.dtype == lse.dtype and vocab == grad.shape[-1]) else None
        for s in range(0, M, chunk):
            e = min(s + chunk, M)
            gc = g[s:e] * (1.0 / tau)
            view = reader.view(s, e)
            first = int(reader.idx[s]) if view is not None else 0
            direct = view is not None and flat is not None
            out = flat[first:first + e - s] if direct else reader.buf[: e - s]
            if view is None:
                row = reader.read(s, e).sub_(lse[s:e, None])
            else:
                row = torch.sub(view, lse[s:e, None], out=out)
            row.exp_().mul_(-gc.sum(-1, keepdim=True))                 # -softmax * sum(g) / tau
            row.scatter_add_(-1, ids[s:e], gc)
            if not direct:
                write_rows(grad, bi, ti, s, e, vocab, row)
        return grad, None, None, None, None, None, None, None, None


def _lookup(ids: torch.Tensor, table_ids: torch.Tensor, table_vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, the value of table_vals at ids (found, value); rows of table_ids are unique ids."""
    srt, perm = table_ids.sort(dim=-1)
    pos = torch.searchsorted(srt, ids).clamp_(max=srt.shape[-1] - 1)
    found = srt.gather(-1, pos) == ids
    vals = table_vals.gather(-1, perm.gather(-1, pos))
    return found, vals


@register_loss("sinkhorn")
class SinkhornLoss(DistillLoss):
    """Top-k entropic OT between teacher and student distributions on token-embedding costs.

    Needs `student_embeddings` (and `teacher_embeddings` unless points="student") as forward
    keywords: the models' input-embedding weight matrices (V x d). When the widths differ, a
    trainable projection teacher -> student width (`projection.weight`, d_S x d_T) is created by
    `prepare(student_embeddings=..., teacher_embeddings=...)` (or from `student_dim`/`teacher_dim`);
    add `loss.parameters()` to the optimizer and save `loss.state_dict()` with checkpoints.
    Runs from a top-k teacher cache (k <= the cache's k): teacher masses at support ids outside the
    cache are 0 (with masses="rest" they are part of the rest point's mass). Not multiplied by tau^2.
    Student embeddings get no gradient unless `embedding_grad` (moving embeddings to shrink
    transport costs can collapse them); the projection always does. `precision="bfloat16"` runs the
    matrix products on the points (projection, inner products, cost gradient) in bfloat16 with
    float32 norms, sums and solver: ~3x faster products on CPUs/GPUs with bfloat16 units, costs
    within ~1e-3 relative of float32.
    """

    supports_sparse_teacher = True
    needs_embeddings = True

    def __init__(self, temperature: float = 1.0, vocab_size: int | None = None, topk: int = 100,
                 support: Literal["union", "student", "teacher"] = "union",
                 masses: Literal["renormalize", "rest"] = "renormalize",
                 cost: Literal["cosine", "euclidean"] = "cosine", epsilon: float = 0.1, iters: int = 50,
                 tol: float | None = None, value: Literal["linear", "entropic"] = "linear",
                 grad: Literal["envelope", "autodiff"] = "envelope", debias: bool = False,
                 normalize: Literal["max", "mean", "none"] = "max",
                 method: Literal["auto", "scaling", "log"] = "auto",
                 points: Literal["both", "student"] = "both",
                 projection: Literal["auto", "always", "none"] = "auto",
                 projection_init: Literal["lstsq", "orthogonal"] = "lstsq", embedding_grad: bool = False,
                 student_dim: int | None = None, teacher_dim: int | None = None, memory_mb: float = 256.0,
                 precision: Literal["float32", "bfloat16"] = "float32"):
        super().__init__(temperature)
        checks = [(topk >= 1, f"topk must be >= 1, got {topk}"),
                  (epsilon > 0, f"epsilon must be > 0, got {epsilon}"),
                  (iters >= 1, f"iters must be >= 1, got {iters}"),
                  (tol is None or tol > 0, f"tol must be > 0 or none, got {tol}"),
                  (memory_mb > 0, f"memory_mb must be > 0, got {memory_mb}"),
                  (not (grad == "autodiff" and tol is not None), "grad=autodiff runs a fixed iteration "
                   "count: drop tol or use grad=envelope")]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"loss {self.name!r}: {msg}")
        for key, val, allowed in [("support", support, ("union", "student", "teacher")),
                                  ("masses", masses, ("renormalize", "rest")),
                                  ("cost", cost, ("cosine", "euclidean")), ("value", value, ("entropic", "linear")),
                                  ("grad", grad, ("envelope", "autodiff")), ("normalize", normalize, ("max", "mean", "none")),
                                  ("method", method, ("auto", "scaling", "log")), ("points", points, ("both", "student")),
                                  ("projection", projection, ("auto", "always", "none")),
                                  ("projection_init", projection_init, ("lstsq", "orthogonal")),
                                  ("precision", precision, ("float32", "bfloat16"))]:
            if val not in allowed:
                raise ConfigError(f"loss {self.name!r}: {key} must be one of {', '.join(allowed)}, got {val!r}")
        self.vocab_size, self.topk, self.support, self.masses = vocab_size, int(topk), support, masses
        self.cost, self.epsilon, self.iters, self.tol = cost, float(epsilon), int(iters), tol
        self.value, self.grad, self.debias, self.normalize, self.method = value, grad, bool(debias), normalize, method
        self.points, self.projection_mode, self.projection_init = points, projection, projection_init
        self.embedding_grad, self.memory_mb, self.precision = bool(embedding_grad), float(memory_mb), precision
        self.projection: nn.Linear | None = None
        if student_dim is not None and teacher_dim is not None:
            self.prepare(student_hidden_size=student_dim, teacher_hidden_size=teacher_dim)

    # -- parameters -------------------------------------------------------------------------------

    def prepare(self, *, student_embeddings=None, teacher_embeddings=None, student_hidden_size=None,
                teacher_hidden_size=None, student_layers=None, teacher_layers=None):
        """Create the projection teacher width -> student width if this configuration needs one.

        With both embedding matrices given and projection_init="lstsq", P is initialised by least
        squares on the shared token rows (E_T P^T ~ E_S), so costs are meaningful from step one.
        """
        ds = student_embeddings.shape[-1] if student_embeddings is not None else student_hidden_size
        dt = teacher_embeddings.shape[-1] if teacher_embeddings is not None else teacher_hidden_size
        if self.points == "student" or ds is None or dt is None:
            return self
        need = self.projection_mode == "always" or (self.projection_mode == "auto" and ds != dt)
        if not need:
            if ds != dt:
                raise ConfigError(f"loss {self.name!r}: embedding widths differ (student {ds}, teacher {dt}) "
                                  "and projection=none; use projection=auto or points=student")
            return self
        if self.projection is not None:
            if self.projection.weight.shape != (ds, dt):
                raise ConfigError(f"loss {self.name!r}: projection exists for widths {tuple(self.projection.weight.shape)}, "
                                  f"models have student {ds} / teacher {dt}")
            return self
        proj = nn.Linear(dt, ds, bias=False)
        with torch.no_grad():
            if (self.projection_init == "lstsq" and student_embeddings is not None
                    and teacher_embeddings is not None):
                proj.weight.copy_(_lstsq_projection(student_embeddings, teacher_embeddings))
            elif ds == dt:
                proj.weight.copy_(torch.eye(ds))
            else:
                nn.init.orthogonal_(proj.weight)
                proj.weight.mul_((dt / ds) ** 0.5 if ds < dt else 1.0)
        if student_embeddings is not None:   # float32 master weights (float64 for float64 checks)
            dtype = torch.float64 if student_embeddings.dtype == torch.float64 else torch.float32
            proj = proj.to(device=student_embeddings.device, dtype=dtype)
        self.projection = proj
        return self

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, student_logits, teacher: TeacherSignal, mask, num_items=None, student_embeddings=None,
                teacher_embeddings=None, **_):
        value, parts = self._ot(student_logits, teacher, mask, num_items, student_embeddings, teacher_embeddings)
        return LossOutput(value, {self.name: float(value.detach()), **parts})

    def _ot(self, student_logits, teacher, mask, num_items, E_s, E_t):
        pb = self._problems(student_logits, teacher, mask, E_s, E_t)
        values, linear, err = point_cloud_ot(
            pb["a"], pb["b"], pb["X"], pb["Y"], pb["index"], pb["index"], cost=self.cost, epsilon=self.epsilon,
            n_iters=self.iters, tol=self.tol, value=self.value, grad=self.grad, normalize=self.normalize,
            a_rest=pb["a_rest"], b_rest=pb["b_rest"], n_valid=pb["n_valid"], debias=self.debias,
            method=self.method, memory_mb=self.memory_mb, precision=self.precision)
        M = values.shape[0]
        denom = self.denominator(num_items, M)
        value = values.sum() / denom
        parts = {"ot_linear": float(linear.sum() / denom), "ot_support": float(pb["n_valid"].float().mean()),
                 "ot_marginal_err": float(err.mean())}
        return value, parts

    @torch.no_grad()
    def export_problems(self, student_logits, teacher: TeacherSignal, mask, student_embeddings=None,
                        teacher_embeddings=None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The OT problems this loss solves, one (a, b, C) per target position (row-major), with the
        normalised costs and the rest point included: for comparisons with other solvers."""
        from pesc.losses.ot import _Table, cost_scale, with_rest

        pb = self._problems(student_logits, teacher, mask, student_embeddings, teacher_embeddings)
        tx = _Table(pb["X"], self.cost)
        ty = tx if pb["Y"] is pb["X"] else _Table(pb["Y"], self.cost)
        out = []
        for r in range(pb["a"].shape[0]):
            n = int(pb["n_valid"][r])
            j = pb["index"][r:r + 1, :n]
            C = tx.costs(j, ty, j)
            C = C / cost_scale(C, torch.ones_like(C, dtype=torch.bool), self.normalize)[:, None, None]
            a, b = pb["a"][r:r + 1, :n], pb["b"][r:r + 1, :n]
            if pb["a_rest"] is not None:
                C = with_rest(C, C.amax((1, 2)))
                a = torch.cat([a, pb["a_rest"][r:r + 1, None]], 1)
                b = torch.cat([b, pb["b_rest"][r:r + 1, None]], 1)
            out.append((a[0], b[0], C[0]))
        return out

    def _problems(self, student_logits, teacher, mask, E_s, E_t) -> dict:
        """Support ids, masses (differentiable in the student logits) and point tables per position."""
        self.check_teacher(teacher)
        self.check_logits(student_logits, mask)
        if E_s is None:
            raise ValueError(f"loss {self.name!r} needs student_embeddings= (the student's input-embedding "
                             "matrix) to build transport costs")
        if self.points == "both" and E_t is None:
            raise ConfigError(f"loss {self.name!r} needs teacher_embeddings= (the teacher's input-embedding "
                              "matrix; a teacher cache must store it), or points=student to measure costs "
                              "in the student's embedding space only")
        dtype = compute_dtype(student_logits)
        tau, k = self.temperature, self.topk
        bi, ti = masked_rows(mask)
        M = bi.numel()
        if teacher.is_dense:
            self.check_teacher_logits(student_logits, teacher.logits)
            vocab = check_vocab(student_logits.shape[-1], teacher.logits.shape[-1], self.vocab_size)
            tlog = teacher.logits.detach()
        else:
            vocab = self.vocab_size or student_logits.shape[-1]
            cache_ids, cache_lp, cache_rest = teacher.sparse_parts(vocab)
            if cache_ids.shape[:2] != student_logits.shape[:2]:
                raise ValueError("teacher cache and student logits cover different positions")
            if self.support != "student" and k > cache_ids.shape[-1]:
                raise ConfigError(f"loss {self.name!r}: topk={k} exceeds the teacher cache's k={cache_ids.shape[-1]}")
        if E_s.shape[0] < vocab or (E_t is not None and self.points == "both" and E_t.shape[0] < vocab):
            raise ConfigError(f"embedding matrices ({E_s.shape[0]} / {None if E_t is None else E_t.shape[0]} rows) "
                              f"are smaller than the vocabulary ({vocab})")
        if k > vocab:
            raise ConfigError(f"loss {self.name!r}: topk={k} exceeds the vocabulary ({vocab})")

        # 1. per-row normalisers and top-k ids (no gradient), chunked over rows. With renormalised
        # masses a_i = q_i / sum_S q = exp(s_i / tau) / sum_S exp(s_j / tau): the full-vocabulary
        # normaliser cancels (in the value and in the gradient, which only reaches the support's
        # logits), so only the top-k ids are needed.
        renorm = self.masses == "renormalize"
        chunk = chunk_rows(vocab, M, 3, 64.0, 4)
        lse_s = torch.zeros(M, dtype=dtype, device=student_logits.device)
        ids_s = torch.empty(M, k, dtype=torch.long, device=student_logits.device)
        lse_t = torch.zeros_like(lse_s) if teacher.is_dense else None
        ids_t = torch.empty_like(ids_s)
        with torch.no_grad():
            readers = [(RowReader(student_logits, bi, ti, vocab, dtype, min(chunk, M), tau), lse_s, ids_s)]
            if teacher.is_dense:
                readers.append((RowReader(tlog, bi, ti, vocab, dtype, min(chunk, M), tau), lse_t, ids_t))
            scratch = torch.empty_like(readers[0][0].buf)
            # Keep the student's softmax rows for backward in the buffer that becomes the gradient
            # (no recomputation there); only when that buffer already has the compute dtype.
            Q = None
            if (not renorm and student_logits.requires_grad and torch.is_grad_enabled()
                    and student_logits.dtype == dtype):
                Q = grad_buffer(student_logits, M, vocab)
                q_rows = Q.view(-1, Q.shape[-1])[:, :vocab]
                q_idx = bi * Q.shape[1] + ti
            for s in range(0, M, chunk):
                e = min(s + chunk, M)
                for j, (reader, lse, top) in enumerate(readers):
                    row = reader.view(s, e)
                    row = reader.read(s, e) if row is None else row
                    top[s:e] = row.topk(k, -1, sorted=False).indices
                    if renorm:
                        continue
                    keep = Q is not None and j == 0
                    first, last = (int(q_idx[s]), int(q_idx[e - 1])) if keep else (0, 0)
                    contiguous = keep and last - first == e - s - 1
                    work = q_rows[first:last + 1] if contiguous else scratch[: e - s]
                    lse_rows, shift = logsumexp_(row, work, return_shift=True)
                    lse[s:e] = lse_rows.squeeze(-1)
                    if keep:   # work = exp(row - shift): rescale to the softmax
                        work.mul_(torch.exp(shift - lse_rows))
                        if not contiguous:
                            write_rows(Q, bi, ti, s, e, vocab, work)
            del readers, scratch
            if not teacher.is_dense:
                lp_rows, cid = cache_lp[bi, ti].to(dtype), cache_ids[bi, ti]
                top = lp_rows.topk(k, -1).indices if k <= cid.shape[-1] else None
                if top is not None:
                    ids_t = cid.gather(-1, top)
                # renormalised cache masses (top-k buckets + rest)
                norm = torch.logsumexp(torch.cat([lp_rows, cache_rest[bi, ti].to(dtype)[:, None]], -1), -1)

            # 2. support
            if self.support == "union":
                dup = (ids_t[:, :, None] == ids_s[:, None, :]).any(-1)
                cand = torch.cat([ids_s, ids_t], 1)
                valid = torch.cat([torch.ones_like(dup), ~dup], 1)
                order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
                ids = cand.gather(1, order)
                valid = valid.gather(1, order)
                n_valid = valid.sum(1)
                W = int(n_valid.max())
                ids, valid = ids[:, :W].contiguous(), valid[:, :W]
            else:
                ids = ids_s if self.support == "student" else ids_t
                valid = torch.ones_like(ids, dtype=torch.bool)
                n_valid = torch.full((M,), k, dtype=torch.long, device=ids.device)

            # teacher log-masses on the support (constants; -inf outside the valid support)
            if teacher.is_dense:
                lp = tlog[bi[:, None], ti[:, None], ids].to(dtype).div_(tau).sub_(lse_t[:, None])
            else:
                found, lpv = _lookup(ids, cid, lp_rows)
                lp = torch.where(found, lpv - norm[:, None], torch.full_like(lpv, float("-inf")))
            lp = torch.where(valid, lp, torch.full_like(lp, float("-inf")))
            if not bool(torch.isfinite(lp.amax(1)).all()):
                raise ValueError(f"loss {self.name!r}: the teacher has no mass on the support at some positions "
                                 "(a top-k cache whose ids miss every support token); use support=union or teacher")

        # 3. student masses on the support (differentiable)
        if renorm:     # logits at the support (up to the normaliser): autograd scatters the gradient
            lq = student_logits[bi[:, None], ti[:, None], ids].to(dtype) / tau
        else:
            lq = _GatherLogProbs.apply(student_logits, bi, ti, ids, lse_s, vocab, tau,
                                       chunk_rows(vocab, M, 2, 64.0, 4), Q)
        lq = torch.where(valid, lq, torch.full_like(lq, float("-inf")))
        dead = ~torch.isfinite(lq.detach().amax(1))   # the student rules out the whole support (-inf)
        if bool(dead.any()):
            lq = torch.where(dead[:, None] & valid, torch.zeros_like(lq), lq)   # then: uniform on it
        if self.masses == "renormalize":
            a, b = torch.softmax(lq, 1), torch.softmax(lp, 1)
            a_rest = b_rest = None
        else:
            a, b = lq.exp(), lp.exp()
            a_rest = (1.0 - a.sum(1)).clamp(min=0.0)
            b_rest = (1.0 - b.sum(1)).clamp(min=0.0)

        # 4. point tables on the unique ids
        uniq, inv = torch.unique(ids, return_inverse=True)
        X = E_s[uniq].to(dtype)
        if not self.embedding_grad:
            X = X.detach()
        if self.points == "student":
            Y = X
        else:
            Y = E_t[uniq].detach().to(dtype)
            ds, dt = E_s.shape[-1], E_t.shape[-1]
            if self.projection is None and (ds != dt or self.projection_mode == "always"):
                if self.projection_mode == "none":
                    raise ConfigError(f"loss {self.name!r}: embedding widths differ (student {ds}, teacher {dt}) "
                                      "and projection=none")
                raise ConfigError(f"loss {self.name!r} needs a projection between embedding widths (student "
                                  f"{ds}, teacher {dt}): call loss.prepare(student_embeddings=..., "
                                  "teacher_embeddings=...) before building the optimizer")
            if self.projection is not None:
                W = self.projection.weight
                if self.precision == "bfloat16" and dtype == torch.float32:
                    Y = (Y.to(torch.bfloat16) @ W.to(torch.bfloat16).t()).to(dtype)
                else:
                    Y = Y @ W.to(dtype).t()

        return {"a": a, "b": b, "a_rest": a_rest, "b_rest": b_rest, "X": X, "Y": Y, "index": inv,
                "n_valid": n_valid}

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature:g}, topk={self.topk}, support={self.support}, masses={self.masses}, "
                f"cost={self.cost}, epsilon={self.epsilon:g}, iters={self.iters}, value={self.value}, "
                f"grad={self.grad}, debias={self.debias}, normalize={self.normalize}")


def _lstsq_projection(E_s: torch.Tensor, E_t: torch.Tensor, max_rows: int = 16384) -> torch.Tensor:
    """P (d_S x d_T) minimising ||E_t P^T - E_s|| over shared token rows (a deterministic sample)."""
    n = min(E_s.shape[0], E_t.shape[0])
    idx = torch.linspace(0, n - 1, steps=min(n, max_rows)).round().long().unique()
    A = E_t[idx].detach().double().cpu()
    Bm = E_s[idx].detach().double().cpu()
    sol = torch.linalg.lstsq(A, Bm).solution          # (d_T, d_S)
    return sol.t().float()


@register_loss("hybrid")
class HybridLoss(SinkhornLoss):
    """weight * sinkhorn + (1 - weight) * KL on the same positions and temperature.

    `weight` 0.5 and 0.3 are the research "half-half" and "3:7" rows; `kl` chooses the divergence
    (fkl by default, tau^2-scaled). Takes every sinkhorn parameter and has the same needs.
    """

    def __init__(self, temperature: float = 1.0, vocab_size: int | None = None, weight: float = 0.5,
                 kl: Literal["fkl", "rkl", "jsd", "skl", "srkl"] = "fkl", **sinkhorn_params):
        super().__init__(temperature, vocab_size, **sinkhorn_params)
        if not 0.0 <= weight <= 1.0:
            raise ConfigError(f"hybrid weight must be in [0, 1], got {weight}")
        self.weight, self.kl_name = float(weight), kl
        self.kl = build_loss(kl, temperature=temperature, vocab_size=vocab_size)

    def forward(self, student_logits, teacher: TeacherSignal, mask, num_items=None, student_embeddings=None,
                teacher_embeddings=None, **_):
        ot_value, ot_parts = self._ot(student_logits, teacher, mask, num_items, student_embeddings,
                                      teacher_embeddings)
        kl_out = self.kl(student_logits, teacher, mask, num_items)
        value = self.weight * ot_value + (1.0 - self.weight) * kl_out.value
        return LossOutput(value, {self.name: float(value.detach()), "ot": float(ot_value.detach()), **ot_parts,
                                  self.kl_name: kl_out.parts[self.kl_name]})
