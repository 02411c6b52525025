"""Full-vocabulary divergences between teacher p = softmax(z_T / tau) and student q = softmax(z_S / tau).

| name  | per-position value                                         | tau^2 |
| ----- | ---------------------------------------------------------- | ----- |
| fkl   | sum_v p_v (log p_v - log q_v)                              | yes   |
| rkl   | sum_v q_v (log q_v - log p_v)                              | yes   |
| jsd   | beta KL(p, m) + (1 - beta) KL(q, m), m = beta p + (1-beta) q | yes |
| skl   | KL(p, lam p + (1 - lam) q)                                 | yes   |
| srkl  | KL(q, lam q + (1 - lam) p)                                 | yes   |
| tvd   | 0.5 sum_v |p_v - q_v|                                      | no    |
| l1    | sum_v |q_v - p_v|                                          | no    |
| l2    | sqrt(sum_v (q_v - p_v)^2)                                  | no    |

All are computed in chunks of positions with the gradient fused into the forward pass (see
`_rowwise`), so the only full-size tensor created is the gradient of the student logits. Log-probs
are floored at log(tiny) so -inf logits never produce NaN: a token the student rules out where the
teacher has mass p costs p * (log p + 87) instead of infinity.

From a top-k teacher cache (sparse TeacherSignal) every divergence except l2 is computed between the
two distributions coarse-grained to k + 1 buckets (the teacher's k ids, then all other tokens
together). For f-divergences (all but l2) this is a lower bound of the full value (data processing)
and equals it when the cache holds the whole support; l2 changes meaning under coarse-graining and
refuses the cache.
"""

from __future__ import annotations

import math

import torch

from pesc.errors import ConfigError
from pesc.losses._rowwise import DenseForwardKL, bucket_rows, dense_rows, row_loss
from pesc.losses.base import (DistillLoss, LossOutput, TeacherSignal, check_vocab, chunk_rows, masked_rows,
                              register_loss)

DEFAULT_MEMORY_MB = 128.0
_TEMPS = 10  # (rows x V) temporaries alive in a chunk, for the chunk-size budget


class RowDivergence(DistillLoss):
    """Base of the full-vocabulary divergences. Subclasses define `rule(lp, lq, p, q)`."""

    supports_sparse_teacher = True

    def __init__(self, temperature: float = 1.0, vocab_size: int | None = None,
                 memory_mb: float = DEFAULT_MEMORY_MB):
        super().__init__(temperature)
        if memory_mb <= 0:
            raise ConfigError(f"memory_mb must be positive, got {memory_mb}")
        self.vocab_size, self.memory_mb = vocab_size, float(memory_mb)

    def rule(self, lp, lq, p, q):  # pragma: no cover - abstract
        raise NotImplementedError

    def dense_rows(self, teacher_logits, vocab):
        return dense_rows(self.rule, teacher_logits, vocab, self.temperature)

    def forward(self, student_logits, teacher: TeacherSignal, mask, num_items=None, **_):
        self.check_teacher(teacher)
        self.check_logits(student_logits, mask)
        bi, ti = masked_rows(mask)
        if teacher.is_dense:
            self.check_teacher_logits(student_logits, teacher.logits)
            vocab = check_vocab(student_logits.shape[-1], teacher.logits.shape[-1], self.vocab_size)
            rows = self.dense_rows(teacher.logits, vocab)
        else:
            vocab = self.vocab_size or student_logits.shape[-1]
            if vocab > student_logits.shape[-1]:
                raise ConfigError(f"student logit width {student_logits.shape[-1]} is smaller than the "
                                  f"tokenizer length {vocab}")
            ids, lp, rest = teacher.sparse_parts(vocab)
            if ids.shape[:2] != student_logits.shape[:2]:
                raise ValueError(f"teacher cache covers positions {tuple(ids.shape[:2])}, student logits "
                                 f"{tuple(student_logits.shape[:2])}")
            rows = bucket_rows(self.rule, ids, lp, rest)
        coef = self.temperature ** 2 if self.kl_type else 1.0
        chunk = chunk_rows(vocab, bi.numel(), _TEMPS, self.memory_mb,
                           8 if student_logits.dtype == torch.float64 else 4)
        total = row_loss(student_logits, rows, bi, ti, vocab, self.temperature, coef, chunk)
        value = total / self.denominator(num_items, bi.numel())
        return LossOutput(value, {self.name: float(value.detach())})

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}, vocab_size={self.vocab_size}"


def _logmix(la: torch.Tensor, lb: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * e^la + (1 - w) * e^lb) for 0 <= w <= 1."""
    if w <= 0.0:
        return lb.clone()
    if w >= 1.0:
        return la.clone()
    return torch.logaddexp(la + math.log(w), lb + math.log1p(-w))


@register_loss("fkl")
class ForwardKL(RowDivergence):
    """Forward KL(p_T || q_S) x tau^2, mean over target positions (the research baseline)."""

    kl_type = True

    def rule(self, lp, lq, p, q):
        value = (p * (lp - lq)).sum(-1)
        return value, p.neg()

    def dense_rows(self, teacher_logits, vocab):
        return DenseForwardKL(self.rule, teacher_logits, vocab, self.temperature)


@register_loss("rkl")
class ReverseKL(RowDivergence):
    """Reverse KL(q_S || p_T) x tau^2 (mode-seeking)."""

    kl_type = True

    def rule(self, lp, lq, p, q):
        d = lq - lp
        d.mul_(q)
        return d.sum(-1), d


@register_loss("jsd")
class GeneralisedJSD(RowDivergence):
    """beta KL(p, m) + (1 - beta) KL(q, m), m = beta p + (1 - beta) q, x tau^2 (GKD's JSD(beta))."""

    kl_type = True

    def __init__(self, temperature: float = 1.0, vocab_size: int | None = None, beta: float = 0.5,
                 memory_mb: float = DEFAULT_MEMORY_MB):
        super().__init__(temperature, vocab_size, memory_mb)
        if not 0.0 < beta < 1.0:
            raise ConfigError(f"jsd beta must be strictly between 0 and 1 (at 0 or 1 it is identically 0), got {beta}")
        self.beta = float(beta)

    def rule(self, lp, lq, p, q):
        b = self.beta
        lm = _logmix(lp, lq, b)
        qd = q * (lq - lm)
        value = b * (p * (lp - lm)).sum(-1) + (1 - b) * qd.sum(-1)
        return value, qd.mul_(1 - b)


@register_loss("skl")
class SkewKL(RowDivergence):
    """Skew KL(p, lam p + (1 - lam) q) x tau^2 (DistiLLM); lam = 0 is the forward KL."""

    kl_type = True

    def __init__(self, temperature: float = 1.0, vocab_size: int | None = None, lam: float = 0.1,
                 memory_mb: float = DEFAULT_MEMORY_MB):
        super().__init__(temperature, vocab_size, memory_mb)
        if not 0.0 <= lam < 1.0:
            raise ConfigError(f"skl lam must be in [0, 1) (at 1 it is identically 0), got {lam}")
        self.lam = float(lam)

    def rule(self, lp, lq, p, q):
        lm = _logmix(lp, lq, self.lam)
        value = (p * (lp - lm)).sum(-1)
        qg = (lq + lp - lm).exp_().mul_(-(1 - self.lam))
        return value, qg


@register_loss("srkl")
class SkewReverseKL(RowDivergence):
    """Skew reverse KL(q, lam q + (1 - lam) p) x tau^2 (DistiLLM); lam = 0 is the reverse KL."""

    kl_type = True

    def __init__(self, temperature: float = 1.0, vocab_size: int | None = None, lam: float = 0.1,
                 memory_mb: float = DEFAULT_MEMORY_MB):
        super().__init__(temperature, vocab_size, memory_mb)
        if not 0.0 <= lam < 1.0:
            raise ConfigError(f"srkl lam must be in [0, 1) (at 1 it is identically 0), got {lam}")
        self.lam = float(lam)

    def rule(self, lp, lq, p, q):
        lm = _logmix(lq, lp, self.lam)
        r = lq - lm
        value = (q * r).sum(-1)
        # d/dq_v = log(q_v/m_v) + 1 - lam q_v / m_v   (the +1 cancels in the softmax Jacobian)
        qg = q * (r - self.lam * r.exp())
        return value, qg


@register_loss("tvd")
class TotalVariation(RowDivergence):
    """Total variation 0.5 sum |p - q| (no tau^2)."""

    def rule(self, lp, lq, p, q):
        d = q - p
        value = 0.5 * d.abs().sum(-1)
        return value, d.sign_().mul_(q).mul_(0.5)


@register_loss("l1")
class L1Distance(RowDivergence):
    """Pointwise sum |q - p| (no tau^2)."""

    def rule(self, lp, lq, p, q):
        d = q - p
        value = d.abs().sum(-1)
        return value, d.sign_().mul_(q)


@register_loss("l2")
class L2Distance(RowDivergence):
    """Pointwise sqrt(sum (q - p)^2) (no tau^2). Needs the full teacher distribution."""

    supports_sparse_teacher = False

    def rule(self, lp, lq, p, q):
        d = q - p
        value = d.square().sum(-1).sqrt()
        inv = torch.where(value > 0, 1.0 / value.clamp(min=torch.finfo(value.dtype).tiny), torch.zeros_like(value))
        return value, d.mul_(q).mul_(inv.unsqueeze(-1))
