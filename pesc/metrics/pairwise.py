"""Per-pair text metrics (METEOR, BLEU-4, ROUGE-L) with the official definitions, fast.

Every number is the one the plain library call gives (`tests/test_metrics.py` checks that against
nltk and rouge_score pair by pair), but the work that repeats is done once:

- one Porter stemmer with a word -> stem memo, shared by METEOR and ROUGE (both use nltk's
  PorterStemmer in its default NLTK_EXTENSIONS mode on lower-cased words);
- one WordNet reader with a word -> synonym-lemma memo (METEOR's synonym stage);
- ROUGE-L tokens are computed once per distinct text, and the LCS length with a bit-parallel
  algorithm (Hyyro 2004) instead of a Python DP table: same integer, far fewer Python operations;
- BLEU-4 with smoothing method 1: the clipped n-gram counts of all pairs at once with numpy, then
  the same float operations as `nltk.translate.bleu_score.sentence_bleu` per pair;
- pairs are split between this process and worker processes that are kept for later calls (their
  memos stay warm; fork start: the loaded WordNet is shared, its open files reopened per process).

METEOR itself stays nltk's `meteor_score`, given the memoised stemmer and WordNet.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing as mp
import os
import threading
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Iterable, Sequence

import numpy as np

PAIR_METRICS = ("meteor", "bleu4", "rougeL")
_BLEU_WEIGHTS = (0.25, 0.25, 0.25, 0.25)
_BLEU_EPSILON = 0.1  # SmoothingFunction().method1 default
_ROUGE_TOKEN_CACHE_MAX = 200_000


class CachedStemmer:
    """nltk's PorterStemmer (default mode) with a memo; deterministic, so the memo is exact."""

    def __init__(self):
        from nltk.stem.porter import PorterStemmer

        self._stemmer = PorterStemmer()
        self._memo: dict[str, str] = {}

    def stem(self, token: str) -> str:
        try:
            return self._memo[token]
        except KeyError:
            s = self._memo[token] = self._stemmer.stem(token)
            return s

    def __len__(self) -> int:
        return len(self._memo)


class _Lemma:
    __slots__ = ("_name",)

    def __init__(self, name: str):
        self._name = name

    def name(self) -> str:
        return self._name


class _SynonymSet:
    __slots__ = ("_lemmas",)

    def __init__(self, names: Iterable[str]):
        self._lemmas = [_Lemma(n) for n in names]

    def lemmas(self) -> list[_Lemma]:
        return self._lemmas


class CachedWordNet:
    """What METEOR asks WordNet (`synsets(word)` -> lemma names), memoised per word.

    Returns one pseudo-synset holding the distinct lemma names of all the word's synsets: METEOR
    only takes the union of those names, so the result is identical and each word is looked up once.
    """

    def __init__(self, reader):
        self.reader = reader
        self._memo: dict[str, list[_SynonymSet]] = {}
        self.lock = threading.Lock()  # NLTK's reader seeks in shared files: one thread at a time

    def synsets(self, word: str):
        hit = self._memo.get(word)
        if hit is None:
            with self.lock:
                names = dict.fromkeys(lemma.name() for s in self.reader.synsets(word) for lemma in s.lemmas())
            hit = self._memo[word] = [_SynonymSet(names)] if names else []
        return hit

    def __len__(self) -> int:
        return len(self._memo)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (bit-parallel, exact)."""
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def _ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    if len(tokens) < n:
        return Counter()
    return Counter(zip(*(tokens[i:] for i in range(n))))


def bleu4_method1(ref: Sequence[str], hyp: Sequence[str]) -> float:
    """nltk `sentence_bleu([ref], hyp, (0.25,)*4, SmoothingFunction().method1)`, same float ops."""
    hyp_len, ref_len = len(hyp), len(ref)
    logs = []
    for n in range(1, 5):
        hc = _ngram_counts(hyp, n)
        numerator = sum((hc & _ngram_counts(ref, n)).values()) if hc else 0
        if n == 1 and numerator == 0:
            return 0  # nltk returns the int 0 when no unigram matches
        denominator = max(1, hyp_len - n + 1 if hyp_len >= n else 0)
        # method1 adds epsilon to a zero numerator; a Fraction's float is numerator / denominator.
        p = (numerator + _BLEU_EPSILON) / denominator if numerator == 0 else numerator / denominator
        logs.append(_BLEU_WEIGHTS[n - 1] * math.log(p))
    if hyp_len > ref_len:
        bp = 1
    else:
        bp = math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(math.fsum(logs))


def ngram_keys(ids: np.ndarray, pos: np.ndarray, length: np.ndarray, n: int, prev: np.ndarray | None):
    """Integer key of the n-gram starting at each token (-1 where it would leave its text).

    `ids`: token ids of all texts concatenated; `pos`: each token's position in its text; `length`:
    the length of each token's text; `prev`: the (n-1)-gram keys. Equal keys <=> equal n-grams.
    """
    if prev is None:
        return ids.copy()
    valid = np.flatnonzero(pos + n - 1 < length)
    keys = np.full(ids.shape, -1, dtype=np.int64)
    if valid.size:
        raw = prev[valid] * (int(ids.max()) + 1) + ids[valid + n - 1]
        import pandas as pd

        keys[valid] = pd.factorize(raw)[0]
    return keys


def bleu4_batch(refs: Sequence[Sequence[str]], hyps: Sequence[Sequence[str]]) -> list[float]:
    """`bleu4_method1` for many pairs: clipped n-gram counts of all pairs at once with numpy (tokens
    mapped to integers, n-grams to integer keys, counts by sorting), then nltk's float operations
    per pair (math.log, math.fsum, math.exp) so every value is bit-identical."""
    n_pairs = len(refs)
    texts = list(hyps) + list(refs)  # text t < n_pairs is hypothesis t, else reference t - n_pairs
    lens = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    hyp_len, ref_len = lens[:n_pairs], lens[n_pairs:]
    nums = np.zeros((4, n_pairs), dtype=np.int64)
    total = int(lens.sum())
    if total:
        import pandas as pd

        flat = np.empty(total, dtype=object)
        flat[:] = [w for t in texts for w in t]
        ids = pd.factorize(flat)[0].astype(np.int64)
        owner = np.repeat(np.arange(len(texts)), lens)
        pos = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
        length = lens[owner]
        is_hyp = owner < n_pairs
        pair = np.where(is_hyp, owner, owner - n_pairs)
        keys = None
        for n in range(1, 5):
            keys = ngram_keys(ids, pos, length, n, keys)
            ok = keys >= 0
            if not ok.any():
                break
            width = int(keys.max()) + 1
            pk = pair * width + keys
            uh, ch = np.unique(pk[ok & is_hyp], return_counts=True)
            ur, cr = np.unique(pk[ok & ~is_hyp], return_counts=True)
            if uh.size == 0:
                continue
            at = np.minimum(np.searchsorted(ur, uh), max(ur.size - 1, 0))
            rc = np.where(ur.size and (ur[at] == uh), cr[at] if ur.size else 0, 0)
            nums[n - 1] = np.bincount(uh // width, weights=np.minimum(ch, rc), minlength=n_pairs).astype(np.int64)
    out: list[float] = []
    for p in range(n_pairs):
        if nums[0, p] == 0:
            out.append(0)  # nltk returns the int 0 when no unigram matches
            continue
        hl, rl = int(hyp_len[p]), int(ref_len[p])
        logs = []
        for k in range(4):
            num, den = int(nums[k, p]), max(1, hl - k)
            prec = (num + _BLEU_EPSILON) / den if num == 0 else num / den
            logs.append(_BLEU_WEIGHTS[k] * math.log(prec))
        bp = 1 if hl > rl else math.exp(1 - rl / hl)
        out.append(bp * math.exp(math.fsum(logs)))
    return out


class PairScorer:
    """Scores (reference, prediction) pairs; one instance per process keeps all the memos."""

    def __init__(self, wordnet=None):
        self.stemmer = CachedStemmer()
        self.wordnet = CachedWordNet(wordnet) if wordnet is not None else None
        self._rouge_tokens: dict[str, list[str]] = {}

    def rouge_tokens(self, text: str) -> list[str]:
        hit = self._rouge_tokens.get(text)
        if hit is None:
            from rouge_score.tokenize import tokenize

            if len(self._rouge_tokens) > _ROUGE_TOKEN_CACHE_MAX:
                self._rouge_tokens.clear()
            hit = self._rouge_tokens[text] = tokenize(text, self.stemmer)
        return hit

    def rouge_l(self, ref: str, pred: str) -> float:
        """`RougeScorer(['rougeL'], use_stemmer=True).score(ref, pred)['rougeL'].fmeasure`."""
        from rouge_score.scoring import fmeasure

        t, p = self.rouge_tokens(ref), self.rouge_tokens(pred)
        if not t or not p:
            return 0
        lcs = lcs_length(t, p)
        return fmeasure(lcs / len(p), lcs / len(t))

    def meteor(self, ref_tokens: list[str], pred_tokens: list[str]) -> float:
        from nltk.translate.meteor_score import meteor_score

        if self.wordnet is None:
            raise RuntimeError("METEOR needs WordNet; build PairScorer(wordnet=load_wordnet())")
        return meteor_score([ref_tokens], pred_tokens, stemmer=self.stemmer, wordnet=self.wordnet)

    def score_pairs(self, refs: Sequence[str], preds: Sequence[str],
                    metrics: Sequence[str] = PAIR_METRICS) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        if "meteor" in metrics or "bleu4" in metrics:
            rts, pts = [r.split() for r in refs], [p.split() for p in preds]
            if "meteor" in metrics:
                out["meteor"] = [self.meteor(rt, pt) for rt, pt in zip(rts, pts)]
            if "bleu4" in metrics:
                out["bleu4"] = bleu4_batch(rts, pts)
        if "rougeL" in metrics:
            out["rougeL"] = [self.rouge_l(r, p) for r, p in zip(refs, preds)]
        return {m: out[m] for m in metrics}


# ---------------------------------------------------------------------------------------------
# Process-level state and the parallel runner
# ---------------------------------------------------------------------------------------------

_SCORER: PairScorer | None = None


def process_scorer(need_wordnet: bool) -> PairScorer:
    """This process's PairScorer (memos persist across calls), with WordNet when needed."""
    global _SCORER
    if _SCORER is None:
        _SCORER = PairScorer()
    if need_wordnet and _SCORER.wordnet is None:
        from pesc.metrics.offline import load_wordnet

        _SCORER.wordnet = CachedWordNet(load_wordnet())
    return _SCORER


def _worker_init(need_wordnet: bool) -> None:
    process_scorer(need_wordnet)  # already built when forked; loads it under spawn


def _worker_chunk(args) -> dict[str, list[float]]:
    refs, preds, metrics = args
    return process_scorer("meteor" in metrics).score_pairs(refs, preds, metrics)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def idle_cpus(cap: int = 8) -> int:
    """CPUs not busy with other work (1-minute load average), this process's one included.

    On a shared machine whose cores are already busy, more processes only add start-up and
    cold memos; the answer is then 1 (score here, no worker processes)."""
    cpus = available_cpus()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - no load average on this platform
        load = 0.0
    return max(1, min(cpus, cap, int(round(cpus - load)) + 1))


# Below this many pairs, handing work to the worker processes costs more than it saves.
PARALLEL_MIN_PAIRS = 500


def resolve_workers(workers: int | None, n_pairs: int) -> int:
    if workers is None:
        env = os.environ.get("PESC_SCORE_WORKERS")
        if env:
            try:
                workers = int(env)
            except ValueError:
                from pesc.errors import ConfigError

                raise ConfigError(f"PESC_SCORE_WORKERS must be a number, got {env!r}") from None
        else:
            workers = idle_cpus() if n_pairs >= PARALLEL_MIN_PAIRS else 1
    return max(1, min(int(workers), max(1, n_pairs)))


def _mp_context():
    method = os.environ.get("PESC_MP_START")
    if method is None:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    return mp.get_context(method)


_POOL: tuple | None = None  # (executor, workers, has_wordnet, owner pid)
_POOL_LOCK = threading.Lock()


def _pool(workers: int, need_wordnet: bool) -> ProcessPoolExecutor:
    """A worker pool kept for the life of the process, so its memos (stems, synonyms, ROUGE tokens)
    stay warm between calls and nothing is forked again. Rebuilt if WordNet is newly needed."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            ex, w, has_wn, pid = _POOL
            if pid == os.getpid() and w == workers and (has_wn or not need_wordnet):
                return ex
            _POOL = None
            if pid == os.getpid():  # let work another thread already queued there finish
                ex.shutdown(wait=False, cancel_futures=False)
        ex = ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context(),
                                 initializer=_worker_init, initargs=(need_wordnet,))
        _POOL = (ex, workers, need_wordnet, os.getpid())
        return ex


def shutdown_pool() -> None:
    """Stop the scorer's worker processes (also done at exit)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None and _POOL[3] == os.getpid():
            _POOL[0].shutdown(wait=True, cancel_futures=True)
        _POOL = None


def _forget_pool_in_child() -> None:
    """A forked child starts without the parent's pool and with fresh locks."""
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()
    if _SCORER is not None and _SCORER.wordnet is not None:
        _SCORER.wordnet.lock = threading.Lock()


atexit.register(shutdown_pool)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


class PendingPairs:
    """Pair metrics under way. With several workers the pairs are split: the first share is scored
    in this process when `result()` is called (after the caller has done its own work, e.g.
    Extrema and Distinct), the rest was handed to the worker processes at creation."""

    def __init__(self, local_chunks, remote_chunks, metrics, workers, need_wordnet, progress, desc):
        self.local, self.remote = local_chunks, remote_chunks
        self.metrics, self.progress, self.desc = metrics, progress, desc
        self.need_wordnet = need_wordnet
        self.futures = None
        if self.remote:
            try:
                pool = _pool(workers - 1, need_wordnet)
                self.futures = [pool.submit(_worker_chunk, c) for c in self.remote]
            except BrokenProcessPool:
                shutdown_pool()

    def result(self) -> dict[str, np.ndarray]:
        from tqdm.auto import tqdm

        n = sum(len(c[0]) for c in self.local + self.remote)
        bar = tqdm(total=n, desc=self.desc, unit="pair", disable=not self.progress, leave=False)
        scorer = process_scorer(self.need_wordnet)
        results: list[dict[str, list[float]]] = []
        try:
            for c in self.local:
                results.append(scorer.score_pairs(*c))
                bar.update(len(c[0]))
            remote: list[dict[str, list[float]]] = []
            if self.futures is not None:
                try:
                    for c, f in zip(self.remote, self.futures):
                        remote.append(f.result())
                        bar.update(len(c[0]))
                except BrokenProcessPool:  # a worker died (e.g. out of memory): finish here instead
                    shutdown_pool()
                    self.futures = None
            if self.futures is None:
                for c in self.remote[len(remote):]:
                    remote.append(scorer.score_pairs(*c))
                    bar.update(len(c[0]))
            results += remote
        finally:
            bar.close()
        return {m: np.array([v for r in results for v in r[m]], dtype=np.float64) for m in self.metrics}


def _chunks(refs, preds, metrics, start, stop, n_chunks):
    size = max(1, math.ceil((stop - start) / max(1, n_chunks)))
    return [(list(refs[i:min(i + size, stop)]), list(preds[i:min(i + size, stop)]), metrics)
            for i in range(start, stop, size)]


def start_pairs(refs: Sequence[str], preds: Sequence[str], metrics: Sequence[str] = PAIR_METRICS,
                workers: int | None = None, progress: bool = False, desc: str = "scoring") -> PendingPairs:
    """Start per-pair METEOR / BLEU-4 / ROUGE-L; `.result()` gives float64 arrays in pair order.

    `workers` counts this process: 2 means this process plus one worker process, each with about
    half of the pairs (no process sits idle waiting for the others).
    """
    metrics = tuple(m for m in PAIR_METRICS if m in metrics)
    n = len(refs)
    if len(preds) != n:
        raise ValueError(f"{n} references but {len(preds)} predictions")
    need_wordnet = "meteor" in metrics
    if not metrics or n == 0:
        return PendingPairs([], [], metrics, 1, need_wordnet, False, desc)
    process_scorer(need_wordnet)  # load WordNet here: errors surface early, forks share it
    workers = resolve_workers(workers, n)
    local_n = n if workers == 1 else n // workers
    per_bar = 10 if progress else 1
    local = _chunks(refs, preds, metrics, 0, local_n, per_bar)
    remote = _chunks(refs, preds, metrics, local_n, n, (workers - 1) * max(2, per_bar)) if local_n < n else []
    return PendingPairs(local, remote, metrics, workers, need_wordnet, progress, desc)


def score_pairs(refs: Sequence[str], preds: Sequence[str], metrics: Sequence[str] = PAIR_METRICS,
                workers: int | None = None, progress: bool = False,
                desc: str = "scoring") -> dict[str, np.ndarray]:
    """Per-pair METEOR / BLEU-4 / ROUGE-L as float64 arrays, in pair order."""
    return start_pairs(refs, preds, metrics, workers, progress, desc).result()


def sequential_mean(values: Sequence[float] | np.ndarray) -> float:
    """Mean with left-to-right summation, as `total += x` then `total / n` (the organisers' loop)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return 0.0
    return float(np.cumsum(arr)[-1] / arr.size)
