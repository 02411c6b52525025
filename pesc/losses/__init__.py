"""Distillation losses: functions of tensors behind a registry. No model or trainer types here.

    loss = build_loss("fkl", temperature=2.0, vocab_size=V)
    out = loss(student_logits, TeacherSignal(logits=teacher_logits), mask)   # LossOutput(value, parts)

Registered names (`available_losses()`): fkl, rkl, jsd, skl, srkl, tvd, l1, l2 (full vocabulary),
w1_cdf, sorted_w1 (1-D Wasserstein), sinkhorn, hybrid (top-k OT on embeddings), layer_emd
(BERT-EMD on hidden states). `parse_loss_args` turns CLI "key=value" pairs into typed parameters.
The OT core (`pesc.losses.ot`) is plain functions of tensors. Definitions: ../shared/docs/LOSSES.md.
"""

from pesc.losses.base import (  # noqa: F401
    DistillLoss,
    LossOutput,
    TeacherSignal,
    align_vocab,
    available_losses,
    build_loss,
    loss_class,
    loss_help,
    loss_params,
    masked_positions,
    parse_loss_args,
    register_loss,
    rest_logmass,
    shift_for_distillation,
)
from pesc.losses import divergences, wasserstein1d, sinkhorn, layer_emd  # noqa: F401,E402  (register their losses)
