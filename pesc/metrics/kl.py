"""Teacher-student KL on a reference set (METRICS.md), with teacher forcing on both models.

For each example (prompt + one supporter response, labels -100 on the prompt) and each target
position t (after the shift: logits at t predict token t+1, mask `labels[:, 1:] != -100`):

    KL_t = sum_v p_v (log p_v - log q_v),  p = softmax(z_T / tau), q = softmax(z_S / tau)

in float32 whatever the model dtype, vocabularies aligned as in LOSSES.md (padding beyond the
tokenizer length sliced off; different widths without a tokenizer length are an error). Reported:

- `per_token_mean`: sum of KL_t over all target tokens / number of target tokens;
- `per_example_sum_mean`: per example, the sum of KL_t over its tokens; averaged over examples
  (the convention of the research tables);

both at the stated temperature and *without* the tau^2 factor that training losses carry.

Memory: only the positions that are a target in some row of the batch go through the LM head
(`logits_to_keep`), the target rows are gathered, and softmaxes run in chunks of positions sized
from a memory budget, so no second full (B, T, V) float32 tensor exists.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from pesc.errors import ConfigError
from pesc.losses.base import align_vocab, shift_for_distillation


@dataclass
class KLResult:
    per_token_mean: float
    per_example_sum_mean: float
    n_tokens: int
    n_examples: int
    temperature: float

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"KL(teacher || student) at tau={self.temperature:g}: {self.per_token_mean:.4f} per token, "
                f"{self.per_example_sum_mean:.3f} per example (sum over tokens); "
                f"{self.n_tokens} tokens in {self.n_examples} examples")


def relative_change(before: KLResult, after: KLResult) -> dict[str, float]:
    """(after - before) / before for both conventions (negative: the student got closer)."""
    if before.temperature != after.temperature:
        raise ConfigError(f"before/after KL at different temperatures ({before.temperature} vs "
                          f"{after.temperature}) are not comparable")
    out = {}
    for key in ("per_token_mean", "per_example_sum_mean"):
        b, a = getattr(before, key), getattr(after, key)
        out[key] = (a - b) / b if b != 0 else float("nan")
    return out


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def _logits_at(model, input_ids, attention_mask, positions: torch.Tensor) -> torch.Tensor:
    """Logits (B, len(positions), V) at the given sequence positions."""
    dev = _device(model)
    ids, mask = input_ids.to(dev), attention_mask.to(dev)
    try:
        out = model(input_ids=ids, attention_mask=mask, logits_to_keep=positions.to(dev), use_cache=False)
        logits = out.logits
    except TypeError:  # a model without logits_to_keep
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    if logits is None:
        raise ConfigError(f"{type(model).__name__} returned no logits; KL needs real logits")
    if logits.shape[1] != positions.numel():  # the model ignored logits_to_keep
        logits = logits[:, positions.to(logits.device)]
    return logits


def _chunk_size(vocab: int, budget_bytes: int) -> int:
    # per position: two float32 log-softmax rows, exp and difference -> ~5 rows of V floats
    return max(1, budget_bytes // (vocab * 4 * 5))


@torch.no_grad()
def teacher_student_kl(teacher, student, examples: Sequence, pad_id: int, temperature: float = 1.0,
                       batch_size: int = 8, vocab_size: int | None = None, progress: bool = True,
                       memory_budget_mb: int = 256) -> KLResult:
    """KL(p_teacher || q_student) over the supporter-response tokens of `examples`.

    examples: pesc.data.examples.Example objects (input_ids, labels). pad_id: the tokenizer's pad
    id. vocab_size: the shared tokenizer length (needed when the logit widths differ).
    """
    from pesc.data.examples import collate

    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    examples = list(examples)
    if not examples:
        raise ConfigError("no examples to compute KL on")
    order = sorted(range(len(examples)), key=lambda k: len(examples[k].input_ids), reverse=True)
    states = (teacher.training, student.training)
    teacher.eval()
    student.eval()
    budget = memory_budget_mb * 1024 * 1024
    total = torch.zeros((), dtype=torch.float64)
    per_example_total = torch.zeros((), dtype=torch.float64)
    n_tokens = n_examples = 0
    from tqdm.auto import tqdm

    bar = tqdm(total=len(examples), desc=f"KL tau={temperature:g}", unit="ex", disable=not progress, leave=False)
    try:
        for start in range(0, len(order), batch_size):
            batch = [examples[k] for k in order[start:start + batch_size]]
            b = collate(batch, pad_id)
            mask = shift_for_distillation(b["labels"])  # (B, T-1)
            positions = mask.any(0).nonzero(as_tuple=True)[0]
            if positions.numel() == 0:
                bar.update(len(batch))
                continue
            sel = mask[:, positions]                          # (B, P)
            rows, cols = sel.nonzero(as_tuple=True)          # target positions of the batch
            t_logits = _logits_at(teacher, b["input_ids"], b["attention_mask"], positions)
            t_sel = t_logits[rows.to(t_logits.device), cols.to(t_logits.device)]
            del t_logits
            s_logits = _logits_at(student, b["input_ids"], b["attention_mask"], positions)
            s_sel = s_logits[rows.to(s_logits.device), cols.to(s_logits.device)]
            del s_logits
            s_sel, t_sel = align_vocab(s_sel, t_sel, vocab_size)
            t_sel = t_sel.to(s_sel.device)
            step = _chunk_size(s_sel.shape[-1], budget)
            kl = torch.empty(s_sel.shape[0], dtype=torch.float32, device=s_sel.device)
            for i in range(0, s_sel.shape[0], step):
                lt = torch.log_softmax(t_sel[i:i + step].float() / temperature, dim=-1)
                ls = torch.log_softmax(s_sel[i:i + step].float() / temperature, dim=-1)
                kl[i:i + step] = (lt.exp() * (lt - ls)).sum(-1)
                del lt, ls
            kl = kl.double().cpu()
            sums = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, rows.cpu(), kl)
            has = torch.bincount(rows.cpu(), minlength=len(batch)) > 0
            total += kl.sum()
            per_example_total += sums[has].sum()
            n_tokens += int(kl.numel())
            n_examples += int(has.sum())
            bar.update(len(batch))
    finally:
        bar.close()
        teacher.train(states[0])
        student.train(states[1])
    if n_tokens == 0:
        raise ConfigError("the examples have no target tokens (every label is -100): nothing to compare")
    return KLResult(per_token_mean=float(total / n_tokens),
                    per_example_sum_mean=float(per_example_total / n_examples),
                    n_tokens=n_tokens, n_examples=n_examples, temperature=float(temperature))
