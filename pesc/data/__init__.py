"""The data layer: one dialogue model, one loader per source, one dispatcher, the example builder.

    from pesc.data import load_dialogues, split_dialogues, build_examples
    dialogues = load_dialogues("pesc:../shared/data/pesc", split="validation")
    train, held_out = split_dialogues(dialogues, 0.2, seed=0)

Importing `pesc.data` is light: `datasets` is imported only by the Hub loaders and torch only when
`build_examples`/`collate` are first used.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pesc.data.augesc import AUGESC_HUB_ID, load_augesc
from pesc.data.dialogue import (PROFILE_FIELDS, ROLES, SEEKER, SUPPORTER, Dialogue, Turn,
                                merge_consecutive, profile_block)
from pesc.data.empathetic import EmpatheticReport, load_empathetic, read_empathetic
from pesc.data.esconv import ESCONV_HUB_ID, load_esconv, load_esconv_json
from pesc.data.hub import canonical_split, find_split_file
from pesc.data.pesc_json import dump_pesc, dumps_pesc, load_pesc, parse_pesc, read_json
from pesc.errors import ConfigError, DataError

__all__ = [
    "Dialogue", "Turn", "SEEKER", "SUPPORTER", "ROLES", "PROFILE_FIELDS", "merge_consecutive",
    "profile_block", "load_dialogues", "split_dialogues", "load_pesc", "parse_pesc", "dump_pesc",
    "dumps_pesc", "read_json", "load_esconv", "load_esconv_json", "load_augesc", "load_empathetic",
    "read_empathetic", "EmpatheticReport", "ESCONV_HUB_ID", "AUGESC_HUB_ID", "build_examples",
    "collate", "render_prompt", "render_target", "fit_prompt", "Example", "IGNORE_INDEX",
    "SPEC_HELP",
]

_EXAMPLE_NAMES = {"build_examples", "collate", "render_prompt", "render_target", "fit_prompt",
                  "Example", "IGNORE_INDEX", "has_chat_template", "end_token_id"}

SPEC_HELP = (
    "data spec: pesc:PATH (PESC JSON file, or a directory with train.json/val.json/test.json; a "
    "bare PATH works too), esconv[:DIR|FILE|HUB_ID] (default thu-coai/esconv), esconv-json:PATH "
    "(original ESConv.json), augesc[:DIR|FILE|HUB_ID] (default thu-coai/augesc, train only), "
    "empathetic:PATH (EmpatheticDialogues CSV or a directory with train/valid/test.csv)"
)


def __getattr__(name):  # lazy re-export of the torch-using example builder
    if name in _EXAMPLE_NAMES:
        from pesc.data import examples

        return getattr(examples, name)
    raise AttributeError(f"module 'pesc.data' has no attribute {name!r}")


def _load_pesc_spec(path: str, split: str) -> list[Dialogue]:
    p = Path(path)
    if p.is_dir():
        p = find_split_file(p, split, (".json",))
    return load_pesc(p)


_SOURCES = {
    "pesc": lambda arg, split, **kw: _load_pesc_spec(arg, split),
    "esconv": lambda arg, split, **kw: load_esconv(arg or ESCONV_HUB_ID, split, **kw),
    "esconv-json": lambda arg, split, merge, cache_dir: load_esconv_json(arg, merge=merge),
    "augesc": lambda arg, split, **kw: load_augesc(arg or AUGESC_HUB_ID, split, **kw),
    "empathetic": lambda arg, split, **kw: load_empathetic(arg, split),
}
_NEEDS_PATH = {"pesc", "esconv-json", "empathetic"}


def load_dialogues(spec: str | os.PathLike, split: str = "train", *, merge: bool = True,
                   cache_dir: str | None = None) -> list[Dialogue]:
    """Load dialogues from any supported source, named by one spec string.

    Grammar (`SOURCE` is a local directory, a local file, or a Hub dataset id `owner/name`)::

        pesc:PATH             PESC task file (train/val/test.json or a result.json), or a directory
                              holding <split>.json (train.json, val.json, test.json)
        PATH                  the same, when PATH is an existing .json file or directory
        esconv                Hub dataset thu-coai/esconv
        esconv:SOURCE         ESConv in the Hub layout: a directory with train/valid/test files
                              (.txt one JSON dialogue per line, .jsonl with a `text` field, or
                              .parquet), one such file, or a Hub id; a local .json holding a JSON
                              array is read as the original ESConv.json
        esconv-json:PATH      the original ESConv.json (all 1,300 dialogues; `split` is ignored)
        augesc                Hub dataset thu-coai/augesc (train split only)
        augesc:SOURCE         AugESC from a local directory/file or another Hub id
        empathetic:PATH       EmpatheticDialogues CSV file, or the release directory holding
                              train.csv, valid.csv, test.csv

    `split` is `train`, `validation` (also `val`, `valid`, `dev`) or `test`; it picks the file in a
    directory or the Hub split and is ignored for a single file. `merge` merges consecutive turns by
    one speaker (ESConv, AugESC). `cache_dir` is passed to `datasets.load_dataset`.

    Raises DataError (bad or missing data, naming file, dialogue and turn) or ConfigError (bad spec).
    """
    spec = os.fspath(spec)
    if not spec:
        raise ConfigError(f"empty data spec; {SPEC_HELP}")
    canonical_split(split)  # reject an unknown split name early
    name, colon, arg = spec.partition(":")
    if not colon and name in _SOURCES:
        arg = ""
    elif name not in _SOURCES:  # a bare path (also covers "C:\..." and paths containing ':')
        p = Path(spec)
        if p.is_dir() or (p.suffix.lower() == ".json" and p.is_file()):
            name, arg = "pesc", spec
        elif p.suffix.lower() == ".json":
            raise DataError("file not found", path=spec)
        else:
            raise ConfigError(f"unknown data source {spec!r}; {SPEC_HELP}")
    if name in _NEEDS_PATH and not arg:
        raise ConfigError(f"data source {name!r} needs a path ({name}:PATH); {SPEC_HELP}")
    return _SOURCES[name](arg, split, merge=merge, cache_dir=cache_dir)


def _rank(seed: int, dialogue_id: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{dialogue_id}".encode("utf-8")).digest()


def split_dialogues(dialogues: list[Dialogue], holdout: float | int = 0.2,
                    seed: int = 0) -> tuple[list[Dialogue], list[Dialogue]]:
    """Split into (kept, held out), deterministically by dialogue id.

    `holdout` is a fraction in (0, 1) (rounded, at least one dialogue) or a number of dialogues.
    Each dialogue's side depends only on its id and `seed`, not on the input order, and a larger
    hold-out contains a smaller one. Both parts keep the input order.
    """
    n_total = len(dialogues)
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)):
        raise ConfigError(f"holdout must be a fraction or a count, got {holdout!r}")
    if isinstance(holdout, float):
        if not 0.0 < holdout < 1.0:
            raise ConfigError(f"holdout fraction must be between 0 and 1, got {holdout}")
        n = max(1, round(holdout * n_total)) if n_total else 0
    else:
        n = holdout
    if not 0 <= n <= n_total:
        raise ConfigError(f"cannot hold out {n} of {n_total} dialogues")
    order = sorted(range(n_total), key=lambda i: (_rank(seed, dialogues[i].id), i))
    held = set(order[:n])
    return ([d for i, d in enumerate(dialogues) if i not in held],
            [d for i, d in enumerate(dialogues) if i in held])
