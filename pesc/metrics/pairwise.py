"""Per-pair text metrics (METEOR, BLEU-4, ROUGE-L) with the official definitions, fast.

Every number is the one the plain library call gives (`tests/test_metrics_parity.py` checks that
against nltk and rouge_score pair by pair), but the work that repeats is done once:

- one Porter stemmer with a word -> stem memo, shared by METEOR and ROUGE (both use nltk's
  PorterStemmer in its default NLTK_EXTENSIONS mode on lower-cased words);
- one WordNet reader with a word -> synonym-lemma memo (METEOR's synonym stage);
- ROUGE-L tokens are computed once per distinct text, and the LCS length with a bit-parallel
  algorithm (Hyyro 2004) instead of a Python DP table: same integer, far fewer Python operations;
- BLEU-4 with smoothing method 1 computed from n-gram Counters with the same float operations as
  `nltk.translate.bleu_score.sentence_bleu` (no Fraction objects);
- pairs are split into chunks and scored in worker processes (fork: the loaded WordNet is shared).

METEOR itself stays nltk's `meteor_score`, given the memoised stemmer and WordNet.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
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

    def synsets(self, word: str):
        hit = self._memo.get(word)
        if hit is None:
            names = dict.fromkeys(lemma.name() for s in self.reader.synsets(word) for lemma in s.lemmas())
            hit = self._memo[word] = [_SynonymSet(names)] if names else []
        return hit


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
        out: dict[str, list[float]] = {m: [] for m in metrics}
        want_meteor, want_bleu, want_rouge = ("meteor" in metrics, "bleu4" in metrics, "rougeL" in metrics)
        for ref, pred in zip(refs, preds):
            if want_meteor or want_bleu:
                rt, pt = ref.split(), pred.split()
                if want_meteor:
                    out["meteor"].append(self.meteor(rt, pt))
                if want_bleu:
                    out["bleu4"].append(bleu4_method1(rt, pt))
            if want_rouge:
                out["rougeL"].append(self.rouge_l(ref, pred))
        return out


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


# Below this many pairs, starting processes costs more than it saves.
PARALLEL_MIN_PAIRS = 300


def resolve_workers(workers: int | None, n_pairs: int) -> int:
    if workers is None:
        env = os.environ.get("PESC_SCORE_WORKERS")
        workers = int(env) if env else (min(available_cpus(), 8) if n_pairs >= PARALLEL_MIN_PAIRS else 1)
    return max(1, min(int(workers), max(1, n_pairs)))


def _mp_context():
    method = os.environ.get("PESC_MP_START")
    if method is None:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    return mp.get_context(method)


def score_pairs(refs: Sequence[str], preds: Sequence[str], metrics: Sequence[str] = PAIR_METRICS,
                workers: int | None = None, progress: bool = False,
                desc: str = "scoring") -> dict[str, np.ndarray]:
    """Per-pair METEOR / BLEU-4 / ROUGE-L as float64 arrays, in pair order."""
    metrics = tuple(m for m in PAIR_METRICS if m in metrics)
    n = len(refs)
    if len(preds) != n:
        raise ValueError(f"{n} references but {len(preds)} predictions")
    if not metrics or n == 0:
        return {m: np.zeros(0, dtype=np.float64) for m in metrics}
    need_wordnet = "meteor" in metrics
    scorer = process_scorer(need_wordnet)  # load WordNet here: errors surface early, forks share it
    workers = resolve_workers(workers, n)
    n_chunks = 1 if workers == 1 and not progress else max(workers * 4, min(20, n))
    size = max(1, math.ceil(n / n_chunks))
    chunks = [(list(refs[i:i + size]), list(preds[i:i + size]), metrics) for i in range(0, n, size)]

    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc=desc, unit="pair", disable=not progress, leave=False)
    results: list[dict[str, list[float]]] = []
    try:
        if workers == 1:
            for c in chunks:
                results.append(scorer.score_pairs(*c))
                bar.update(len(c[0]))
        else:
            with ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context(),
                                     initializer=_worker_init, initargs=(need_wordnet,)) as ex:
                for c, r in zip(chunks, ex.map(_worker_chunk, chunks)):
                    results.append(r)
                    bar.update(len(c[0]))
    finally:
        bar.close()
    return {m: np.array([v for r in results for v in r[m]], dtype=np.float64) for m in metrics}


def sequential_mean(values: Sequence[float] | np.ndarray) -> float:
    """Mean with left-to-right summation, as `total += x` then `total / n` (the organisers' loop)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return 0.0
    return float(np.cumsum(arr)[-1] / arr.size)
