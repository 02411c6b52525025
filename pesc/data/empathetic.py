"""EmpatheticDialogues (Rashkin et al., 2019), read from the original CSV files.

The release holds `train.csv`, `valid.csv` and `test.csv` with the header
`conv_id,utterance_idx,context,prompt,speaker_idx,utterance,selfeval,tags`. Commas inside text are
written as `_comma_`, so a line is split on plain commas (the `csv` module would misread the stray
quotes in some utterances). The Hub copy (`facebook/empathetic_dialogues`) is a loading script that
`datasets` 4+ refuses, so the files are read directly.

Decisions:
- Some rows have more than eight fields: the first eight are kept and each such row is counted; the
  count (and the first line numbers) is logged as a warning and returned by `read_empathetic`.
- Odd `utterance_idx` is the speaker (role `seeker`), even the listener (`supporter`). Turns are
  ordered by `utterance_idx`; a gap would put one role twice in a row, and such turns are merged.
- Profile: `context` -> `emotion_type`, `prompt` -> `situation` (PESC `character` keys).
- A conversation with no seeker or no supporter turn is skipped and counted.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from pesc.data.dialogue import SEEKER, SUPPORTER, Dialogue, Turn, merge_consecutive
from pesc.data.hub import find_split_file, progress
from pesc.errors import DataError

logger = logging.getLogger("pesc.data")

HEADER = ("conv_id", "utterance_idx", "context", "prompt", "speaker_idx", "utterance", "selfeval", "tags")
MIN_FIELDS = 6  # conv_id .. utterance; selfeval and tags may be missing


def unescape(text: str) -> str:
    return " ".join(text.replace("_comma_", ",").split())


@dataclass
class EmpatheticReport:
    """What `read_empathetic` saw besides the dialogues."""
    path: str
    rows: int = 0
    dialogues: int = 0
    extra_field_rows: int = 0  # rows with more than eight fields (first eight kept)
    extra_field_lines: list[int] = field(default_factory=list)  # their line numbers (first 20)
    skipped: int = 0  # conversations without both a seeker and a supporter turn

    def warning(self) -> str | None:
        if not self.extra_field_rows:
            return None
        lines = ", ".join(map(str, self.extra_field_lines))
        more = ", ..." if self.extra_field_rows > len(self.extra_field_lines) else ""
        return (f"{self.path}: {self.extra_field_rows} row(s) had more than {len(HEADER)} fields; "
                f"kept the first {len(HEADER)} (lines {lines}{more})")


def resolve_path(path: str | os.PathLike, split: str) -> Path:
    """A CSV file as given, or `<split>.csv` (train/valid/test) inside a directory."""
    p = Path(path)
    if p.is_dir():
        return find_split_file(p, split, (".csv",))
    if not p.is_file():
        raise DataError("file not found", path=str(p))
    return p


def read_empathetic(path: str | os.PathLike, split: str = "train") -> tuple[list[Dialogue], EmpatheticReport]:
    """Dialogues and a report from an EmpatheticDialogues CSV file (or a directory of them)."""
    p = resolve_path(path, split)
    where = str(p)
    report = EmpatheticReport(where)
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 (byte {e.start})", path=where) from None
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", path=where) from None
    lines = text.splitlines()
    if not text.strip():
        raise DataError("empty file", path=where)
    header = tuple(lines[0].lstrip("\ufeff").strip().split(","))
    if header[:MIN_FIELDS] != HEADER[:MIN_FIELDS]:
        raise DataError(f"not an EmpatheticDialogues CSV: the header must be {','.join(HEADER)}",
                        path=where, line=1)

    # conv_id -> (profile, [(utterance_idx, line, text)]), in order of first appearance
    convs: dict[str, tuple[dict, list]] = {}
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        parts = line.split(",")
        if len(parts) < MIN_FIELDS:
            raise DataError(f"expected {len(HEADER)} comma-separated fields, found {len(parts)}",
                            path=where, line=n)
        if len(parts) > len(HEADER):
            report.extra_field_rows += 1
            if len(report.extra_field_lines) < 20:
                report.extra_field_lines.append(n)
        conv_id, idx, context, prompt, _speaker, utterance = parts[:MIN_FIELDS]
        if not conv_id:
            raise DataError("empty conv_id", path=where, line=n)
        try:
            idx = int(idx)
        except ValueError:
            raise DataError(f"utterance_idx must be an integer, got {idx!r}", path=where, line=n,
                            dialogue_id=conv_id) from None
        if idx < 1:
            raise DataError(f"utterance_idx must be 1 or more, got {idx}", path=where, line=n,
                            dialogue_id=conv_id)
        report.rows += 1
        profile = {"emotion_type": unescape(context), "situation": unescape(prompt)}
        convs.setdefault(conv_id, ({k: v for k, v in profile.items() if v}, []))[1].append(
            (idx, n, unescape(utterance)))
    if not report.rows:
        raise DataError("no rows after the header", path=where)

    dialogues = []
    for conv_id, (profile, utts) in progress(list(convs.items()), "EmpatheticDialogues"):
        utts.sort()
        for (a, _, _), (b, n, _) in zip(utts, utts[1:]):
            if a == b:
                raise DataError(f"utterance_idx {b} appears twice", path=where, line=n,
                                dialogue_id=conv_id, turn=b)
        turns = merge_consecutive([Turn(SEEKER if idx % 2 else SUPPORTER, t) for idx, _, t in utts if t])
        if not any(t.role == SEEKER for t in turns) or not any(t.role == SUPPORTER for t in turns):
            report.skipped += 1
            continue
        dialogues.append(Dialogue(conv_id, turns, profile, "empathetic", {}))
    report.dialogues = len(dialogues)
    if not dialogues:
        raise DataError("no conversation has both a speaker and a listener turn", path=where)
    return dialogues, report


def load_empathetic(path: str | os.PathLike, split: str = "train") -> list[Dialogue]:
    """Dialogues from an EmpatheticDialogues CSV; rows with extra fields are logged as a warning."""
    dialogues, report = read_empathetic(path, split)
    msg = report.warning()
    if msg:
        logger.warning(msg)
    return dialogues
