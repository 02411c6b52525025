"""The loss interface, the teacher-signal seam and the registry.

Shapes: the trainer shifts once (`shift_for_distillation`): logits at position t predict token t+1,
so student/teacher logits are (B, T, V) and `mask` (B, T) marks positions whose *next* token is a
supporter-response label. Losses reduce to the mean over masked positions (or divide by an explicit
`num_items` for gradient accumulation). Every computation is in float32 whatever the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from pesc.errors import ConfigError


@dataclass
class TeacherSignal:
    """What the teacher says at each position: dense logits, or a sparse top-k cache.

    dense:  logits (B, T, V)
    sparse: topk_ids (B, T, k) int64, topk_logprobs (B, T, k) at temperature 1, rest_logmass (B, T)
            = log(1 - sum exp(topk_logprobs)). A loss that needs the full vocabulary refuses it.
    hidden_states: optional tuple of (B, T', H) per layer (for layer_emd).
    """

    logits: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    rest_logmass: torch.Tensor | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None

    @property
    def is_dense(self) -> bool:
        return self.logits is not None


@dataclass
class LossOutput:
    value: torch.Tensor                      # scalar, differentiable
    parts: dict[str, float] = field(default_factory=dict)  # named parts for logging


class DistillLoss(nn.Module):
    """Base class. Subclasses implement `forward(student_logits, teacher, mask, num_items=None, **kw)`.

    Class attributes declare what a loss can work from:
      supports_sparse_teacher: can use a TeacherSignal with only top-k (cached) values
      cross_tokenizer: works when teacher and student vocabularies differ
      needs_hidden_states: wants hidden states of both models
    """

    name = "base"
    supports_sparse_teacher = False
    cross_tokenizer = False
    needs_hidden_states = False

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def check_teacher(self, teacher: TeacherSignal) -> None:
        if not teacher.is_dense and not self.supports_sparse_teacher:
            raise ConfigError(f"loss {self.name!r} needs the teacher's full-vocabulary logits and "
                              "cannot run from a top-k teacher cache; use a live teacher")


_REGISTRY: dict[str, Callable[..., DistillLoss]] = {}


def register_loss(name: str):
    def deco(cls):
        _REGISTRY[name] = cls
        cls.name = name
        return cls
    return deco


def available_losses() -> list[str]:
    return sorted(_REGISTRY)


def build_loss(name: str, **params) -> DistillLoss:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown loss {name!r}; available: {', '.join(available_losses())}")
    try:
        return _REGISTRY[name](**params)
    except TypeError as e:
        raise ConfigError(f"bad parameters for loss {name!r}: {e}") from None


def shift_for_distillation(labels: torch.Tensor, logits_len: int | None = None) -> torch.Tensor:
    """Mask (B, T-1) of positions whose logits predict a label token: labels[:, 1:] != -100."""
    return labels[:, 1:] != -100


def align_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_size: int | None):
    """Slice logits padded beyond the tokenizer length; a real mismatch raises."""
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if vocab_size is not None:
        if vs < vocab_size or vt < vocab_size:
            raise ConfigError(f"logit widths {vs}/{vt} smaller than tokenizer length {vocab_size}")
        return student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]
    if vs != vt:
        raise ConfigError(f"teacher and student logit widths differ ({vt} vs {vs}); pass the shared "
                          "tokenizer length to slice padding, or use a cross-tokenizer loss (sorted_w1)")
    return student_logits, teacher_logits


def masked_positions(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of masked positions; an empty mask is an error, never a silent 0."""
    idx = mask.reshape(-1).nonzero(as_tuple=True)[0]
    if idx.numel() == 0:
        raise ValueError("no target positions in the batch (empty mask): nothing to distil")
    return idx
