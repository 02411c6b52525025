"""Read a PESC task file keeping its raw form, and write a result that differs only in supporter turns.

The builder never re-serialises a file from the `Dialogue` model alone: it fills the generated turns
into the parsed original object and writes that with the organisers' layout (indent 4, ASCII
escapes). Ids, their order, the seeker strings and the `character` objects therefore stay exactly
as they were, even where the organisers' file departs from the documented schema (a few profiles
have a number, not a string, as "Age").
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pesc.data.dialogue import SUPPORTER, Dialogue
from pesc.data.pesc_json import parse_pesc, read_json
from pesc.errors import DataError


@dataclass
class TaskFile:
    path: str
    raw: dict  # the parsed JSON, untouched
    dialogues: list[Dialogue]  # the same content as Dialogue objects (profile values as strings)


def _as_text(v) -> str:
    if isinstance(v, str):
        return v
    if v is None:
        return ""
    return json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else str(v)


def load_task(path: str | os.PathLike) -> TaskFile:
    """Load test.json / val.json (or a result) for generation. Raises DataError on a malformed file."""
    path = str(path)
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise DataError(f"top level must be an object keyed by dialogue id, got {type(raw).__name__}", path=path)
    # Profile values reach the model as text; the raw object keeps the original types for writing.
    view = {}
    for did, entry in raw.items():
        if isinstance(entry, dict) and isinstance(entry.get("character"), dict):
            entry = dict(entry, character={k: _as_text(v) for k, v in entry["character"].items()})
        view[did] = entry
    return TaskFile(path, raw, parse_pesc(view, path))


def fill_result(task: TaskFile, dialogues: list[Dialogue]) -> str:
    """The task file's JSON text with each dialogue's supporter turns replaced by `dialogues`' texts.

    A filled turn is written "supporter:" + the separator the original had (none in test.json) +
    the text. Everything else is the original object, in the original order.
    """
    by_id = {d.id: d for d in dialogues}
    missing = [did for did in task.raw if did not in by_id]
    if missing:
        raise DataError(f"no generated turns for {len(missing)} dialogue(s), e.g. {missing[0]}", path=task.path,
                        dialogue_id=missing[0])
    out = copy.deepcopy(task.raw)
    for did, entry in out.items():
        d = by_id[did]
        turns = entry["whole_dialog"]
        for i in d.supporter_indices():
            t = d.turns[i]
            if not t.text.strip():
                raise DataError("generated supporter turn is empty", path=task.path, dialogue_id=did, turn=i)
            turns[i] = f"{SUPPORTER}:{t.sep}{t.text}"
    return json.dumps(out, indent=4)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text through a temporary file and a rename: a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
