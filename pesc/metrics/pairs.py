"""Turn a result file and a gold file into (input, reference, prediction) pairs.

Official mode reads the raw JSON strings exactly as the organisers' script does: both files are
walked in JSON order, the odd positions of each `whole_dialog` (1, 3, ...) are the responses, their
text is the string with *every* occurrence of `supporter:` removed, and predictions are paired with
references by position in that walk (only the two counts must agree). The input of pair i is the
turn before it with every `seeker:` removed.

Corrected mode pairs by dialogue id and turn index, refuses any mismatch (missing or extra
dialogue, different turn count or role), and strips the role prefix only at the start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence, Union

from pesc.data.dialogue import SEEKER, SUPPORTER, Dialogue
from pesc.errors import DataError

MODES = ("official", "corrected")
Source = Union[str, os.PathLike, Sequence[Dialogue]]


@dataclass
class PairSet:
    mode: str
    dialogue_ids: list[str] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)
    pred_dialogue_ids: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.references)


@dataclass
class _RawDialogue:
    id: str
    turns: list[str]  # raw "role:text" strings as in the file


def _is_path(x) -> bool:
    return isinstance(x, (str, os.PathLike))


def _label(x) -> str:
    return str(x) if _is_path(x) else "<dialogues>"


def _raw_from_file(path) -> list[_RawDialogue]:
    """The raw turn strings of a PESC-format file, with structural checks only (official mode)."""
    from pesc.data.pesc_json import read_json

    path = str(path)
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise DataError(f"top level must be an object keyed by dialogue id, got {type(obj).__name__}",
                        path=path)
    out = []
    for did, entry in obj.items():
        if not isinstance(entry, dict) or "whole_dialog" not in entry:
            raise DataError("entry must be an object with a 'whole_dialog' list", path=path, dialogue_id=did)
        turns = entry["whole_dialog"]
        if not isinstance(turns, list):
            raise DataError("'whole_dialog' must be a list of strings", path=path, dialogue_id=did)
        for i, s in enumerate(turns):
            if not isinstance(s, str):
                raise DataError(f"turn text must be a string, got {type(s).__name__}", path=path,
                                dialogue_id=did, turn=i)
        out.append(_RawDialogue(str(did), list(turns)))
    return out


def _raw_from_dialogues(dialogues: Sequence[Dialogue]) -> list[_RawDialogue]:
    return [_RawDialogue(d.id, [f"{t.role}:{t.sep}{t.text}" for t in d.turns]) for d in dialogues]


def _raw(source) -> list[_RawDialogue]:
    if _is_path(source):
        return _raw_from_file(source)
    if isinstance(source, (list, tuple)) and all(isinstance(d, Dialogue) for d in source):
        return _raw_from_dialogues(source)
    raise TypeError("expected a path to a PESC JSON file or a list of pesc.data.Dialogue")


def _dialogues(source) -> list[Dialogue]:
    if _is_path(source):
        from pesc.data.pesc_json import load_pesc

        return load_pesc(source, expected_turns=None)
    if isinstance(source, (list, tuple)) and all(isinstance(d, Dialogue) for d in source):
        return list(source)
    raise TypeError("expected a path to a PESC JSON file or a list of pesc.data.Dialogue")


def _official(predictions, gold) -> PairSet:
    pred_raw, gold_raw = _raw(predictions), _raw(gold)
    ps = PairSet("official")
    pred_flat = [(d.id, i, s) for d in pred_raw for i, s in enumerate(d.turns) if i % 2 == 1]
    for d in gold_raw:
        for i in range(1, len(d.turns), 2):
            ps.dialogue_ids.append(d.id)
            ps.turns.append(i)
            ps.references.append(d.turns[i].replace("supporter:", ""))
            ps.inputs.append(d.turns[i - 1].replace("seeker:", ""))
    if len(pred_flat) != len(ps.references):
        _raise_count_mismatch(pred_raw, gold_raw, predictions, len(pred_flat), len(ps.references))
    first_other_id, bad_prefix, first_bad = None, 0, None
    for k, (did, i, s) in enumerate(pred_flat):
        ps.predictions.append(s.replace("supporter:", ""))
        ps.pred_dialogue_ids.append(did)
        if first_other_id is None and (did != ps.dialogue_ids[k] or i != ps.turns[k]):
            first_other_id = (k, did, i)
        if not s.startswith("supporter:"):
            bad_prefix += 1
            first_bad = first_bad or (did, i, s[:30])
    if first_other_id is not None:
        k, did, i = first_other_id
        ps.notes.append(f"official mode pairs by position: response {k + 1} is dialogue {did} turn {i} "
                        f"in the result but dialogue {ps.dialogue_ids[k]} turn {ps.turns[k]} in the gold "
                        "(the corrected mode refuses this)")
    if bad_prefix:
        did, i, head = first_bad
        ps.notes.append(f"{bad_prefix} response(s) do not start with 'supporter:' (first: dialogue {did} "
                        f"turn {i}, {head!r}); the organisers' scorer keeps such text as it is")
    return ps


def _raise_count_mismatch(pred_raw, gold_raw, predictions, n_pred, n_gold):
    """Name the first dialogue where the two walks stop lining up."""
    path = _label(predictions)
    for k, g in enumerate(gold_raw):
        if k >= len(pred_raw):
            raise DataError(f"the result has {n_pred} responses, the gold {n_gold}: the result ends before "
                            f"gold dialogue {g.id}", path=path, dialogue_id=g.id)
        p = pred_raw[k]
        if len(p.turns) != len(g.turns):
            turn = min(len(p.turns), len(g.turns))
            raise DataError(f"the result has {n_pred} responses, the gold {n_gold}: this dialogue has "
                            f"{len(p.turns)} turns, the gold's dialogue {g.id} has {len(g.turns)}",
                            path=path, dialogue_id=p.id, turn=turn)
    extra = pred_raw[len(gold_raw)]
    raise DataError(f"the result has {n_pred} responses, the gold {n_gold}: dialogue {extra.id} and any "
                    "after it are not in the gold", path=path, dialogue_id=extra.id)


def _corrected(predictions, gold) -> PairSet:
    pred, ref = _dialogues(predictions), _dialogues(gold)
    path = _label(predictions)
    ps = PairSet("corrected")
    by_id: dict[str, Dialogue] = {}
    for d in pred:
        if d.id in by_id:
            raise DataError("dialogue id appears twice in the result", path=path, dialogue_id=d.id)
        by_id[d.id] = d
    gold_ids = {d.id for d in ref}
    extra = [d.id for d in pred if d.id not in gold_ids]
    if extra:
        raise DataError(f"dialogue is not in the gold ({len(extra)} such dialogues)", path=path,
                        dialogue_id=extra[0])
    changed_seeker = []
    for g in ref:
        p = by_id.get(g.id)
        if p is None:
            raise DataError("the gold's dialogue is missing from the result", path=path, dialogue_id=g.id)
        if len(p.turns) != len(g.turns):
            raise DataError(f"{len(p.turns)} turns, the gold has {len(g.turns)}", path=path,
                            dialogue_id=g.id, turn=min(len(p.turns), len(g.turns)))
        last_input = ""
        for i, (pt, gt) in enumerate(zip(p.turns, g.turns)):
            if pt.role != gt.role:
                raise DataError(f"a {pt.role} turn where the gold has a {gt.role} turn", path=path,
                                dialogue_id=g.id, turn=i)
            if gt.role == SEEKER:
                last_input = gt.text
                if pt.text != gt.text:
                    changed_seeker.append((g.id, i))
            elif gt.role == SUPPORTER:
                ps.dialogue_ids.append(g.id)
                ps.pred_dialogue_ids.append(p.id)
                ps.turns.append(i)
                ps.inputs.append(last_input)
                ps.references.append(gt.text)
                ps.predictions.append(pt.text)
    if changed_seeker:
        did, i = changed_seeker[0]
        ps.notes.append(f"{len(changed_seeker)} seeker turn(s) differ from the gold (first: dialogue {did} "
                        f"turn {i}); only supporter turns should change")
    return ps


def build_pairs(predictions: Source, gold: Source, mode: str = "official") -> PairSet:
    if mode not in MODES:
        from pesc.errors import ConfigError

        raise ConfigError(f"unknown scoring mode {mode!r}; choose one of {', '.join(MODES)}")
    ps = _official(predictions, gold) if mode == "official" else _corrected(predictions, gold)
    if len(ps) == 0:
        raise DataError("the gold has no supporter responses to score", path=_label(gold))
    blank_refs = sum(1 for r in ps.references if not r.strip())
    if blank_refs == len(ps):
        raise DataError("every supporter response in the gold is blank ('supporter:'): this looks like "
                        "test.json, which has no references; score against a file with gold responses "
                        "(e.g. val.json)", path=_label(gold))
    if blank_refs:
        ps.notes.append(f"{blank_refs} gold response(s) are blank")
    blank_preds = sum(1 for p in ps.predictions if not p.strip())
    if blank_preds:
        k = next(j for j, p in enumerate(ps.predictions) if not p.strip())
        ps.notes.append(f"{blank_preds} of {len(ps)} predicted responses are empty (first: dialogue "
                        f"{ps.pred_dialogue_ids[k]} turn {ps.turns[k]}); they score 0")
    return ps


def pairs_from_texts(predictions: Sequence[str], references: Sequence[str],
                     inputs: Sequence[str] | None = None, mode: str = "official") -> PairSet:
    """Pairs from plain text lists (already stripped of role prefixes)."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise DataError(f"{len(predictions)} predictions but {len(references)} references")
    for name, xs in (("prediction", predictions), ("reference", references)):
        for k, x in enumerate(xs):
            if not isinstance(x, str):
                raise DataError(f"{name} {k} must be a string, got {type(x).__name__}")
    n = len(predictions)
    inputs = list(inputs) if inputs is not None else [""] * n
    if len(inputs) != n:
        raise DataError(f"{len(inputs)} inputs for {n} predictions")
    return PairSet(mode, [str(k) for k in range(n)], list(range(n)), inputs, references, predictions,
                   [str(k) for k in range(n)])
