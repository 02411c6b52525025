"""The loss interface, the teacher-signal seam, the registry and the CLI/YAML parameter parser.

Shapes: the trainer shifts once (`shift_for_distillation`): logits at position t predict token t+1,
so student/teacher logits are (B, T, V) and `mask` (B, T) marks positions whose *next* token is a
supporter-response label. Losses reduce to the sum over masked positions divided by `num_items`
(the target-token count across gradient accumulation) or, when it is not given, by the number of
masked positions. Every computation is in float32 whatever the input dtype (float64 inputs stay
float64, for gradient checks).

    loss = build_loss("sinkhorn", temperature=2.0, vocab_size=49152, **parse_loss_args(
        ["cost=euclidean", "topk=100", "epsilon=0.1"], loss="sinkhorn"))
    loss.prepare(student_embeddings=E_s, teacher_embeddings=E_t)   # creates trainable parameters
    out = loss(student_logits, TeacherSignal(logits=teacher_logits), mask, num_items=n,
               student_embeddings=E_s, teacher_embeddings=E_t)
    out.value.backward(); out.parts   # {"sinkhorn": ..., "ot_linear": ..., ...}
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import torch
from torch import nn

from pesc.errors import ConfigError

# --------------------------------------------------------------------------------------------------
# The teacher seam
# --------------------------------------------------------------------------------------------------


@dataclass
class TeacherSignal:
    """What the teacher says at each position: dense logits, or a sparse top-k cache.

    dense:  logits (B, T, V)
    sparse: topk_ids (B, T, k) int64, topk_logprobs (B, T, k) (log-probabilities at `temperature`,
            the temperature the cache was written with, 1.0 by default) and rest_logmass (B, T)
            = log(1 - sum exp(topk_logprobs)), the log of the mass outside the top k (-inf when the
            top k hold everything). A loss that needs the full vocabulary refuses it.
    hidden_states / attentions: optional tuples of (B, T', H) / (B, heads, T', T') per layer
            (for layer_emd), as returned by a transformers model with output_hidden_states=True.
    Teacher tensors are constants for every loss: gradients never flow into them.
    """

    logits: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    rest_logmass: torch.Tensor | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    temperature: float = 1.0

    @property
    def is_dense(self) -> bool:
        return self.logits is not None

    @property
    def is_sparse(self) -> bool:
        return self.logits is None and self.topk_ids is not None

    @classmethod
    def topk_from_logits(cls, logits: torch.Tensor, k: int, temperature: float = 1.0) -> "TeacherSignal":
        """The sparse signal a top-k cache would hold for these logits (float32 log-probabilities;
        float64 logits stay float64)."""
        if k < 1 or k > logits.shape[-1]:
            raise ConfigError(f"top-k cache size must be in [1, {logits.shape[-1]}], got {k}")
        lp = torch.log_softmax(logits.detach().to(compute_dtype(logits)) / temperature, dim=-1)
        vals, ids = lp.topk(k, dim=-1)
        return cls(topk_ids=ids, topk_logprobs=vals, rest_logmass=rest_logmass(vals),
                   temperature=temperature)

    def sparse_parts(self, vocab_size: int | None = None):
        """(ids, logprobs, rest_logmass) validated: shapes agree, ids in range, masses <= 1."""
        ids, lp, rest = self.topk_ids, self.topk_logprobs, self.rest_logmass
        if ids is None or lp is None:
            raise ValueError("sparse teacher signal needs topk_ids and topk_logprobs")
        if ids.shape != lp.shape or ids.dim() != 3:
            raise ValueError(f"teacher topk_ids {tuple(ids.shape)} and topk_logprobs {tuple(lp.shape)} must "
                             "both be (B, T, k)")
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"teacher topk_ids must be integer, got {ids.dtype}")
        if rest is None:
            rest = rest_logmass(lp)
        if rest.shape != ids.shape[:2]:
            raise ValueError(f"teacher rest_logmass {tuple(rest.shape)} must be (B, T) = {tuple(ids.shape[:2])}")
        if vocab_size is not None and ids.numel() and int(ids.max()) >= vocab_size:
            raise ConfigError(f"teacher top-k cache holds token id {int(ids.max())} >= vocabulary size "
                              f"{vocab_size}: the cache was written for another tokenizer")
        return ids.long(), lp, rest


def rest_logmass(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum exp(topk_logprobs)) computed stably (-inf when the top k hold all the mass)."""
    s = torch.logsumexp(topk_logprobs.to(compute_dtype(topk_logprobs)), dim=-1).clamp(max=0.0)
    # log(1 - e^s) = log(-expm1(s)); for s close to 0 use log1p(-exp(s)) to keep precision.
    return torch.where(s > -math.log(2.0), torch.log(-torch.expm1(s)), torch.log1p(-torch.exp(s)))


@dataclass
class LossOutput:
    value: torch.Tensor                      # scalar, differentiable
    parts: dict[str, float] = field(default_factory=dict)  # named parts for logging


# --------------------------------------------------------------------------------------------------
# The base class
# --------------------------------------------------------------------------------------------------


class DistillLoss(nn.Module):
    """Base class. Subclasses implement `forward(student_logits, teacher, mask, num_items=None, **kw)`
    and return `LossOutput(value, parts)`; value = sum of per-position terms / (num_items or the
    number of masked positions).

    Class (or instance) attributes declare what a loss can work from:
      supports_sparse_teacher: can use a TeacherSignal with only top-k (cached) values
      cross_tokenizer: works when teacher and student vocabularies differ
      needs_hidden_states: wants hidden states of both models
      needs_embeddings: wants the input-embedding matrices (student_embeddings=, teacher_embeddings=)
    Losses with trainable parameters create them in `prepare(...)` (called by the trainer before the
    optimizer is built) or from dimensions given at construction.
    """

    name = "base"
    supports_sparse_teacher = False
    cross_tokenizer = False
    needs_hidden_states = False
    needs_embeddings = False
    kl_type = False           # multiplied by temperature^2 (Hinton)

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ConfigError(f"temperature must be a positive number, got {temperature}")
        self.temperature = float(temperature)

    # -- hooks ------------------------------------------------------------------------------------

    def prepare(self, *, student_embeddings: torch.Tensor | None = None,
                teacher_embeddings: torch.Tensor | None = None, student_hidden_size: int | None = None,
                teacher_hidden_size: int | None = None, student_layers: int | None = None,
                teacher_layers: int | None = None) -> "DistillLoss":
        """Create trainable parameters that depend on the models (no-op for most losses). Call it
        before building the optimizer; it is idempotent for the same dimensions."""
        return self

    # -- shared checks ----------------------------------------------------------------------------

    def check_teacher(self, teacher: TeacherSignal) -> None:
        if not isinstance(teacher, TeacherSignal):
            raise TypeError(f"teacher must be a TeacherSignal, got {type(teacher).__name__}")
        if teacher.is_dense:
            return
        if teacher.topk_ids is None:
            raise ValueError(f"loss {self.name!r}: the teacher signal has neither logits nor a top-k cache")
        if not self.supports_sparse_teacher:
            raise ConfigError(f"loss {self.name!r} needs the teacher's full-vocabulary logits and "
                              "cannot run from a top-k teacher cache; use a live teacher")
        if abs(float(teacher.temperature) - self.temperature) > 1e-6:
            raise ConfigError(f"the teacher top-k cache holds log-probabilities at temperature "
                              f"{teacher.temperature:g} but loss {self.name!r} uses temperature "
                              f"{self.temperature:g}; the mass outside the top k cannot be re-tempered. "
                              "Write the cache at the training temperature or train at the cache's")

    @staticmethod
    def check_logits(student_logits: torch.Tensor, mask: torch.Tensor) -> None:
        if not isinstance(student_logits, torch.Tensor) or student_logits.dim() != 3:
            shape = tuple(student_logits.shape) if isinstance(student_logits, torch.Tensor) else type(student_logits)
            raise ValueError(f"student logits must be (batch, length, vocab), got {shape}")
        if student_logits.shape[-1] == 0 or not student_logits.is_floating_point():
            raise ValueError(f"student logits look like a placeholder: shape {tuple(student_logits.shape)}, "
                             f"dtype {student_logits.dtype}")
        if mask.shape != student_logits.shape[:2]:
            raise ValueError(f"mask {tuple(mask.shape)} must be (batch, length) = {tuple(student_logits.shape[:2])} "
                             "(shifted: labels[:, 1:] != -100 against logits[:, :-1])")

    @staticmethod
    def check_teacher_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
        if not isinstance(teacher_logits, torch.Tensor) or teacher_logits.dim() != 3:
            raise ValueError("teacher logits must be (batch, length, vocab)")
        if teacher_logits.shape[:2] != student_logits.shape[:2]:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                             f"{tuple(student_logits.shape)} cover different positions")
        if teacher_logits.shape[-1] == 0:
            raise ValueError("teacher logits have an empty vocabulary axis (placeholder logits?)")

    @staticmethod
    def denominator(num_items, n_positions: int) -> float | torch.Tensor:
        if num_items is None:
            return float(n_positions)
        if isinstance(num_items, torch.Tensor):
            num_items = num_items.detach()
            if num_items.numel() != 1 or float(num_items) <= 0:
                raise ValueError(f"num_items must be a positive count, got {num_items}")
            return num_items.to(torch.float64).item()
        if num_items <= 0:
            raise ValueError(f"num_items must be a positive count, got {num_items}")
        return float(num_items)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}"


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type] = {}


def register_loss(name: str):
    def deco(cls):
        _REGISTRY[name] = cls
        cls.name = name
        return cls
    return deco


def available_losses() -> list[str]:
    return sorted(_REGISTRY)


def loss_class(name: str) -> type:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown loss {name!r}; available: {', '.join(available_losses())}")
    return _REGISTRY[name]


def loss_params(name: str) -> dict[str, tuple[Any, Any]]:
    """{parameter: (type annotation, default)} of a loss's constructor."""
    out: dict[str, tuple[Any, Any]] = {}
    for klass in loss_class(name).__mro__:      # a constructor taking **kwargs passes them to its base
        if "__init__" not in vars(klass):
            continue
        sig = inspect.signature(klass.__init__)
        hints = typing.get_type_hints(klass.__init__)
        more = False
        for pname, p in sig.parameters.items():
            if p.kind == p.VAR_KEYWORD:
                more = True
            if pname == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or pname in out:
                continue
            out[pname] = (hints.get(pname, Any), p.default)
        if not more:
            break
    return out


def build_loss(name: str, **params) -> DistillLoss:
    """Build a registered loss. Unknown parameters and bad values are ConfigErrors naming the fix."""
    known = loss_params(name)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"loss {name!r} has no parameter {', '.join(map(repr, unknown))}; its parameters: "
                          f"{', '.join(known)}")
    params = {k: coerce_param(name, k, v, known[k][0]) for k, v in params.items()}
    try:
        return _REGISTRY[name](**params)
    except TypeError as e:
        raise ConfigError(f"bad parameters for loss {name!r}: {e}") from None


def loss_help(name: str) -> str:
    """One line per parameter: name, type and default, for --help texts."""
    cls = loss_class(name)
    doc = (cls.__doc__ or "").strip().splitlines()
    lines = [f"{name}: {doc[0] if doc else ''}"]
    for pname, (ann, default) in loss_params(name).items():
        lines.append(f"  --loss.{pname} {_type_name(ann)} (default {default!r})")
    return "\n".join(lines)


def _type_name(ann) -> str:
    if ann is type(None):
        return "none"
    if typing.get_origin(ann) is Literal:
        return "{" + ",".join(map(str, typing.get_args(ann))) + "}"
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(ann))
    return getattr(ann, "__name__", str(ann))


_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def coerce_param(loss: str, key: str, value, ann):
    """Convert a CLI string (or a YAML scalar) to the annotated type; ConfigError if it cannot be."""
    def fail(expect):
        raise ConfigError(f"loss {loss!r}: parameter {key}={value!r} is not {expect}")

    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(ann)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce_param(loss, key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        fail(_type_name(ann))
    if origin is Literal:
        choices = typing.get_args(ann)
        for c in choices:
            if value == c or (isinstance(value, str) and str(c).lower() == value.lower()):
                return c
        fail("one of " + ", ".join(map(str, choices)))
    if ann is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        fail("a boolean (true/false)")
    if ann is int:
        if isinstance(value, bool):
            fail("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            fail("an integer")
    if ann is float:
        if isinstance(value, bool):
            fail("a number")
        try:
            v = float(value)
        except (TypeError, ValueError):
            fail("a number")
        return v
    if ann is str:
        return str(value)
    return value


def parse_loss_args(pairs: Iterable[str] | Iterable[tuple[str, Any]] | dict, loss: str | None = None) -> dict:
    """CLI pairs -> typed keyword arguments for `build_loss(loss, **kwargs)`.

    `pairs` are "key=value" strings (a leading "--" and "loss." are accepted: "--loss.topk=100"),
    (key, value) tuples, or a dict (from YAML). With `loss` given, keys are checked against the
    loss's parameters (ConfigError listing the valid ones) and values converted to their types
    (int, float, bool, choices, "none" for optional values). Without it, values are only
    converted literally (int, float, bool, none, else str).
    """
    items: list[tuple[str, Any]] = []
    if isinstance(pairs, dict):
        items = list(pairs.items())
    else:
        for p in pairs:
            if isinstance(p, str):
                if "=" not in p:
                    raise ConfigError(f"loss parameter {p!r} must look like key=value (e.g. topk=100)")
                k, v = p.split("=", 1)
            else:
                k, v = p
            items.append((k, v))
    out: dict[str, Any] = {}
    known = loss_params(loss) if loss is not None else None
    for k, v in items:
        key = k.strip().lstrip("-")
        if key.startswith("loss."):
            key = key[len("loss."):]
        key = key.replace("-", "_")
        if not key:
            raise ConfigError(f"empty loss parameter name in {k!r}")
        if key in out:
            raise ConfigError(f"loss parameter {key!r} given twice")
        if known is not None:
            if key not in known:
                raise ConfigError(f"loss {loss!r} has no parameter {key!r}; its parameters: {', '.join(known)}")
            out[key] = coerce_param(loss, key, v, known[key][0])
        else:
            out[key] = _literal(v)
    return out


def _literal(v):
    if not isinstance(v, str):
        return v
    s = v.strip()
    if s.lower() in ("none", "null"):
        return None
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return s


# --------------------------------------------------------------------------------------------------
# Shapes and vocabularies
# --------------------------------------------------------------------------------------------------


def shift_for_distillation(labels: torch.Tensor, logits_len: int | None = None) -> torch.Tensor:
    """Mask of positions whose logits predict a label token.

    Default: (B, T-1) = labels[:, 1:] != -100, to pair with logits[:, :-1]. With
    `logits_len == T` the mask is (B, T) with a False last column, so the unshifted logits can be
    passed as they are (no sliced view whose backward would allocate a second full-size gradient).
    """
    m = labels[:, 1:] != -100
    if logits_len is None or logits_len == labels.shape[1] - 1:
        return m
    if logits_len == labels.shape[1]:
        return torch.cat([m, torch.zeros_like(m[:, :1])], dim=1)
    raise ValueError(f"logits length {logits_len} does not match labels length {labels.shape[1]}")


def check_vocab(vs: int, vt: int, vocab_size: int | None) -> int:
    """The shared vocabulary width: both sliced to `vocab_size`, or equal widths; else ConfigError."""
    if vocab_size is not None:
        if vs < vocab_size or vt < vocab_size:
            raise ConfigError(f"logit widths student {vs} / teacher {vt} are smaller than the tokenizer "
                              f"length {vocab_size}: the models do not share this tokenizer")
        return vocab_size
    if vs != vt:
        raise ConfigError(f"teacher and student logit widths differ ({vt} vs {vs}); pass the shared "
                          "tokenizer length (vocab_size) to slice padding, or use a cross-tokenizer loss "
                          "(sorted_w1) when the tokenizers differ")
    return vs


def align_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_size: int | None):
    """Slice logits padded beyond the tokenizer length; a real mismatch raises."""
    v = check_vocab(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)
    return student_logits[..., :v], teacher_logits[..., :v]


def masked_positions(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of masked positions; an empty mask is an error, never a silent 0."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    idx = mask.reshape(-1).nonzero(as_tuple=True)[0]
    if idx.numel() == 0:
        raise ValueError("no target positions in the batch (empty mask): nothing to distil")
    return idx


def masked_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index, position index) of the masked positions, row-major; empty mask raises."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    bi, ti = mask.nonzero(as_tuple=True)
    if bi.numel() == 0:
        raise ValueError("no target positions in the batch (empty mask): nothing to distil")
    return bi, ti


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (gradient checks); everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def log_tiny(dtype: torch.dtype) -> float:
    """log of the smallest normal number: the floor for log-probabilities (no -inf, no NaN)."""
    return math.log(torch.finfo(dtype).tiny)


def chunk_rows(width: int, n_rows: int, temps: int, memory_mb: float, itemsize: int = 4) -> int:
    """Rows per chunk so that `temps` (rows x width) temporaries fit in `memory_mb`, and at most a
    sixteenth of all rows (so temporaries stay well below one full-size tensor)."""
    per_row = max(1, width * temps * itemsize)
    rows = int(memory_mb * 2**20 // per_row)
    return max(1, min(rows, max(1, -(-n_rows // 16)), n_rows))

