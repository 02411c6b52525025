"""Shared helpers of the leaderboard tests: small limits, fixture paths, the malformed-upload corpus.

Everything is built in the test's tmp directory from the hand-written fixtures under
tests/fixtures/leaderboard/.
"""

from __future__ import annotations

import gzip
import io
import json
import socket
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

from leaderboard.config import Limits

FIX = Path(__file__).resolve().parent / "fixtures" / "leaderboard"
GOLD = FIX / "gold.json"
RESULT = FIX / "result_good.json"


def small_limits(**kw) -> Limits:
    """Limits small enough that every rule can be broken with a few KB of test data."""
    base = dict(per_team_per_day=3, max_upload_bytes=64 * 1024, max_json_bytes=48 * 1024,
                max_json_depth=6, max_zip_entries=40, max_zip_total_bytes=1024 * 1024,
                max_compression_ratio=50.0, ratio_min_bytes=32 * 1024, max_reply_chars=400,
                max_name_chars=40)
    base.update(kw)
    return Limits(**base)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def result_obj() -> dict:
    return json.loads(RESULT.read_text(encoding="utf-8"))


def variant(k: int) -> bytes:
    """A valid result that differs from result_good.json (so it is a new entry) in one reply."""
    obj = result_obj()
    first = next(iter(obj))
    turns = obj[first]["whole_dialog"]
    turns[1] = turns[1] + f" I am here for you, friend number {k}."
    return json.dumps(obj, indent=4).encode("utf-8")


def make_zip(path: Path, entries: list[tuple], compression=zipfile.ZIP_DEFLATED) -> Path:
    """entries: (name, bytes) or (ZipInfo, bytes)."""
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in entries:
            if isinstance(name, zipfile.ZipInfo):
                name.compress_type = compression
                zf.writestr(name, data)
            else:
                zf.writestr(name, data)
    return path


def _info(name: str, mode: int) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name)
    zi.external_attr = mode << 16
    zi.create_system = 3
    return zi


@dataclass
class Case:
    name: str
    path: Path
    code: str
    fragment: str          # a piece of the message the submitter must see
    team: str = "corpus team"
    system: str = "corpus system"
    model_ref: str | None = None


def malformed_corpus(tmp: Path, limits: Limits) -> list[Case]:
    """One upload per rule; each must be rejected with `code` and a message containing `fragment`."""
    tmp.mkdir(parents=True, exist_ok=True)
    good = RESULT.read_bytes()
    cases: list[Case] = []

    def add(name, data_or_path, code, fragment, **kw):
        if isinstance(data_or_path, Path):
            p = data_or_path
        else:
            p = tmp / name
            p.write_bytes(data_or_path)
        cases.append(Case(name, p, code, fragment, **kw))

    # size and type
    add("huge.json", b"{" + b" " * (limits.max_upload_bytes + 10) + b"}", "too_large", "the limit is")
    add("empty.json", b"", "empty", "empty")
    add("broken.zip", b"PK\x03\x04" + b"\x00garbage" * 20, "bad_zip", "cannot be read")
    add("result.json.gz", gzip.compress(good), "unsupported_archive", "gzip archive")
    # zip safety
    add("traversal.zip", make_zip(tmp / "traversal.zip", [("../result.json", good)]),
        "path_traversal", "outside the archive")
    add("absolute.zip", make_zip(tmp / "absolute.zip", [("/tmp/result.json", good)]),
        "absolute_path", "absolute path")
    add("symlink.zip", make_zip(tmp / "symlink.zip",
                                [(_info("result.json", stat.S_IFLNK | 0o777), b"/etc/passwd")]),
        "symlink", "symbolic link")
    add("fifo.zip", make_zip(tmp / "fifo.zip", [("result.json", good),
                                                (_info("pipe", stat.S_IFIFO | 0o644), b"")]),
        "special_file", "not a regular file")
    add("two_results.zip", make_zip(tmp / "two_results.zip",
                                    [("result.json", good), ("code/result.json", good)]),
        "multiple_results", "keep exactly one")
    add("no_result.zip", make_zip(tmp / "no_result.zip", [("README.md", b"hello")]),
        "no_result", "no result.json")
    add("bomb.zip", make_zip(tmp / "bomb.zip", [("result.json", good),
                                                ("weights.bin", b"\x00" * (limits.ratio_min_bytes * 8))]),
        "compression_bomb", "expands")
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("result.json", good)
    add("nested.zip", make_zip(tmp / "nested.zip", [("result.json", good), ("code.zip", inner.getvalue())]),
        "nested_archive", "nested archives")
    add("nested_content.zip", make_zip(tmp / "nested_content.zip", [("result.json", inner.getvalue())]),
        "nested_archive", "itself an archive")
    # zipfile cannot write encrypted entries: set the "encrypted" flag bit in both headers
    enc = bytearray(make_zip(tmp / "encrypted.zip", [("result.json", good)]).read_bytes())
    cd = enc.rfind(b"PK\x01\x02")
    enc[6] |= 0x1
    enc[cd + 8] |= 0x1
    add("encrypted.zip", bytes(enc), "encrypted", "encrypted")
    add("many.zip", make_zip(tmp / "many.zip", [("result.json", good)] +
                             [(f"f{i}.txt", b"x") for i in range(limits.max_zip_entries)]),
        "too_many_entries", f"the limit is {limits.max_zip_entries}")
    chunk = limits.ratio_min_bytes - 1   # below the bomb threshold, but adds up
    n = limits.max_zip_total_bytes // chunk + 1
    add("unpacks_big.zip", make_zip(tmp / "unpacks_big.zip", [("result.json", good)] +
                                    [(f"pad{i}.txt", b"a" * chunk) for i in range(n)]),
        "zip_too_large", "unpacks to more than")
    # JSON
    add("big.json", b"{" + b" " * (limits.max_json_bytes + 10) + b"}", "json_too_large",
        "result.json is")
    deep = "[" * (limits.max_json_depth + 3) + "]" * (limits.max_json_depth + 3)
    add("deep.json", json.dumps({"9001": json.loads(deep)}).encode(), "json_too_deep", "nested")
    add("very_deep.json", ("[" * 5000 + "]" * 5000).encode(), "json_too_deep", "nested")
    add("latin1.json", b'{"9001": "caf\xe9"}', "not_utf8", "not valid UTF-8")
    add("truncated.json", good[: len(good) // 2], "bad_json", "not valid JSON")
    obj = json.loads(good)
    first = next(iter(obj))
    dup = good.decode().replace("{", "{\n    \"%s\": %s," % (first, json.dumps(obj[first])), 1)
    add("dup.json", dup.encode(), "duplicate_key", "appears twice")
    add("list.json", b"[1, 2, 3]", "bad_shape", "object keyed by dialogue id")
    # the pre-flight check
    broken = json.loads(good)
    did = next(iter(broken))
    broken[did]["whole_dialog"][3] = "supporter:"
    broken[did]["whole_dialog"][4] = "seeker: I changed this seeker turn."
    add("preflight.json", json.dumps(broken, indent=4).encode(), "preflight", "pre-flight check found")
    # names and model reference (a valid file, so only the field is wrong)
    add("no_team.json", variant(901), "bad_team", "team name is empty", team="   ")
    add("reserved_team.json", variant(902), "bad_team", "reserved", team="Baseline")
    add("long_system.json", variant(903), "bad_system", "the limit is",
        system="s" * (limits.max_name_chars + 1))
    add("bad_ref.json", variant(904), "bad_model_ref", "neither a Hub id", model_ref="not a model!")
    return cases
