"""Rows of a `text` column from a Hub dataset or a local file, read with `datasets.load_dataset`.

ESConv (`thu-coai/esconv`) and AugESC (`thu-coai/augesc`) are published as text files with one
JSON-encoded dialogue per line; `datasets` exposes each line as the `text` column. A local copy in
any format `datasets` reads goes through the same code:

- a directory holding one file per split (`train.*`, `valid.*`/`validation.*`/`val.*`/`dev.*`,
  `test.*`; extensions `.txt`, `.jsonl`, `.json` (JSON lines), `.parquet`),
- a single such file, which is then the requested split.

Errors become `DataError`s naming the file (or Hub id) and the line.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from pesc.errors import ConfigError, DataError

# Canonical split name -> accepted spellings (also the file stems looked for in a directory).
SPLIT_ALIASES = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
PROGRESS_MIN = 2000  # show a progress bar when converting at least this many dialogues
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def canonical_split(split: str) -> str:
    """`val`, `valid`, `dev` -> `validation`; unknown names raise ConfigError."""
    for name, aliases in SPLIT_ALIASES.items():
        if split in aliases:
            return name
    raise ConfigError(f"unknown split {split!r}; use one of train, validation (val), test")


def find_split_file(directory: Path, split: str, extensions) -> Path:
    """The file for `split` in `directory` (`train.txt`, `valid.jsonl`, `test.csv`, ...)."""
    name = canonical_split(split)
    found = [directory / f"{stem}{ext}" for stem in SPLIT_ALIASES[name] for ext in extensions
             if (directory / f"{stem}{ext}").is_file()]
    if not found:
        wanted = ", ".join(f"{s}{e}" for s in SPLIT_ALIASES[name] for e in extensions)
        raise DataError(f"no file for split {name!r} in this directory (looked for {wanted})",
                        path=str(directory))
    return found[0]


@dataclass
class TextRows:
    """The `text` values of one split; `lines[i]` is row i's line in the file (None if unknown)."""
    where: str  # the file path or Hub id, for messages
    rows: list
    lines: list

    def line(self, i: int) -> int | None:
        return self.lines[i] if self.lines else None


def _jsonl_line_numbers(path: Path) -> list[int]:
    """Check a JSON-lines file line by line (so a syntax error has its line); return row lines."""
    lines = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError("not valid UTF-8", path=str(path), line=n) from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", path=str(path),
                                line=n) from None
            if not isinstance(obj, dict) or "text" not in obj:
                raise DataError("each line must be a JSON object with a 'text' field", path=str(path),
                                line=n)
            lines.append(n)
    return lines


def _load_local_file(path: Path, split: str, cache_dir) -> TextRows:
    import datasets

    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"unsupported file type {path.suffix!r} (expected one of "
                        f"{', '.join(BUILDERS)})", path=str(path))
    if path.stat().st_size == 0:
        raise DataError("empty file", path=str(path))
    if builder == "json":
        lines = _jsonl_line_numbers(path)
    elif builder == "text":
        lines = None  # every line is a row, blank ones included: row i is line i + 1
    else:
        lines = []
    try:
        ds = datasets.load_dataset(builder, data_files={split: str(path)}, split=split,
                                   cache_dir=cache_dir)
    except Exception as e:  # datasets wraps parser errors in several exception types
        raise DataError(f"cannot read with datasets: {_reason(e)}", path=str(path)) from None
    rows = _text_column(ds, str(path))
    if lines is None:
        lines = list(range(1, len(rows) + 1))
    elif len(lines) != len(rows):  # datasets read the file differently than line by line
        lines = []
    return TextRows(str(path), rows, lines)


def _reason(e: BaseException) -> str:
    while e.__cause__ is not None and not str(e):
        e = e.__cause__
    cause = e.__cause__
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if cause is not None and str(cause):
        msg += f" ({str(cause).splitlines()[0]})"
    return msg


def _text_column(ds, where: str) -> list:
    if "text" not in ds.column_names:
        raise DataError(f"no 'text' column (columns: {', '.join(ds.column_names)})", path=where)
    return list(ds["text"])


def load_text_rows(source: str | os.PathLike, split: str, *, cache_dir: str | None = None,
                   extensions=(".txt", ".jsonl", ".json", ".parquet")) -> TextRows:
    """The `text` column of `split` from a local directory/file or, if no such path exists, a Hub id."""
    split = canonical_split(split)
    path = Path(source)
    if path.is_dir():
        return _load_local_file(find_split_file(path, split, extensions), split, cache_dir)
    if path.is_file():
        return _load_local_file(path, split, cache_dir)
    source = str(source)
    if not HUB_ID.fullmatch(source) or Path(source).suffix.lower() in BUILDERS:
        raise DataError("no such file or directory, and not a Hub dataset id (owner/name)", path=source)
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    except ValueError as e:
        if "split" in str(e).lower():
            raise ConfigError(f"{source}: {_reason(e)}") from None
        raise DataError(f"cannot load the Hub dataset: {_reason(e)}", path=source) from None
    except Exception as e:
        raise DataError(f"cannot load the Hub dataset: {_reason(e)}", path=source) from None
    rows = _text_column(ds, source)
    return TextRows(f"{source} ({split})", rows, list(range(1, len(rows) + 1)))


def progress(items, desc: str):
    """A tqdm bar over dialogues, shown only for large inputs."""
    return tqdm(items, desc=desc, unit="dialogue", disable=True if len(items) < PROGRESS_MIN else None)


def json_rows(data: TextRows, id_prefix: str, desc: str):
    """Yield `(dialogue id, line, parsed JSON)` for each non-blank row; ids are `<prefix><row>`."""
    for i, text in enumerate(progress(data.rows, desc)):
        did, line = f"{id_prefix}{i}", data.line(i)
        if not isinstance(text, str):
            raise DataError(f"'text' must be a string, got {type(text).__name__}", path=data.where,
                            dialogue_id=did, line=line)
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"'text' is not valid JSON: {e.msg} (column {e.colno})", path=data.where,
                            dialogue_id=did, line=line) from None
        yield did, line, obj
