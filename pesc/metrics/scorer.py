"""The one scorer: `score()` for files or dialogues, `score_texts()` for plain text lists.

Both go through `_compute`, so the trainer's periodic evaluation, the leaderboard, the CLI and the
`evaluate` metric give the same numbers.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from pesc.errors import ConfigError
from pesc.metrics.corpus import distinct_n, extrema_scores
from pesc.metrics.offline import ResourceError, load_glove
from pesc.metrics.pairs import MODES, PairSet, Source, build_pairs, pairs_from_texts
from pesc.metrics.pairwise import PAIR_METRICS, sequential_mean, start_pairs
from pesc.metrics.report import ScoreReport, weighted_total

ALL_METRICS = ("meteor", "bleu4", "rougeL", "extrema", "distinct2", "distinct3")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown scoring mode {mode!r}; choose one of {', '.join(MODES)}")


def _compute(ps: PairSet, metrics: Sequence[str], *, workers, progress, glove, on_missing: str,
             judge=None) -> tuple[dict[str, float], dict[str, np.ndarray], list[str], list[str], dict, dict]:
    """Aggregate values, per-pair arrays, notes, skipped metrics, resources, judge details."""
    if on_missing not in ("error", "skip"):
        raise ConfigError("on_missing must be 'error' or 'skip'")
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise ConfigError(f"unknown metric(s) {', '.join(unknown)}; available: {', '.join(ALL_METRICS)}")
    notes: list[str] = []
    skipped: list[str] = []
    resources: dict[str, str] = {}
    per_pair: dict[str, np.ndarray] = {}
    agg: dict[str, float] = {}
    corrected = ps.mode == "corrected"

    pair_metrics = [m for m in PAIR_METRICS if m in metrics]
    if "meteor" in pair_metrics:
        from pesc.metrics.offline import load_wordnet

        try:
            resources["wordnet"] = load_wordnet().pesc_origin
        except ResourceError as e:
            if on_missing == "error":
                raise
            pair_metrics.remove("meteor")
            skipped.append("meteor")
            notes.append(f"METEOR skipped: {e}")
    # A share of the pairs goes to the worker processes now; Extrema and Distinct are computed here
    # meanwhile, then this process scores its own share (`pending.result()`).
    pending = start_pairs(ps.references, ps.predictions, pair_metrics, workers=workers, progress=progress)

    if "extrema" in metrics:
        try:
            g = load_glove(glove)
            resources["glove"] = g.source
        except ResourceError as e:
            if on_missing == "error":
                raise
            g = None
            skipped.append("extrema")
            notes.append(f"Vector Extrema skipped: {e}")
        if g is not None:
            per_pair["extrema"], info = extrema_scores(ps.predictions, ps.references, g,
                                                       sign_aware=corrected, lowercase=corrected)
            if info["pred_without_glove_word"]:
                notes.append(f"{info['pred_without_glove_word']} prediction(s) have no GloVe word "
                             f"({'lower-cased' if corrected else 'case-sensitive'} lookup): Extrema 0 there")

    if "distinct2" in metrics:
        agg["distinct2"] = distinct_n(ps.predictions, 2)
    if "distinct3" in metrics:
        agg["distinct3"] = distinct_n(ps.predictions, 3)
    per_pair.update(pending.result())
    for m in ("meteor", "bleu4", "rougeL", "extrema"):
        if m in per_pair:
            agg[m] = sequential_mean(per_pair[m])

    judge_info = {"name": None, "failures": 0}
    if judge is not None:
        from pesc.metrics.judge import JudgeItem, build_judge

        if isinstance(judge, str):
            judge = build_judge(judge)
        judge_info["name"] = judge.name
        items = [JudgeItem(i, r, p) for i, r, p in zip(ps.inputs, ps.references, ps.predictions)]
        results = judge.rate(items, progress=progress)
        g_scores = np.array([np.nan if r.score is None else r.score for r in results], dtype=np.float64)
        per_pair["gscore"] = g_scores
        per_pair["_gscore_error"] = np.array([r.error for r in results], dtype=object)
        ok = ~np.isnan(g_scores)
        judge_info["failures"] = int((~ok).sum())
        judge_info["cached"] = int(sum(r.cached for r in results))
        if ok.any():
            agg["gscore"] = sequential_mean(g_scores[ok])
        notes.append(f"G-Score by {judge.name}: {int(ok.sum())} of {len(ps)} responses rated "
                     f"({judge_info['cached']} from the rating cache)")
        if judge_info["failures"]:
            first = next(k for k, r in enumerate(results) if r.score is None)
            what = "G-Score absent" if not ok.any() else "G-Score is the mean of the others"
            notes.append(f"judge failed on {judge_info['failures']} of {len(ps)} responses ({what}); "
                         f"first: dialogue {ps.dialogue_ids[first]} turn {ps.turns[first]}: "
                         f"{results[first].error}")
    return agg, per_pair, notes, skipped, resources, judge_info


def score(predictions: Source, gold: Source, mode: str = "official", judge=None, per_turn: bool = True,
          workers: int | None = None, progress: bool = True, *, glove: str | os.PathLike | None = None,
          on_missing: str = "error") -> ScoreReport:
    """Score a result (path or dialogues) against the gold (path or dialogues).

    mode: "official" reproduces the organisers' script (position pairing, `supporter:` removed
        everywhere, plain-max extrema); "corrected" pairs by dialogue id and turn (errors on any
        mismatch), uses sign-aware extrema with lower-cased GloVe lookup, strips prefixes only.
    judge: None (total reported without G, key `total_no_g`), a `pesc.metrics.judge.Judge`, or a
        spec string ("openai", "openai:MODEL", "hf:PATH").
    workers: processes for METEOR/BLEU/ROUGE, this one included (None: for >= 500 pairs, the
        CPUs not already busy by the load average; worker processes are kept for later calls).
    glove: a glove.6B.50d.txt to use instead of the installed wheel.
    on_missing: "error" raises ResourceError when WordNet or GloVe is missing; "skip" leaves that
        metric (and the total) out with a note.
    """
    _check_mode(mode)
    ps = build_pairs(predictions, gold, mode)
    agg, per_pair, notes, skipped, resources, jinfo = _compute(
        ps, ALL_METRICS, workers=workers, progress=progress, glove=glove, on_missing=on_missing, judge=judge)
    notes = ps.notes + notes
    metrics = {k: agg[k] for k in ("meteor", "bleu4", "rougeL", "extrema", "distinct2", "distinct3", "gscore")
               if k in agg}
    if skipped:
        notes.append(f"no total: {', '.join(skipped)} could not be computed")
    else:
        metrics["total_no_g"] = weighted_total(agg, with_g=False)
        if "gscore" in agg:
            metrics["total"] = weighted_total(agg, with_g=True)
    if "gscore" not in agg and judge is None:
        notes.append("no G-Score judge: the total is reported without G (key total_no_g)")
    records = []
    if per_turn:
        for k in range(len(ps)):
            r = {"dialogue_id": ps.dialogue_ids[k], "turn": ps.turns[k], "input": ps.inputs[k],
                 "reference": ps.references[k], "prediction": ps.predictions[k]}
            if ps.pred_dialogue_ids[k] != ps.dialogue_ids[k]:
                r["pred_dialogue_id"] = ps.pred_dialogue_ids[k]
            for m in ("meteor", "bleu4", "rougeL", "extrema", "gscore"):
                if m in per_pair:
                    v = float(per_pair[m][k])
                    r[m] = None if np.isnan(v) else v
            if "_gscore_error" in per_pair and per_pair["_gscore_error"][k]:
                r["gscore_error"] = per_pair["_gscore_error"][k]
            records.append(r)
    return ScoreReport(mode=mode, metrics=metrics, per_turn=records, notes=notes, n_pairs=len(ps),
                       judge=jinfo["name"], gscore_failures=jinfo["failures"], skipped=skipped,
                       resources=resources)


def score_texts(predictions: Sequence[str], references: Sequence[str],
                metrics: Sequence[str] = ("bleu4", "rougeL"), *, mode: str = "official",
                workers: int | None = None, progress: bool = False,
                glove: str | os.PathLike | None = None) -> dict[str, float]:
    """Aggregate metrics of plain response texts (no role prefixes), e.g. for training evaluation.

    Same code path and numbers as `score()`; `metrics` is any subset of meteor, bleu4, rougeL,
    extrema, distinct2, distinct3 (missing resources raise ResourceError). With all six the result
    also has `total_no_g`.
    """
    _check_mode(mode)
    if isinstance(metrics, str):
        metrics = (metrics,)
    ps = pairs_from_texts(predictions, references, mode=mode)
    if len(ps) == 0:
        raise ConfigError("score_texts needs at least one prediction")
    agg, *_ = _compute(ps, tuple(metrics), workers=workers, progress=progress, glove=glove,
                       on_missing="error")
    out = {m: agg[m] for m in metrics}
    if all(m in agg for m in ALL_METRICS):
        out["total_no_g"] = weighted_total(agg, with_g=False)
    return out
