"""The leaderboard's bridge to the project's scorer and pre-flight check (it never scores itself).

`GoldSet` holds the server's reference file; `preflight` runs `submission.check`; `score_result`
runs `pesc.metrics.score` in official and corrected mode plus the gaming flags, and returns the
plain dict the database stores.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import tempfile
from dataclasses import replace
from pathlib import Path

from pesc.data.dialogue import SUPPORTER, Dialogue
from pesc.data.pesc_json import dumps_pesc, load_pesc
from pesc.errors import DataError, PescError
from submission.check import Problem

OFFICIAL_METRICS = ("meteor", "bleu4", "rougeL", "extrema", "distinct2", "distinct3", "gscore")
TURN_METRICS = ("meteor", "bleu4", "rougeL", "extrema")
BASELINES = ("echo", "random", "generic", "gold")


class GoldSet:
    """The reference file: dialogues, raw object, hash, and the blanked "test" view of it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError("gold file not found", path=str(self.path))
        raw = self.path.read_bytes()
        self.sha = hashlib.sha256(raw).hexdigest()
        self.obj = json.loads(raw.decode("utf-8"))
        self.dialogues: list[Dialogue] = load_pesc(self.path)
        for d in self.dialogues:
            for i in d.supporter_indices():
                if not d.turns[i].text.strip():
                    raise DataError("the gold file has an empty supporter turn; the server needs the "
                                    "filled references (e.g. val.json), not a blank test file",
                                    path=str(self.path), dialogue_id=d.id, turn=i)
        self.by_id = {d.id: d for d in self.dialogues}

    @property
    def n_turns(self) -> int:
        return sum(len(d.supporter_indices()) for d in self.dialogues)

    def test_obj(self) -> dict:
        """The gold with every supporter turn blanked: what the pre-flight check compares to."""
        out = copy.deepcopy(self.obj)
        for entry in out.values():
            entry["whole_dialog"] = [s if not s.startswith(SUPPORTER + ":") else SUPPORTER + ":"
                                     for s in entry["whole_dialog"]]
        return out

    def profiles(self) -> dict[str, dict]:
        return {d.id: dict(d.profile) for d in self.dialogues}


def preflight(result: dict, gold: GoldSet, max_reply_chars: int) -> list[Problem]:
    """All pre-flight problems of `result` against the blanked gold (empty list: it passes)."""
    from submission.check import check_result

    report = check_result(result, gold.test_obj(), max_reply_chars=max_reply_chars)
    if report.ok:
        return []
    return [replace(p, dialogue_id=None if p.dialogue_id is None else str(p.dialogue_id))
            for p in report.problems]


def _clean(x):
    """JSON-safe floats (NaN/inf become None) through nested containers."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return _clean(x.item())
    return x


def turn_score(rec: dict) -> float | None:
    """One number per turn for sorting: the per-turn part of the official total, renormalised
    (0.2 METEOR + 0.2 BLEU-4 + 0.2 ROUGE-L + 0.1 Extrema) / 0.7. Distinct and G are corpus-level."""
    vals = [rec.get(k) for k in TURN_METRICS]
    if any(v is None for v in vals):
        return None
    from pesc.metrics import WEIGHTS

    w = [WEIGHTS[k] for k in TURN_METRICS]
    return sum(wk * v for wk, v in zip(w, vals)) / sum(w)


def scorer_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"pesc {version('pesc')}"
    except PackageNotFoundError:  # pragma: no cover - running from a plain checkout
        return "pesc"


def warm_up() -> None:
    """Load the scorer's resources (WordNet, GloVe, the stemmer) once, in this thread."""
    from pesc.metrics import score_texts
    from pesc.metrics.scorer import ALL_METRICS

    score_texts(["I am here for you ."], ["I am here with you ."], metrics=ALL_METRICS, workers=1)


def score_result(result: bytes, gold: GoldSet, *, judge=None, workers: int | None = 1,
                 progress=None) -> dict:
    """Score a checked result.json (its bytes) in official and corrected mode.

    The result is handed to the scorer as a file, so the official mode reads the raw strings exactly
    as the organisers' script does. Returns the dict `Store.add_submission` stores.
    """
    from pesc.metrics import score
    from pesc.metrics.flags import gaming_flags

    def step(frac, msg):
        if progress is not None:
            progress(frac, msg)

    data = bytes(result)
    with tempfile.TemporaryDirectory(prefix="pesc-lb-") as tmp:
        path = Path(tmp) / "result.json"
        path.write_bytes(data.removeprefix(b"\xef\xbb\xbf"))
        step(0.05, "scoring (official mode)")
        official = score(str(path), str(gold.path), mode="official", judge=judge, per_turn=True,
                         workers=workers, progress=False)
        step(0.6, "scoring (corrected mode)")
        notes = list(official.notes)
        try:
            corrected = score(str(path), str(gold.path), mode="corrected", judge=None,
                              per_turn=False, workers=workers, progress=False)
            corrected_metrics = dict(corrected.metrics)
            notes += [f"corrected mode: {n}" for n in corrected.notes
                      if n not in official.notes and not n.startswith("no G-Score judge")]
        except PescError as e:
            corrected_metrics = {}
            notes.append(f"corrected mode not computed: {e}")
        step(0.9, "checking for gaming patterns")
        preds = load_pesc(path, expected_turns=None)
    flags = [{"code": f.code, "message": f.message, "severity": f.severity}
             for f in gaming_flags(preds, gold.dialogues)]
    om = official.metrics
    per_turn = []
    for r in official.per_turn:
        rec = {"dialogue_id": str(r["dialogue_id"]), "turn": r["turn"], "seeker": r.get("input"),
               "reference": r.get("reference"), "prediction": r.get("prediction")}
        for k in TURN_METRICS:
            rec[k] = r.get(k)
        rec["turn_score"] = turn_score(rec)
        per_turn.append(rec)
    return _clean({
        "gold_sha": gold.sha,
        "scorer_version": scorer_version(),
        "official": {k: om[k] for k in OFFICIAL_METRICS if k in om},
        "corrected": {k: corrected_metrics[k] for k in OFFICIAL_METRICS if k in corrected_metrics},
        "total": om.get("total_no_g"),
        "total_g": om.get("total"),
        "corrected_total": corrected_metrics.get("total_no_g"),
        "per_turn": per_turn,
        "flags": flags,
        "notes": notes,
    })


def baseline_result(name: str, gold: GoldSet) -> bytes:
    """A sanity baseline (pesc.metrics.baselines) as the bytes of its result.json."""
    from pesc.metrics.baselines import make_baseline

    return dumps_pesc(make_baseline(name, gold.dialogues)).encode("utf-8")
