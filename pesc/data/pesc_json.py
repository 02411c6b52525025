"""PESC task files (`train/val/test.json`): id -> {"whole_dialog": [...], "character": {...}}.

Text is kept exactly: the separator after the role prefix (sometimes a space) is remembered, so
`dump_pesc(load_pesc(path))` is byte-identical to the organisers' file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pesc.data.dialogue import ROLES, SEEKER, SUPPORTER, Dialogue, Turn
from pesc.errors import DataError

TURNS_PER_DIALOGUE = 20
# Dialogue.meta key holding the character fields that were numbers in the file (kept for dumping).
RAW_NUMBERS = "pesc_numeric_character"


def read_json(path: str | os.PathLike, text: str | None = None):
    """Parse a JSON file; a syntax error becomes a DataError naming the file and line."""
    path = str(path)
    try:
        if text is None:
            with open(path, "rb") as f:
                raw = f.read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                line = raw[: e.start].count(b"\n") + 1
                raise DataError(f"not valid UTF-8 (byte {e.start})", path=path, line=line) from None
        if not text.strip():
            raise DataError("empty file", path=path)
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", path=path, line=e.lineno) from None
    except FileNotFoundError:
        raise DataError("file not found", path=path) from None
    except IsADirectoryError:
        raise DataError("is a directory, expected a JSON file", path=path) from None
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", path=path) from None
    except RecursionError:
        raise DataError("JSON nested too deeply", path=path) from None


def parse_turn(s, *, path: str, dialogue_id: str, index: int, expected_role: str | None) -> Turn:
    if not isinstance(s, str):
        raise DataError(f"turn text must be a string, got {type(s).__name__}", path=path,
                        dialogue_id=dialogue_id, turn=index)
    role, colon, rest = s.partition(":")
    if not colon or role not in ROLES:
        raise DataError(f"turn must start with 'seeker:' or 'supporter:', got {s[:30]!r}",
                        path=path, dialogue_id=dialogue_id, turn=index)
    if expected_role is not None and role != expected_role:
        raise DataError(f"expected a {expected_role} turn (roles alternate, seeker first), got {role}",
                        path=path, dialogue_id=dialogue_id, turn=index)
    body = rest.lstrip(" ")
    return Turn(role, body, sep=rest[: len(rest) - len(body)])


def parse_pesc(obj, path: str = "<memory>", *, expected_turns: int | None = TURNS_PER_DIALOGUE,
               source: str = "pesc") -> list[Dialogue]:
    """Validate and convert a parsed PESC object. Raises DataError on the first problem."""
    if not isinstance(obj, dict):
        raise DataError(f"top level must be an object keyed by dialogue id, got {type(obj).__name__}",
                        path=path)
    dialogues = []
    for did, entry in obj.items():
        if not isinstance(entry, dict):
            raise DataError("entry must be an object with 'whole_dialog' and 'character'", path=path,
                            dialogue_id=did)
        for key in ("whole_dialog", "character"):
            if key not in entry:
                raise DataError(f"missing '{key}'", path=path, dialogue_id=did)
        turns_raw, character = entry["whole_dialog"], entry["character"]
        if not isinstance(turns_raw, list):
            raise DataError("'whole_dialog' must be a list of strings", path=path, dialogue_id=did)
        if not isinstance(character, dict):
            raise DataError("'character' must be an object", path=path, dialogue_id=did)
        profile, raw_numbers = {}, {}
        for k, v in character.items():
            # The organisers' files hold a few numbers (e.g. "Age": 58): the profile gets the
            # string, the original value is remembered so the file is written back unchanged.
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                profile[k], raw_numbers[k] = str(v), v
            elif isinstance(v, str):
                profile[k] = v
            else:
                raise DataError(f"character field {k!r} must be a string or a number, got "
                                f"{type(v).__name__}", path=path, dialogue_id=did)
        if expected_turns is not None and len(turns_raw) != expected_turns:
            raise DataError(f"expected {expected_turns} turns, found {len(turns_raw)}", path=path,
                            dialogue_id=did)
        turns = [parse_turn(s, path=path, dialogue_id=did, index=i,
                            expected_role=SEEKER if i % 2 == 0 else SUPPORTER)
                 for i, s in enumerate(turns_raw)]
        meta = {RAW_NUMBERS: raw_numbers} if raw_numbers else {}
        dialogues.append(Dialogue(str(did), turns, profile, source, meta))
    return dialogues


def load_pesc(path: str | os.PathLike, *, expected_turns: int | None = TURNS_PER_DIALOGUE) -> list[Dialogue]:
    """Load a PESC file (train/val/test.json or a result.json)."""
    dialogues = parse_pesc(read_json(path), str(path), expected_turns=expected_turns)
    if not dialogues:
        raise DataError("no dialogues in file", path=str(path))
    return dialogues


def _character_obj(d: Dialogue) -> dict:
    raw = d.meta.get(RAW_NUMBERS) or {}
    # A number read from the file is written back as that number unless the profile changed it.
    return {k: raw[k] if k in raw and str(raw[k]) == v else v for k, v in d.profile.items()}


def to_pesc_obj(dialogues: list[Dialogue]) -> dict:
    out = {}
    for d in dialogues:
        out[d.id] = {
            "whole_dialog": [f"{t.role}:{t.sep}{t.text}" for t in d.turns],
            "character": _character_obj(d),
        }
    return out


def dumps_pesc(dialogues: list[Dialogue]) -> str:
    """Serialise exactly as the organisers' files are written (indent 4, ASCII escapes)."""
    return json.dumps(to_pesc_obj(dialogues), indent=4)


def dump_pesc(dialogues: list[Dialogue], path: str | os.PathLike) -> None:
    """Write atomically: a failure leaves any previous file untouched."""
    path = Path(path)
    text = dumps_pesc(dialogues)  # serialise first: an error here leaves the disk untouched
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
