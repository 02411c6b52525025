"""Distillation losses: functions of tensors behind a registry. No model or trainer types here.

    loss = build_loss("fkl", temperature=2.0)
    out = loss(student_logits, teacher, mask)   # LossOutput(value, parts)

See docs/LOSSES.md (and ../shared/docs/LOSSES.md) for the definitions.
"""

from pesc.losses.base import (  # noqa: F401
    DistillLoss,
    LossOutput,
    TeacherSignal,
    build_loss,
    available_losses,
    register_loss,
    shift_for_distillation,
)
from pesc.losses import divergences  # noqa: F401  (registers its losses)
