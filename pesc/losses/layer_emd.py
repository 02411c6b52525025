"""Many-to-many layer mapping with the Earth Mover's Distance (BERT-EMD), for decoder LMs.

Student layers 1..M, teacher layers 1..N (hidden states; optionally attention maps). At the target
positions, both are RMS-normalised per position (raw LLM hidden states grow with depth); student
layer i is mapped to the teacher width by one trainable linear map W (d_S -> d_T). The layer cost is

    D_ij = sum over target positions of mean_d (W rms(h^S_i) - rms(h^T_j))^2  / num_items

Layer weights w_S (M) and w_T (N), uniform at the start, are buffers (saved in checkpoints). The
exact transport plan F between w_S and w_T for cost D comes from POT's network simplex (`ot.emd`,
a constant), and the layer loss is sum_ij F_ij D_ij. After each training forward the weights move
mass towards cheaply transported layers: with c_k the transport cost of layer k (sum of its row or
column of F * D), w_k <- (w_k / c_k) / sum_l (w_l / c_l) (costs floored at 1e-12 of the largest).

The loss D returned to the trainer is `logit_loss` (fkl by default; "none" to drop it) plus
beta * EMD_hidden (+ beta_attention * EMD_attention), so the training objective is
(1 - alpha) CE + alpha (KL + beta EMD).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from pesc.errors import ConfigError
from pesc.losses.base import DistillLoss, LossOutput, TeacherSignal, build_loss, compute_dtype, masked_rows, register_loss
from pesc.losses.ot import emd


def rms_normalize(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)


def layer_costs(student: list[torch.Tensor], teacher: list[torch.Tensor], denom: float) -> torch.Tensor:
    """D (M, N): D_ij = sum_p mean_d (s_i[p] - t_j[p])^2 / denom for stacked (P, d) layers."""
    S = torch.stack(student).flatten(1)            # (M, P * d)
    T = torch.stack(teacher).flatten(1)            # (N, P * d)
    d = student[0].shape[-1]
    D = S.square().sum(1)[:, None] + T.square().sum(1)[None, :] - 2.0 * (S @ T.t())
    return D.clamp(min=0.0) / (d * denom)


def update_layer_weights(w: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """w_k / c_k renormalised; c_k is layer k's transport cost, floored at 1e-12 of the largest."""
    c = cost.clamp(min=float(cost.max()) * 1e-12 if float(cost.max()) > 0 else 1e-30)
    new = w.clamp(min=1e-12) / c
    return new / new.sum()


@register_loss("layer_emd")
class LayerEMDLoss(DistillLoss):
    """BERT-EMD layer mapping on hidden states (optionally attention maps) plus a logit divergence.

    Needs hidden states of both models: `student_hidden=` (tuple of (B, T or T+1, H_S), as
    transformers returns with output_hidden_states=True) and `teacher.hidden_states`; with
    attention=True also `student_attentions=` and `teacher.attentions`. The first entry of each
    tuple (embedding output) is skipped unless skip_embedding_layer=false. Trainable parameters:
    `projection.weight` (d_T x d_S), created by `prepare(student_hidden_size=, teacher_hidden_size=,
    student_layers=, teacher_layers=)` or from the *_dim/*_layers arguments; layer weights are
    buffers (`weight_student`, `weight_teacher`, and `attention_weight_*`). Refuses a top-k cache
    (a cache holds no hidden states).
    """

    needs_hidden_states = True

    def __init__(self, temperature: float = 1.0, vocab_size: int | None = None, beta: float = 1.0,
                 logit_loss: Literal["fkl", "rkl", "jsd", "skl", "srkl", "tvd", "none"] = "fkl",
                 attention: bool = False, beta_attention: float = 1.0, update_weights: bool = True,
                 skip_embedding_layer: bool = True, student_layers: int | None = None,
                 teacher_layers: int | None = None, student_dim: int | None = None, teacher_dim: int | None = None):
        super().__init__(temperature)
        if beta < 0 or beta_attention < 0:
            raise ConfigError(f"layer_emd beta and beta_attention must be >= 0, got {beta}, {beta_attention}")
        self.beta, self.beta_attention = float(beta), float(beta_attention)
        self.attention, self.update_weights = bool(attention), bool(update_weights)
        self.skip_embedding_layer, self.vocab_size = bool(skip_embedding_layer), vocab_size
        self.logit_name = logit_loss
        self.logit = None if logit_loss == "none" else build_loss(logit_loss, temperature=temperature,
                                                                   vocab_size=vocab_size)
        self.projection: nn.Linear | None = None
        if None not in (student_layers, teacher_layers, student_dim, teacher_dim):
            self.prepare(student_hidden_size=student_dim, teacher_hidden_size=teacher_dim,
                         student_layers=student_layers, teacher_layers=teacher_layers)

    def prepare(self, *, student_embeddings=None, teacher_embeddings=None, student_hidden_size=None,
                teacher_hidden_size=None, student_layers=None, teacher_layers=None):
        """Create the projection and the layer-weight buffers (M = student_layers, N = teacher_layers
        transformer blocks, not counting the embedding output)."""
        ds = student_hidden_size or (student_embeddings.shape[-1] if student_embeddings is not None else None)
        dt = teacher_hidden_size or (teacher_embeddings.shape[-1] if teacher_embeddings is not None else None)
        if None in (ds, dt, student_layers, teacher_layers):
            raise ConfigError("layer_emd.prepare needs student/teacher hidden sizes and layer counts")
        if student_layers < 1 or teacher_layers < 1:
            raise ConfigError(f"layer counts must be >= 1, got {student_layers}/{teacher_layers}")
        if self.projection is not None:
            if self.projection.weight.shape != (dt, ds) or self.weight_student.numel() != student_layers \
                    or self.weight_teacher.numel() != teacher_layers:
                raise ConfigError("layer_emd was prepared for other models "
                                  f"({self.weight_student.numel()} x {tuple(self.projection.weight.shape)})")
            return self
        proj = nn.Linear(ds, dt, bias=False)
        with torch.no_grad():
            if ds == dt:
                proj.weight.copy_(torch.eye(ds))
            else:
                nn.init.orthogonal_(proj.weight)
                if dt > ds:
                    proj.weight.mul_((dt / ds) ** 0.5)
        device = student_embeddings.device if student_embeddings is not None else None
        self.projection = proj.to(device) if device is not None else proj
        for name, n in [("weight_student", student_layers), ("weight_teacher", teacher_layers)] + (
                [("attention_weight_student", student_layers), ("attention_weight_teacher", teacher_layers)]
                if self.attention else []):
            self.register_buffer(name, torch.full((n,), 1.0 / n, device=device))
        return self

    def _layers(self, states, what: str, length: int) -> list[torch.Tensor]:
        """The per-layer tensors, embedding output dropped; position axis T (mask) or T + 1 (unshifted)."""
        if states is None:
            raise ValueError(f"loss {self.name!r} needs the {what} (run the model with output_hidden_states=True)")
        states = list(states)[1:] if self.skip_embedding_layer else list(states)
        for h in states:
            if h.dim() != 3 or h.shape[1] not in (length, length + 1):
                raise ValueError(f"{what} must be (batch, {length} or {length + 1}, hidden), got {tuple(h.shape)}")
        return states

    def forward(self, student_logits, teacher: TeacherSignal, mask, num_items=None, student_hidden=None,
                student_attentions=None, **_):
        self.check_teacher(teacher)
        self.check_logits(student_logits, mask)
        if self.projection is None:
            raise ConfigError(f"loss {self.name!r} has no projection yet: call loss.prepare(student_hidden_size=, "
                              "teacher_hidden_size=, student_layers=, teacher_layers=) before building the optimizer")
        T = mask.shape[1]
        hs = self._layers(student_hidden, "student hidden states", T)
        ht = self._layers(teacher.hidden_states, "teacher hidden states", T)
        if len(hs) != self.weight_student.numel() or len(ht) != self.weight_teacher.numel():
            raise ConfigError(f"layer_emd was prepared for {self.weight_student.numel()} student / "
                              f"{self.weight_teacher.numel()} teacher layers, got {len(hs)} / {len(ht)}")
        bi, ti = masked_rows(mask)
        denom = self.denominator(num_items, bi.numel())
        dtype = compute_dtype(student_logits)
        W = self.projection.weight.to(dtype)
        s_rows = [rms_normalize(h[bi, ti].to(dtype)) @ W.t() for h in hs]
        t_rows = [rms_normalize(h.detach()[bi, ti].to(dtype)) for h in ht]
        if s_rows[0].shape[-1] != t_rows[0].shape[-1]:
            raise ConfigError(f"projection maps to width {s_rows[0].shape[-1]}, teacher hidden width is "
                              f"{t_rows[0].shape[-1]}")
        parts: dict[str, float] = {}
        value = student_logits.new_zeros((), dtype=dtype)
        if self.logit is not None:
            lo = self.logit(student_logits, teacher, mask, num_items)
            value = value + lo.value
            parts[self.logit_name] = lo.parts[self.logit_name]
        D = layer_costs(s_rows, t_rows, denom)
        emd_h = self._emd(D, "weight_student", "weight_teacher")
        value = value + self.beta * emd_h
        parts["emd_hidden"] = float(emd_h.detach())
        if self.attention:
            a_s = self._attention_rows(student_attentions, "student attention maps", bi, ti, dtype)
            a_t = self._attention_rows(teacher.attentions, "teacher attention maps", bi, ti, dtype, detach=True)
            if len(a_s) != self.weight_student.numel() or len(a_t) != self.weight_teacher.numel():
                raise ConfigError(f"attention maps for {len(a_s)} / {len(a_t)} layers, expected "
                                  f"{self.weight_student.numel()} / {self.weight_teacher.numel()}")
            Da = layer_costs(a_s, a_t, denom)
            emd_a = self._emd(Da, "attention_weight_student", "attention_weight_teacher")
            value = value + self.beta_attention * emd_a
            parts["emd_attention"] = float(emd_a.detach())
        parts[self.name] = float(value.detach())
        return LossOutput(value, parts)

    def _attention_rows(self, att, what, bi, ti, dtype, detach=False):
        if att is None:
            raise ValueError(f"loss {self.name!r} with attention=true needs the {what} (output_attentions=True)")
        rows = []
        for a in att:               # (B, heads, T', T'): mean over heads, query rows at the targets
            if a.dim() != 4 or a.shape[-1] != a.shape[-2]:
                raise ValueError(f"{what} must be (batch, heads, T, T), got {tuple(a.shape)}")
            a = a.detach() if detach else a
            rows.append(a.to(dtype).mean(1)[bi, ti])
        if len({r.shape[-1] for r in rows}) != 1:
            raise ValueError(f"{what} have different lengths")
        return rows

    def _emd(self, D: torch.Tensor, ws_name: str, wt_name: str) -> torch.Tensor:
        ws, wt = getattr(self, ws_name), getattr(self, wt_name)
        F = emd(ws, wt, D)                            # constant plan (M, N)
        loss = (F * D).sum()
        if self.update_weights and self.training and torch.is_grad_enabled():
            with torch.no_grad():
                FD = F * D.detach()
                ws.copy_(update_layer_weights(ws, FD.sum(1)).to(ws.dtype))
                wt.copy_(update_layer_weights(wt, FD.sum(0)).to(wt.dtype))
        return loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}, beta={self.beta:g}, logit_loss={self.logit_name}, attention={self.attention}"
