"""Pre-flight check of a `result.json` against the test file it answers.

`check_result` never raises on bad input: every problem it finds becomes a `Problem` naming the
dialogue id and the turn (the 0-based position in `whole_dialog`), and all of them are reported at
once. Problem codes:

| code | meaning |
| --- | --- |
| `io` | the result (or test) file cannot be read |
| `encoding` | not valid UTF-8, or a byte-order mark |
| `json` | not valid JSON |
| `structure` | wrong shape (top level, entry, `whole_dialog`, `character`) |
| `duplicate_id` | the same dialogue id twice in the object |
| `missing_id` / `extra_id` | an id of the test file is absent / an id not in the test file |
| `id_order` | ids not in the test file's order (the official scorer pairs by position) |
| `turn_count` | a dialogue without the test file's number of turns (20) |
| `role` | a turn without the expected role prefix (seeker/supporter alternating, seeker first) |
| `seeker_changed` | a seeker turn differs from the test file |
| `character_changed` | the `character` profile differs from the test file |
| `empty_reply` | a supporter turn with nothing (or only spaces) after `supporter:` |
| `role_tag` | a reply that still contains a role tag (`seeker:`, `Supporter:`, `User:` at a line start) |
| `special_token` | a reply that still contains a special token (`<|im_end|>`, `<|endoftext|>`, `</s>`, ...) |
| `too_long` | a reply longer than the cap (characters) |
| `test_file` | the test file itself could not be used |
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_REPLY_CHARS = 1500
ROLE_PREFIXES = ("seeker:", "supporter:")

_ROLE_TAG = re.compile(r"\b(?:seeker|supporter)\s*:|^[ \t]*(?:user|assistant|system)[ \t]*:",
                       re.IGNORECASE | re.MULTILINE)
_SPECIAL = re.compile(r"<\|[^<>|\s]{1,40}\|>|</s>|<s>|<unk>|<pad>|\[/?INST\]|<(?:start|end)_of_turn>")


@dataclass
class Problem:
    dialogue_id: str | None
    turn: int | None
    code: str
    message: str

    def where(self) -> str:
        parts = []
        if self.dialogue_id is not None:
            parts.append(f"dialogue {self.dialogue_id}")
        if self.turn is not None:
            parts.append(f"turn {self.turn} (whole_dialog[{self.turn}])")
        return ", ".join(parts) or "file"

    def as_dict(self) -> dict:
        return {"dialogue_id": self.dialogue_id, "turn": self.turn, "code": self.code,
                "message": self.message}

    def __str__(self) -> str:
        return f"{self.where()} [{self.code}]: {self.message}"


@dataclass
class CheckReport:
    ok: bool
    problems: list[Problem] = field(default_factory=list)
    n_dialogues: int = 0
    n_supporter_turns: int = 0
    source: str = "result"
    max_reply_chars: int = DEFAULT_MAX_REPLY_CHARS

    def codes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.problems:
            out[p.code] = out.get(p.code, 0) + 1
        return out

    def format(self) -> str:
        head = f"{self.source}: {self.n_dialogues} dialogues, {self.n_supporter_turns} supporter turns"
        if self.ok:
            return f"{head}: OK, no problems (reply cap {self.max_reply_chars} characters)"
        counts = ", ".join(f"{c} {k}" for k, c in sorted(self.codes().items()))
        lines = [f"{head}: FAILED, {len(self.problems)} problem(s) ({counts})"]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


class _Obj(dict):
    """A JSON object that remembers keys it saw more than once."""

    duplicates: list[str]


def _pairs(pairs):
    obj = _Obj()
    obj.duplicates = []
    for k, v in pairs:
        if k in obj:
            obj.duplicates.append(k)
        obj[k] = v
    return obj


def _from_zip(data: bytes, add) -> bytes | None:
    import io
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            if "result.json" not in z.namelist():
                add("structure", "the zip has no result.json at its top level")
                return None
            return z.read("result.json")
    except (zipfile.BadZipFile, OSError, RuntimeError, ValueError) as e:
        add("structure", f"not a readable zip: {e}")
        return None


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _parse(data, label: str, problems: list[Problem], *, code_prefix: str = ""):
    """Parse bytes/str/path/object into a JSON object, appending problems; None if unusable."""
    def add(code, msg, did=None):
        problems.append(Problem(did, None, code_prefix or code, msg if not code_prefix else f"{label}: {msg}"))

    if isinstance(data, (dict, list)) or data is None or isinstance(data, (int, float, bool)):
        obj = data
    else:
        raw = data
        if isinstance(data, os.PathLike) or (isinstance(data, str) and not data.lstrip().startswith(("{", "["))):
            try:
                raw = Path(data).read_bytes()
            except (OSError, ValueError) as e:
                add("io", f"cannot read {data}: {getattr(e, 'strerror', None) or e}")
                return None
        if isinstance(raw, (bytes, bytearray)):
            raw = bytes(raw)
            if raw.startswith(b"PK\x03\x04"):  # a submission zip: check its result.json
                raw = _from_zip(raw, add)
                if raw is None:
                    return None
            if raw.startswith(b"\xef\xbb\xbf"):
                add("encoding", "starts with a UTF-8 byte-order mark; save it as UTF-8 without BOM")
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                line = raw[: e.start].count(b"\n") + 1
                add("encoding", f"not valid UTF-8: byte {e.start} (line {line}) is 0x{raw[e.start]:02x}")
                text = raw.decode("utf-8", errors="replace")
        elif isinstance(raw, str):
            text = raw
        else:
            add("structure", f"cannot check a {type(data).__name__}; give a path, bytes, JSON text or an object")
            return None
        try:
            obj = json.loads(text, object_pairs_hook=_pairs, parse_constant=_reject_constant)
        except json.JSONDecodeError as e:
            add("json", f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}")
            return None
        except (ValueError, RecursionError) as e:
            add("json", f"invalid JSON: {e}")
            return None
    if not isinstance(obj, dict):
        add("structure", f"top level must be an object keyed by dialogue id, got {type(obj).__name__}")
        return None
    for did in getattr(obj, "duplicates", []):
        add("duplicate_id", "this id appears more than once in the file (JSON keeps only the last)", did)
    return obj


def _test_object(test, problems: list[Problem]) -> tuple[dict | None, bool]:
    """The test file as a raw object; the flag says profiles came from Dialogue objects (strings)."""
    if isinstance(test, (list, tuple)):
        try:
            from pesc.data.pesc_json import to_pesc_obj

            return to_pesc_obj(list(test)), True
        except Exception as e:  # noqa: BLE001 - a wrong test list is reported, not raised
            problems.append(Problem(None, None, "test_file", f"cannot use the test dialogues: {e}"))
            return None, False
    sub: list[Problem] = []
    obj = _parse(test, "test file", sub, code_prefix="test_file")
    problems.extend(sub)
    return obj, False


def _snippet(s: str, at: int, width: int = 30) -> str:
    return repr(s[max(0, at - 5): at + width])


def _first_diff(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _check_entry(did: str, entry, ref: dict, strict_profile: bool, cap: int, add) -> int:
    """Check one dialogue; returns its number of supporter turns."""
    if not isinstance(entry, dict):
        add(did, None, "structure", f"entry must be an object with 'whole_dialog' and 'character', "
                                    f"got {type(entry).__name__}")
        return 0
    for key in ("whole_dialog", "character"):
        if key not in entry:
            add(did, None, "structure", f"missing '{key}'")
    extra = sorted(set(entry) - {"whole_dialog", "character"} - set(ref))
    if extra:
        add(did, None, "structure", f"unexpected key(s) {extra}; the entry must keep the test file's keys only")
    n_sup = 0
    turns = entry.get("whole_dialog")
    ref_turns = ref.get("whole_dialog") if isinstance(ref.get("whole_dialog"), list) else []
    if "whole_dialog" in entry and not isinstance(turns, list):
        add(did, None, "structure", f"'whole_dialog' must be a list of strings, got {type(turns).__name__}")
    elif isinstance(turns, list):
        if len(turns) != len(ref_turns):
            add(did, None, "turn_count", f"{len(turns)} turns, the test file has {len(ref_turns)}")
        for i, s in enumerate(turns):
            ref_s = ref_turns[i] if i < len(ref_turns) else None
            expected = None
            if isinstance(ref_s, str) and ref_s.startswith(ROLE_PREFIXES):
                expected = ref_s.split(":", 1)[0]
            elif ref_s is None:
                expected = "seeker" if i % 2 == 0 else "supporter"
            if expected == "supporter":
                n_sup += 1
            if not isinstance(s, str):
                add(did, i, "role", f"turn must be a string starting with '{expected or 'seeker'}:', "
                                    f"got {type(s).__name__}")
                continue
            role = s.split(":", 1)[0] if s.startswith(ROLE_PREFIXES) else None
            if expected is not None and role != expected:
                add(did, i, "role", f"expected a '{expected}:' turn (roles alternate, seeker first), "
                                    f"found {s[:30]!r}")
                continue
            if role == "seeker":
                if isinstance(ref_s, str) and s != ref_s:
                    at = _first_diff(s, ref_s)
                    add(did, i, "seeker_changed", f"seeker turn differs from the test file at character {at}: "
                                                  f"{_snippet(s, at)} instead of {_snippet(ref_s, at)}")
            elif role == "supporter":
                body = s[len("supporter:"):]
                if not body.strip():
                    add(did, i, "empty_reply", "supporter turn is empty after 'supporter:'")
                    continue
                m = _ROLE_TAG.search(body)
                if m:
                    add(did, i, "role_tag", f"reply contains the role tag {m.group(0).strip()!r} at character "
                                            f"{m.start()}: {_snippet(body, m.start())}")
                for tok in dict.fromkeys(_SPECIAL.findall(body)):
                    add(did, i, "special_token", f"reply contains the special token {tok!r}")
                n = len(body.strip())
                if n > cap:
                    add(did, i, "too_long", f"reply is {n} characters, more than the cap of {cap}")
    if "character" in entry:
        ch, ref_ch = entry["character"], ref.get("character")
        if not isinstance(ch, dict):
            add(did, None, "character_changed", f"'character' must be an object, got {type(ch).__name__}")
        elif isinstance(ref_ch, dict):
            same = (lambda a, b: a == b and type(a) is type(b)) if strict_profile else \
                (lambda a, b: str(a) == str(b))
            diffs = [f"'{k}' missing" for k in ref_ch if k not in ch]
            diffs += [f"'{k}' added" for k in ch if k not in ref_ch]
            diffs += [f"'{k}' is {json.dumps(ch[k], ensure_ascii=False)[:40]}, was "
                      f"{json.dumps(ref_ch[k], ensure_ascii=False)[:40]}"
                      for k in ref_ch if k in ch and not same(ch[k], ref_ch[k])]
            diffs += [f"'{k}' given twice" for k in getattr(ch, "duplicates", [])]
            if not diffs and list(ch) != list(ref_ch):
                diffs.append("fields are in a different order")
            if diffs:
                add(did, None, "character_changed", "profile differs from the test file: " + "; ".join(diffs))
    return n_sup


def check_result(result, test, max_reply_chars: int = DEFAULT_MAX_REPLY_CHARS) -> CheckReport:
    """Check a result against its test file; every problem is listed, nothing is raised.

    `result`: a path, the raw bytes or JSON text, or the parsed object; a submission zip (path or
    bytes) is checked through its top-level result.json. `test`: a path (or bytes/text/object) of
    the test file, or the test dialogues as a list of `Dialogue`.
    """
    problems: list[Problem] = []
    source = str(result) if isinstance(result, (os.PathLike,)) or (
        isinstance(result, str) and not result.lstrip().startswith(("{", "["))) else "result"
    report = CheckReport(False, problems, source=source, max_reply_chars=max_reply_chars)

    def add(did, turn, code, msg):
        problems.append(Problem(did, turn, code, msg))

    try:
        if not isinstance(max_reply_chars, int) or max_reply_chars < 1:
            add(None, None, "structure", f"max_reply_chars must be a positive integer, got {max_reply_chars!r}")
            max_reply_chars = DEFAULT_MAX_REPLY_CHARS
        ref, from_dialogues = _test_object(test, problems)
        obj = _parse(result, "result", problems)
        if obj is None:
            return report
        report.n_dialogues = len(obj)
        if ref is None:
            return report
        ref_ids = [str(k) for k in ref]
        ids = list(obj)
        missing = [d for d in ref_ids if d not in obj]
        for did in missing:
            add(did, None, "missing_id", "this test dialogue is missing from the result")
        for did in ids:
            if did not in ref:
                add(did, None, "extra_id", "this id is not in the test file")
        common_res = [d for d in ids if d in ref]
        common_ref = [d for d in ref_ids if d in obj]
        if common_res != common_ref:
            pos = next(i for i, (a, b) in enumerate(zip(common_res, common_ref)) if a != b)
            add(common_res[pos], None, "id_order",
                f"dialogues are not in the test file's order: position {pos} holds {common_res[pos]}, "
                f"expected {common_ref[pos]} (the official scorer pairs turns by position)")
        n_sup = 0
        for did in ids:
            entry = obj[did]
            if did in ref and isinstance(ref[did], dict):
                n_sup += _check_entry(did, entry, ref[did], not from_dialogues, max_reply_chars, add)
            elif isinstance(entry, dict) and isinstance(entry.get("whole_dialog"), list):
                n_sup += sum(1 for s in entry["whole_dialog"] if isinstance(s, str) and s.startswith("supporter:"))
        report.n_supporter_turns = n_sup
    except Exception as e:  # noqa: BLE001 - the check must report, never crash, on any input
        add(None, None, "internal", f"the check stopped on unexpected input: {type(e).__name__}: {e}")
    report.ok = not problems
    return report
