"""The straightforward per-pair loop: the libraries called one pair at a time, nothing cached.

This is METRICS.md read literally, with no optimisation. It exists to check the project's scorer
(tests compare them pair by pair) and as the baseline of `benchmarks/scoring.py`. Resources are
passed in already loaded (a WordNet reader, a word -> float64 vector dict), as any script would
load them once at the start.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def glove_dict(glove, words: set[str]) -> dict[str, np.ndarray]:
    """word -> float64 vector for the given words that GloVe knows (what a text-file parse gives)."""
    words = sorted(words)
    idx = glove.lookup(words)
    known = [w for w, i in zip(words, idx) if i >= 0]
    rows = glove.rows64(np.array([i for i in idx if i >= 0], dtype=np.int64))
    return {w: rows[k] for k, w in enumerate(known)}


def extrema_pair(pred: str, ref: str, vectors: dict[str, np.ndarray]) -> float:
    x = [vectors[w] for w in pred.split() if w in vectors]
    y = [vectors[w] for w in ref.split() if w in vectors]
    if not x or not y:
        return 0.0
    x, y = np.max(np.array(x), axis=0), np.max(np.array(y), axis=0)
    if not x.any() or not y.any():
        return 1.0 if (x == y).all() else 0.0
    num = sum(x[i] * y[i] for i in range(len(x)))
    return float(num / (np.sqrt(sum(v * v for v in x)) * np.sqrt(sum(v * v for v in y))))


def distinct(texts: Sequence[str], n: int) -> float:
    total, unique = 0, set()
    for text in texts:
        tokens = text.lower().split()
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def reference_scores(preds: Sequence[str], refs: Sequence[str], wordnet, vectors: dict[str, np.ndarray]
                     ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(aggregate, per-pair) with the official definitions, one library call per pair."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from nltk.translate.meteor_score import meteor_score
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    smoothie = SmoothingFunction().method1
    per = {"meteor": [], "bleu4": [], "rougeL": [], "extrema": []}
    for ref, pred in zip(refs, preds):
        per["meteor"].append(meteor_score([ref.split()], pred.split(), wordnet=wordnet))
        per["bleu4"].append(sentence_bleu([ref.split()], pred.split(), weights=(0.25, 0.25, 0.25, 0.25),
                                          smoothing_function=smoothie))
        per["rougeL"].append(scorer.score(ref, pred)["rougeL"].fmeasure)
        per["extrema"].append(extrema_pair(pred, ref, vectors))
    agg = {}
    for k, vals in per.items():
        total = 0.0
        for v in vals:
            total += v
        agg[k] = total / len(vals)
    agg["distinct2"] = distinct(preds, 2)
    agg["distinct3"] = distinct(preds, 3)
    return agg, per
