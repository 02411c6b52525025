"""ESConv (Liu et al., 2021): emotional support dialogues with a seeker profile and strategies.

Two published forms, one conversion:

- the Hub dataset `thu-coai/esconv` (splits train/validation/test): each row's `text` column is one
  JSON-encoded dialogue `{"emotion_type", "problem_type", "situation", "experience_type",
  "dialog": [{"text", "speaker": "usr"|"sys", "strategy"}]}`; a local directory or file in the same
  layout is read by the same code (`load_esconv`);
- the original `ESConv.json`: a list of dialogues whose turns are `{"speaker": "seeker"|"supporter",
  "content", "annotation": {"strategy"} or {"feedback"}}` (`load_esconv_json`).

Decisions (tested):
- Texts are stripped and inner whitespace runs collapsed to one space; empty turns are dropped.
- One speaker often talks several times in a row. By default such runs are merged into one turn
  (texts joined by a space, the first strategy kept), so every supporter reply is one target and
  roles alternate; `merge=False` keeps the turns as published.
- A dialogue may open with the supporter ("Hello, how are you?"). That turn is kept as history;
  the example builder makes no example of it because no seeker turn precedes it.
- Profile: `emotion_type`, `problem_type`, `situation` under the same keys as PESC's `character`;
  `experience_type` goes to `Dialogue.meta`.
"""

from __future__ import annotations

import os
from pathlib import Path

from pesc.data.dialogue import SEEKER, SUPPORTER, Dialogue, Turn, merge_consecutive
from pesc.data.hub import canonical_split, json_rows, load_text_rows, progress
from pesc.data.pesc_json import read_json
from pesc.errors import DataError

ESCONV_HUB_ID = "thu-coai/esconv"
PROFILE_KEYS = ("emotion_type", "problem_type", "situation")
HUB_SPEAKERS = {"usr": SEEKER, "sys": SUPPORTER}
JSON_SPEAKERS = {"seeker": SEEKER, "supporter": SUPPORTER}


def clean_text(text: str) -> str:
    return " ".join(text.split())


def _profile(obj: dict, where: dict) -> dict[str, str]:
    profile = {}
    for key in PROFILE_KEYS:
        value = obj.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(f"{key!r} must be a string, got {type(value).__name__}", **where)
        if value.strip():
            profile[key] = clean_text(value)
    return profile


def convert_turns(raw_turns, *, speakers: dict, text_key: str, where: dict, merge: bool,
                  strategy_of) -> list[Turn]:
    """Validate and convert a list of turn objects; see the module docstring for the decisions."""
    if not isinstance(raw_turns, list):
        raise DataError("'dialog' must be a list of turns", **where)
    turns = []
    for j, t in enumerate(raw_turns):
        if not isinstance(t, dict):
            raise DataError(f"turn must be an object, got {type(t).__name__}", turn=j, **where)
        speaker = t.get("speaker")
        if speaker not in speakers:
            raise DataError(f"unknown speaker {speaker!r} (expected {' or '.join(map(repr, speakers))})",
                            turn=j, **where)
        if text_key not in t:
            raise DataError(f"missing {text_key!r}", turn=j, **where)
        text = t[text_key]
        if not isinstance(text, str):
            raise DataError(f"turn text must be a string, got {type(text).__name__}", turn=j, **where)
        text = clean_text(text)
        if text:
            turns.append(Turn(speakers[speaker], text, strategy=strategy_of(t)))
    if not any(t.role == SEEKER for t in turns) or not any(t.role == SUPPORTER for t in turns):
        raise DataError("dialogue needs at least one non-empty seeker turn and one supporter turn",
                        **where)
    return merge_consecutive(turns) if merge else turns


def _hub_strategy(t: dict) -> str | None:
    s = t.get("strategy")
    return s if isinstance(s, str) and s else None


def _json_strategy(t: dict) -> str | None:
    ann = t.get("annotation")
    s = ann.get("strategy") if isinstance(ann, dict) else None
    return s if isinstance(s, str) and s else None


def parse_esconv_dialogue(obj, did: str, *, path: str, line: int | None = None, hub_format: bool = True,
                          merge: bool = True) -> Dialogue:
    """One ESConv dialogue object (Hub or original format) -> Dialogue."""
    where = {"path": path, "dialogue_id": did, "line": line}
    if not isinstance(obj, dict):
        raise DataError(f"dialogue must be a JSON object, got {type(obj).__name__}", **where)
    if "dialog" not in obj:
        raise DataError("missing 'dialog'", **where)
    turns = convert_turns(obj["dialog"], speakers=HUB_SPEAKERS if hub_format else JSON_SPEAKERS,
                          text_key="text" if hub_format else "content", where=where, merge=merge,
                          strategy_of=_hub_strategy if hub_format else _json_strategy)
    meta = {}
    if isinstance(obj.get("experience_type"), str):
        meta["experience_type"] = obj["experience_type"]
    return Dialogue(did, turns, _profile(obj, where), "esconv", meta)


def _is_original_json(path: Path) -> bool:
    """An `ESConv.json` (a JSON array) rather than JSON lines with a `text` field."""
    if not path.is_file() or path.suffix.lower() != ".json":
        return False
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def load_esconv(source: str | os.PathLike = ESCONV_HUB_ID, split: str = "train", *, merge: bool = True,
                cache_dir: str | None = None) -> list[Dialogue]:
    """ESConv from the Hub (`thu-coai/esconv` or another id) or from a local directory/file.

    A local `.json` file that holds a JSON array is taken to be the original `ESConv.json`
    (all dialogues, no splits) and read with `load_esconv_json`.
    """
    if _is_original_json(Path(source)):
        return load_esconv_json(source, merge=merge)
    split = canonical_split(split)
    data = load_text_rows(source, split, cache_dir=cache_dir)
    dialogues = [parse_esconv_dialogue(obj, did, path=data.where, line=line, merge=merge)
                 for did, line, obj in json_rows(data, f"esconv-{split}-", "ESConv")]
    if not dialogues:
        raise DataError("no dialogues", path=data.where)
    return dialogues


def load_esconv_json(path: str | os.PathLike, *, merge: bool = True) -> list[Dialogue]:
    """The original `ESConv.json` (a list of dialogues). Ids are `esconv-<index in the list>`."""
    path = str(path)
    obj = read_json(path)
    if not isinstance(obj, list):
        raise DataError(f"ESConv.json must be a JSON array of dialogues, got {type(obj).__name__}",
                        path=path)
    if not obj:
        raise DataError("no dialogues", path=path)
    return [parse_esconv_dialogue(d, f"esconv-{i}", path=path, hub_format=False, merge=merge)
            for i, d in enumerate(progress(obj, "ESConv"))]
