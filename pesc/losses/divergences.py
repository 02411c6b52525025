"""Full-vocabulary divergences, computed in chunks of positions (float32)."""

from __future__ import annotations

import torch

from pesc.losses.base import DistillLoss, LossOutput, TeacherSignal, align_vocab, masked_positions, register_loss

DEFAULT_CHUNK = 256


@register_loss("fkl")
class ForwardKL(DistillLoss):
    """tau^2 * mean over target positions of KL(p_T || q_S), p = softmax(z_T / tau)."""

    def __init__(self, temperature: float = 1.0, vocab_size: int | None = None, chunk_size: int = DEFAULT_CHUNK):
        super().__init__(temperature)
        self.vocab_size, self.chunk_size = vocab_size, chunk_size

    def forward(self, student_logits, teacher: TeacherSignal, mask, num_items=None, **_):
        self.check_teacher(teacher)
        s, t = align_vocab(student_logits, teacher.logits, self.vocab_size)
        idx = masked_positions(mask)
        s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
        total = s.new_zeros((), dtype=torch.float32)
        for i in range(0, idx.numel(), self.chunk_size):
            j = idx[i: i + self.chunk_size]
            ls = torch.log_softmax(s2[j].float() / self.temperature, -1)
            lt = torch.log_softmax(t2[j].float() / self.temperature, -1)
            total = total + (lt.exp() * (lt - ls)).sum()
        n = num_items if num_items is not None else idx.numel()
        value = total * self.temperature ** 2 / n
        return LossOutput(value, {"fkl": float(value.detach())})
