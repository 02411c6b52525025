"""Gaming flags: signs that a submission games the metrics instead of answering the seeker.

Each check compares the submission with the gold (same dialogues) and returns `Flag`s:

| code | what | warning | severe |
| --- | --- | --- | --- |
| copied_seeker | responses whose word bigrams come (>= 80%) from the seeker turn before them | >= 20% | >= 50% |
| repeated_reply | the most frequent response (case and spacing ignored) | >= 5% and >= 5 times | >= 25% |
| length_outlier | mean response length vs the gold's mean (words) | < 0.4x or > 2x | < 0.2x or > 4x |
| long_responses | responses longer than the longest gold response | >= 10% | >= 50% |
| distinct_inflated | corpus Distinct-2 / -3 far above the gold's | > 1.5x and +0.15 | > 2x and +0.3 |
| empty_responses | blank responses | any | >= 50% |
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pesc.data.dialogue import SEEKER, SUPPORTER, Dialogue
from pesc.metrics.corpus import distinct_n


@dataclass
class Flag:
    code: str
    message: str
    severity: str  # "warning" or "severe"


def _responses(dialogues: Sequence[Dialogue]) -> list[tuple[str, int, str, str]]:
    """(dialogue id, turn, previous seeker text, response) for every supporter turn."""
    out = []
    for d in dialogues:
        prev = ""
        for i, t in enumerate(d.turns):
            if t.role == SEEKER:
                prev = t.text
            elif t.role == SUPPORTER:
                out.append((d.id, i, prev, t.text))
    return out


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _bigrams(tokens: list[str]) -> list[tuple[str, ...]]:
    if len(tokens) < 2:
        return [tuple(tokens)] if tokens else []
    return list(zip(tokens, tokens[1:]))


def copied_share(rows) -> tuple[float, list]:
    copied = []
    for did, i, prev, resp in rows:
        grams = _bigrams(resp.lower().split())
        if not grams:
            continue
        src = set(_bigrams(prev.lower().split())) | {(w,) for w in prev.lower().split()}
        if sum(g in src for g in grams) >= 0.8 * len(grams):
            copied.append((did, i))
    return (len(copied) / len(rows) if rows else 0.0), copied


def _sev(value: float, warn: bool, severe: bool) -> str | None:
    return "severe" if severe else ("warning" if warn else None)


def gaming_flags(pred_dialogues: Sequence[Dialogue], gold_dialogues: Sequence[Dialogue]) -> list[Flag]:
    """Flags for a submission (dialogues with the predicted responses) against the gold."""
    pred, gold = _responses(pred_dialogues), _responses(gold_dialogues)
    flags: list[Flag] = []
    n = len(pred)
    if n == 0:
        return [Flag("empty_submission", "the submission has no supporter responses", "severe")]

    texts = [r[3] for r in pred]
    empty = sum(1 for t in texts if not t.strip())
    if empty:
        flags.append(Flag("empty_responses", f"{empty} of {n} responses are blank",
                          "severe" if empty >= 0.5 * n else "warning"))

    share, copied = copied_share(pred)
    gold_share, _ = copied_share(gold)
    sev = _sev(share, share >= 0.2, share >= 0.5)
    if sev:
        did, i = copied[0]
        flags.append(Flag("copied_seeker", f"{share:.0%} of responses copy the seeker turn before them "
                          f"(gold: {gold_share:.0%}; first: dialogue {did} turn {i})", sev))

    counts = Counter(_norm(t) for t in texts if t.strip())
    if counts:
        top, c = counts.most_common(1)[0]
        share = c / n
        sev = _sev(share, share >= 0.05 and c >= 5, share >= 0.25)
        if sev:
            flags.append(Flag("repeated_reply", f"one response is used {c} times ({share:.0%} of all): "
                              f"{top[:60]!r}{'...' if len(top) > 60 else ''}", sev))

    plen = np.array([len(t.split()) for t in texts], dtype=np.float64)
    glen = np.array([len(r[3].split()) for r in gold], dtype=np.float64)
    if glen.size and glen.mean() > 0:
        ratio = plen.mean() / glen.mean()
        sev = _sev(ratio, ratio < 0.4 or ratio > 2, ratio < 0.2 or ratio > 4)
        if sev:
            flags.append(Flag("length_outlier", f"mean response length {plen.mean():.1f} words is "
                              f"{ratio:.2f}x the gold's {glen.mean():.1f}", sev))
        too_long = float((plen > glen.max()).mean())
        sev = _sev(too_long, too_long >= 0.1, too_long >= 0.5)
        if sev:
            flags.append(Flag("long_responses", f"{too_long:.0%} of responses are longer than the longest "
                              f"gold response ({int(glen.max())} words)", sev))

    gold_texts = [r[3] for r in gold]
    for k in (2, 3):
        p, g = distinct_n(texts, k), distinct_n(gold_texts, k)
        sev = _sev(p, p > 1.5 * g and p > g + 0.15, p > 2 * g and p > g + 0.3)
        if sev:
            flags.append(Flag(f"distinct{k}_inflated", f"Distinct-{k} {p:.2f} is far above the gold's "
                              f"{g:.2f}: unusually varied wording inflates the diversity metric", sev))
    return flags
