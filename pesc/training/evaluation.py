"""Evaluation on a validation subset, during training (every eval_steps) and at the end.

- loss: the Trainer's own evaluation loop over the validation examples (CE and distillation parts);
- teacher-student KL per target token: with a live teacher from `pesc.metrics.kl.teacher_student_kl`
  at `kl_temperature` (full vocabulary); from a teacher cache, `kl_topk`, the KL at the cache's
  temperature with the vocabulary grouped into the teacher's top k and one rest bin (a lower bound);
- BLEU-4 / ROUGE-L (and METEOR etc. at the end) of replies generated for a few held-out dialogues
  with the gold history, scored by `pesc.metrics.score_texts`, the project's only scorer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pesc.data.examples import Example, collate

PERIODIC_METRICS = ("bleu4", "rougeL")
# At the end: every metric that needs no judge (METEOR needs WordNet, Extrema GloVe); with all six
# the scorer adds `total_no_g`. Without the resources the final scores fall back to BLEU-4/ROUGE-L.
FINAL_METRICS = ("meteor", "bleu4", "rougeL", "extrema", "distinct2", "distinct3")


def cache_kl(model, examples: list[Example], cache, split: str = "eval", *, pad_id: int = 0,
             vocab_size: int | None = None, batch_size: int = 8) -> float:
    """Mean over target tokens of the top-k-bucketed KL(p_T || q_S) at the cache's temperature."""
    from pesc.training.teacher_cache import sparse_kl
    from pesc.training.trainer import SPLIT_IDS, packed_logits, target_positions

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(examples), batch_size):
            idx = list(range(b, min(b + batch_size, len(examples))))
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
            positions = target_positions(batch["labels"])
            logits, _ = packed_logits(model, batch, positions)
            ids, lp, rest = cache.fetch(torch.full((len(idx),), SPLIT_IDS[split]), torch.tensor(idx),
                                        positions.sum(1), device=device)
            kl = sparse_kl(logits[0], ids, lp, rest, cache.temperature, vocab_size)
            total += float(kl.sum())
            count += kl.numel()
    return total / max(count, 1)


def score_replies(preds: list[str], refs: list[str], metrics=PERIODIC_METRICS) -> dict[str, float]:
    """score_texts on plain replies; metrics whose offline resources are missing are left out."""
    from pesc.metrics import ResourceError, score_texts

    try:
        scores = score_texts(preds, refs, metrics=tuple(metrics))
    except ResourceError as e:
        if set(metrics) <= set(PERIODIC_METRICS):
            raise
        print(f"note: final scores without METEOR/Extrema ({e}); BLEU-4 and ROUGE-L only")
        scores = score_texts(preds, refs, metrics=PERIODIC_METRICS)
    return {k: float(v) for k, v in dict(scores).items() if isinstance(v, (int, float))}


@dataclass
class ValidationEvaluator:
    """Extra validation metrics for `Trainer.evaluate` (and the before/after tables)."""

    tokenizer: object
    examples: list[Example] = field(default_factory=list)   # loss / KL subset
    dialogues: list = field(default_factory=list)           # Dialogue objects, replies generated + scored
    teacher: object | None = None                           # live teacher model (KL)
    cache: object | None = None                             # TeacherCache with an "eval" split (top-k KL)
    kl_temperature: float = 1.0
    vocab_size: int | None = None
    max_new_tokens: int = 48
    gen_batch_size: int | str = 32
    max_prompt_tokens: int | None = None
    seed: int = 0
    metrics: tuple = PERIODIC_METRICS
    progress: bool = False

    def __call__(self, trainer) -> dict[str, float]:
        return self.evaluate(trainer.accelerator.unwrap_model(trainer.model))

    def kl(self, model) -> dict[str, float]:
        if not self.examples:
            return {}
        pad = self.tokenizer.pad_token_id
        if self.teacher is not None:
            from pesc.metrics.kl import teacher_student_kl

            r = teacher_student_kl(self.teacher, model, self.examples, pad, temperature=self.kl_temperature,
                                   vocab_size=self.vocab_size, progress=self.progress)
            return {"kl": float(r.per_token_mean), "kl_sum": float(r.per_example_sum_mean)}
        if self.cache is not None and "eval" in self.cache.split_names:
            return {"kl_topk": cache_kl(model, self.examples, self.cache, "eval", pad_id=pad,
                                        vocab_size=self.vocab_size)}
        return {}

    def generate(self, model) -> tuple[list[str], list[str]]:
        from pesc.generation import GenerationOptions, generate_dialogues

        options = GenerationOptions(max_new_tokens=self.max_new_tokens, batch_size=self.gen_batch_size,
                                    do_sample=False, seed=self.seed, max_prompt_tokens=self.max_prompt_tokens)
        gen = generate_dialogues(model, self.tokenizer, self.dialogues, options, use_gold_history=True,
                                 progress=self.progress)
        preds = [t.text for d in gen for t in d.turns if t.role == "supporter"]
        refs = [t.text for d in self.dialogues for t in d.turns if t.role == "supporter"]
        return preds, refs

    def evaluate(self, model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            out = self.kl(model)
            if self.dialogues:
                preds, refs = self.generate(model)
                out.update(score_replies(preds, refs, self.metrics))
        finally:
            model.train(was_training)
        return out
