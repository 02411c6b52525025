"""Reading an uploaded submission safely: a zip holding one `result.json`, or a bare `result.json`.

Nothing is ever extracted to disk. Every rule has a code (used by tests and shown to the user) and a
message that says what is wrong and what the limit is. The first broken rule rejects the upload.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from leaderboard.config import Limits
from pesc.errors import PescError

RESULT_NAME = "result.json"

# Magic numbers of archive formats that may not appear inside a submission (nor be the upload).
ARCHIVE_MAGIC = {
    b"PK\x03\x04": "zip", b"PK\x05\x06": "zip", b"PK\x07\x08": "zip",
    b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"7z\xbc\xaf\x27\x1c": "7z",
    b"Rar!\x1a\x07": "rar", b"\x28\xb5\x2f\xfd": "zstd",
}
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".7z", ".rar", ".zst", ".whl",
                    ".jar", ".tbz2", ".txz", ".lz", ".lzma", ".z", ".cab", ".apk", ".egg")


class UploadRejected(PescError):
    """An upload broke a rule. `code` names the rule; the message says why, for the submitter."""

    def __init__(self, code: str, message: str):
        self.code = code
        self.reason = message
        super().__init__(message)


@dataclass
class Upload:
    """A readable submission: the bytes of its result.json (parsed) and of the original upload."""
    upload_bytes: bytes
    upload_name: str
    kind: str                       # "zip" or "json"
    result_bytes: bytes
    result: dict
    members: list[str] = field(default_factory=list)  # zip entry names (empty for a bare JSON)

    @property
    def result_sha(self) -> str:
        return sha256(self.result_bytes)

    @property
    def upload_sha(self) -> str:
        return sha256(self.upload_bytes)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.0f} KB" if n >= 1024 else f"{n} bytes"


def archive_kind(head: bytes) -> str | None:
    for magic, kind in ARCHIVE_MAGIC.items():
        if head.startswith(magic):
            return kind
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    return None


def read_upload(source: str | Path | bytes, limits: Limits, name: str | None = None) -> Upload:
    """Check and read an upload (a path or its bytes). Raises UploadRejected on the first problem."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        name = name or path.name
        try:
            size = path.stat().st_size
        except OSError:
            raise UploadRejected("missing", "the uploaded file could not be read; upload it again") from None
        if size > limits.max_upload_bytes:
            raise UploadRejected("too_large", f"the upload is {_mb(size)}; the limit is "
                                              f"{_mb(limits.max_upload_bytes)}")
        data = path.read_bytes()
    else:
        data = bytes(source)
        name = name or "upload"
    if len(data) > limits.max_upload_bytes:
        raise UploadRejected("too_large", f"the upload is {_mb(len(data))}; the limit is "
                                          f"{_mb(limits.max_upload_bytes)}")
    if not data.strip():
        raise UploadRejected("empty", "the uploaded file is empty")
    kind = archive_kind(data[:512])
    if kind == "zip":
        result_bytes, members = _read_zip(data, limits)
        up_kind = "zip"
    elif kind is not None:
        raise UploadRejected("unsupported_archive", f"the upload is a {kind} archive; upload a .zip "
                                                    f"or a bare {RESULT_NAME}")
    else:
        if len(data) > limits.max_json_bytes:
            raise UploadRejected("json_too_large", f"{RESULT_NAME} is {_mb(len(data))}; the limit is "
                                                   f"{_mb(limits.max_json_bytes)}")
        result_bytes, members = data, []
        up_kind = "json"
    result = parse_result_json(result_bytes, limits)
    return Upload(data, name, up_kind, result_bytes, result, members)


def _check_member_name(info: zipfile.ZipInfo) -> str:
    raw = info.filename
    if "\x00" in raw:
        raise UploadRejected("bad_name", f"zip entry {raw!r} has a NUL byte in its name")
    name = raw.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":" and name[0].isalpha()):
        raise UploadRejected("absolute_path", f"zip entry {raw!r} has an absolute path; entries must be "
                                              "relative to the archive root")
    if ".." in name.split("/"):
        raise UploadRejected("path_traversal", f"zip entry {raw!r} points outside the archive ('..')")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise UploadRejected("symlink", f"zip entry {raw!r} is a symbolic link; links are not allowed")
    if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) and stat.S_IFMT(mode):
        raise UploadRejected("special_file", f"zip entry {raw!r} is not a regular file")
    if info.flag_bits & 0x1:
        raise UploadRejected("encrypted", f"zip entry {raw!r} is encrypted; upload an unencrypted zip")
    return posixpath.normpath(name)


def _read_zip(data: bytes, limits: Limits) -> tuple[bytes, list[str]]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as e:
        raise UploadRejected("bad_zip", f"the zip file cannot be read ({e})") from None
    if len(infos) > limits.max_zip_entries:
        raise UploadRejected("too_many_entries", f"the zip has {len(infos)} entries; the limit is "
                                                 f"{limits.max_zip_entries}")
    total = 0
    results: list[zipfile.ZipInfo] = []
    names = []
    for info in infos:
        norm = _check_member_name(info)
        names.append(info.filename)
        if info.is_dir():
            continue
        total += info.file_size
        if total > limits.max_zip_total_bytes:
            raise UploadRejected("zip_too_large", f"the zip unpacks to more than "
                                                  f"{_mb(limits.max_zip_total_bytes)}")
        if info.file_size >= limits.ratio_min_bytes:
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > limits.max_compression_ratio:
                raise UploadRejected("compression_bomb", f"zip entry {info.filename!r} expands "
                                     f"{ratio:.0f}x ({_mb(info.compress_size)} to {_mb(info.file_size)}); "
                                     f"the limit is {limits.max_compression_ratio:.0f}x")
        base = posixpath.basename(norm)
        if base.lower().endswith(ARCHIVE_SUFFIXES):
            raise UploadRejected("nested_archive", f"zip entry {info.filename!r} is an archive; "
                                                   "nested archives are not allowed")
        if base == RESULT_NAME:
            results.append(info)
    if not results:
        raise UploadRejected("no_result", f"the zip holds no {RESULT_NAME}")
    if len(results) > 1:
        listed = ", ".join(repr(i.filename) for i in results)
        raise UploadRejected("multiple_results", f"the zip holds {len(results)} files named "
                                                 f"{RESULT_NAME} ({listed}); keep exactly one")
    info = results[0]
    if info.file_size > limits.max_json_bytes:
        raise UploadRejected("json_too_large", f"{RESULT_NAME} is {_mb(info.file_size)}; the limit is "
                                               f"{_mb(limits.max_json_bytes)}")
    try:
        with zf.open(info) as f:
            # Read at most one byte past the limit: a header that lies about the size cannot make
            # us read more than that.
            body = f.read(limits.max_json_bytes + 1)
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, OSError) as e:
        raise UploadRejected("bad_zip", f"{info.filename!r} cannot be decompressed ({e})") from None
    if len(body) > limits.max_json_bytes:
        raise UploadRejected("json_too_large", f"{RESULT_NAME} is larger than "
                                               f"{_mb(limits.max_json_bytes)}")
    if archive_kind(body[:512]):
        raise UploadRejected("nested_archive", f"{info.filename!r} is itself an archive; "
                                               "nested archives are not allowed")
    return body, names


def _depth(obj) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
    deepest = 0
    stack = [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in node)
    return deepest


def _no_duplicate_keys(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise UploadRejected("duplicate_key", f"{RESULT_NAME}: key {k!r} appears twice "
                                                  "(dialogue ids must be unique)")
        seen[k] = v
    return seen


def parse_result_json(data: bytes, limits: Limits) -> dict:
    if len(data) > limits.max_json_bytes:
        raise UploadRejected("json_too_large", f"{RESULT_NAME} is {_mb(len(data))}; the limit is "
                                               f"{_mb(limits.max_json_bytes)}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UploadRejected("not_utf8", f"{RESULT_NAME} is not valid UTF-8 (line {line}, byte "
                                         f"{e.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise UploadRejected("bad_json", f"{RESULT_NAME} is not valid JSON: {e.msg} (line {e.lineno}, "
                                         f"column {e.colno})") from None
    except RecursionError:
        raise UploadRejected("json_too_deep", f"{RESULT_NAME} is nested more than "
                                              f"{limits.max_json_depth} levels deep") from None
    depth = _depth(obj)
    if depth > limits.max_json_depth:
        raise UploadRejected("json_too_deep", f"{RESULT_NAME} is nested {depth} levels deep; the limit "
                                              f"is {limits.max_json_depth}")
    if not isinstance(obj, dict):
        raise UploadRejected("bad_shape", f"{RESULT_NAME} must be an object keyed by dialogue id, "
                                          f"got {type(obj).__name__}")
    return obj
