"""G-Score judges: an LLM rates each (seeker input, reference, prediction) on a 1-5 scale.

The rating is clipped to [1, 5] and divided by 5 (METRICS.md). Two judges share one interface:

- `OpenAIJudge`: any OpenAI-compatible `/chat/completions` endpoint. Base URL, model and key come
  from the arguments or the environment (PESC_JUDGE_BASE_URL or OPENAI_BASE_URL, PESC_JUDGE_MODEL,
  PESC_JUDGE_API_KEY or OPENAI_API_KEY). Transient HTTP failures are retried with exponential
  backoff; a reply that is not a number is asked again, then counted as a failure and reported;
  an authentication or bad-request error stops the run with a clear message.
- `HFJudge`: a local Hugging Face causal LM (greedy first, sampled retries).

Ratings are cached on disk (SQLite) by (input, reference, prediction, judge identity), so scoring
the same submission again costs nothing. Failures are not cached.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

from pesc.errors import ConfigError

PROMPT_VERSION = "pesc-g-v2"
# The judge setup that METRICS.md describes: one rating from 1 to 5 of a supporter reply against the
# seeker's input and the reference, on relevance, agreement with the reference and fluency, with the
# reply limited to the number (the organisers used max_tokens=5). Wording is the project's own.
SYSTEM_PROMPT = "You are a strict evaluator. Answer with a single number from 1 to 5 and nothing else."
USER_TEMPLATE = """Rate the candidate reply of an emotional-support conversation on a scale from 1 (poor) to 5 (excellent).
Weigh three things equally: how relevant it is to the seeker's message, how closely it matches the
reference reply in content, and how fluent and coherent it is.

Seeker's message: {input}
Reference reply: {reference}
Candidate reply: {prediction}

Rating (a number from 1 to 5):"""

_NUMBER_ONLY = re.compile(r"^\s*(?:score|rating)?\s*[:=]?\s*([+-]?\d+(?:\.\d+)?)\s*(?:/\s*5)?\s*\.?\s*$",
                          re.IGNORECASE)


def build_messages(inp: str, reference: str, prediction: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(input=inp, reference=reference,
                                                               prediction=prediction)}]


def parse_rating(reply: str | None) -> float | None:
    """The 1-5 rating in a reply ("4", "4.5", "Score: 4", "4/5"), or None if it is not a number."""
    if reply is None:
        return None
    text = reply.strip()
    try:
        value = float(text)
    except ValueError:
        m = _NUMBER_ONLY.match(text)
        if not m:
            return None
        value = float(m.group(1))
    if not math.isfinite(value):
        return None
    return value


def rating_to_score(value: float) -> float:
    return min(max(value, 1.0), 5.0) / 5.0


@dataclass
class JudgeItem:
    input: str
    reference: str
    prediction: str


@dataclass
class JudgeResult:
    score: float | None          # clipped rating / 5, None on failure
    rating: float | None = None  # the raw number the judge gave
    reply: str | None = None     # the judge's last raw reply
    error: str | None = None     # why it failed
    cached: bool = False


class JudgeFatalError(ConfigError):
    """The judge cannot work at all (bad key, unknown model, ...): stop instead of failing every pair."""


class RatingCache:
    """SQLite cache of successful ratings, keyed by a hash of (judge, input, reference, prediction)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
        with self._lock:
            self._conn.execute("CREATE TABLE IF NOT EXISTS ratings (key TEXT PRIMARY KEY, judge TEXT, "
                               "rating REAL, reply TEXT, created REAL)")
            self._conn.commit()

    @staticmethod
    def key(judge_id: str, item: JudgeItem) -> str:
        blob = json.dumps([judge_id, item.input, item.reference, item.prediction], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get_many(self, keys: Sequence[str]) -> dict[str, tuple[float, str]]:
        out = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                part = list(keys[i:i + 500])
                q = f"SELECT key, rating, reply FROM ratings WHERE key IN ({','.join('?' * len(part))})"
                for k, rating, reply in self._conn.execute(q, part):
                    out[k] = (rating, reply)
        return out

    def put(self, key: str, judge_id: str, rating: float, reply: str) -> None:
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO ratings VALUES (?, ?, ?, ?, ?)",
                               (key, judge_id, rating, reply, time.time()))
            self._conn.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM ratings").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def default_cache_path() -> Path:
    from pesc.metrics.offline import cache_dir

    return cache_dir() / "judge_ratings.sqlite"


class Judge:
    """Base class: subclasses implement `identity` and `_ask(items) -> list[str | None]` (raw replies)."""

    #: how many extra attempts a non-numeric reply gets
    parse_retries: int = 2

    def __init__(self, cache: RatingCache | str | os.PathLike | None | bool = True):
        if cache is True:
            cache = RatingCache(default_cache_path())
        elif cache is False or cache is None:
            cache = None
        elif not isinstance(cache, RatingCache):
            cache = RatingCache(cache)
        self.cache = cache

    @property
    def identity(self) -> str:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return self.identity

    def _ask(self, items: list[JudgeItem], attempt: int) -> list[tuple[str | None, str | None]]:
        """(reply, error) per item. `attempt` 0 is the first try, >0 a retry after a bad reply."""
        raise NotImplementedError

    def rate(self, items: Sequence[JudgeItem], progress: bool = False) -> list[JudgeResult]:
        items = list(items)
        results: list[JudgeResult | None] = [None] * len(items)
        keys = [RatingCache.key(self.identity, it) for it in items]
        if self.cache is not None:
            hits = self.cache.get_many(keys)
            for k, key in enumerate(keys):
                if key in hits:
                    rating, reply = hits[key]
                    results[k] = JudgeResult(rating_to_score(rating), rating, reply, cached=True)
        todo = [k for k, r in enumerate(results) if r is None]
        # The same triple asked twice in one run is asked once.
        first_of: dict[str, int] = {}
        for k in todo:
            first_of.setdefault(keys[k], k)
        unique = list(first_of.values())
        from tqdm.auto import tqdm

        bar = tqdm(total=len(unique), desc=f"judge {self.name}", unit="pair", disable=not progress or not unique,
                   leave=False)
        try:
            pending = unique
            last: dict[int, tuple[str | None, str | None]] = {}
            for attempt in range(self.parse_retries + 1):
                if not pending:
                    break
                replies = self._ask([items[k] for k in pending], attempt)
                retry = []
                for k, (reply, err) in zip(pending, replies):
                    value = parse_rating(reply) if err is None else None
                    if value is not None:
                        results[k] = JudgeResult(rating_to_score(value), value, reply)
                        if self.cache is not None:
                            self.cache.put(keys[k], self.identity, value, reply)
                        bar.update(1)
                    else:
                        last[k] = (reply, err or f"not a number: {reply!r}")
                        retry.append(k)
                pending = retry
            for k in pending:
                reply, err = last[k]
                results[k] = JudgeResult(None, None, reply, err)
                bar.update(1)
        finally:
            bar.close()
        for k in todo:
            if results[k] is None:
                src = results[first_of[keys[k]]]
                results[k] = JudgeResult(src.score, src.rating, src.reply, src.error, src.cached)
        return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint
# ---------------------------------------------------------------------------------------------

def _env(*names: str) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return None


class OpenAIJudge(Judge):
    """A judge behind an OpenAI-compatible chat-completions endpoint (threads, retries, backoff)."""

    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(self, model: str | None = None, base_url: str | None = None, api_key: str | None = None,
                 *, max_tokens: int = 5, temperature: float | None = None, max_retries: int = 4,
                 backoff: float = 1.0, max_backoff: float = 30.0, timeout: float = 60.0,
                 concurrency: int = 8, cache: RatingCache | str | os.PathLike | None | bool = True):
        super().__init__(cache)
        self.model = model or _env("PESC_JUDGE_MODEL") or "gpt-4o-mini"
        self.base_url = (base_url or _env("PESC_JUDGE_BASE_URL", "OPENAI_BASE_URL")
                         or "https://api.openai.com/v1").rstrip("/")
        self.api_key = api_key if api_key is not None else _env("PESC_JUDGE_API_KEY", "OPENAI_API_KEY")
        host = urlparse(self.base_url).hostname or ""
        if not self.api_key and host not in ("127.0.0.1", "localhost", "::1"):
            raise ConfigError(f"the G-Score judge at {self.base_url} needs an API key: set "
                              "PESC_JUDGE_API_KEY (or OPENAI_API_KEY); or score without --judge "
                              "(the total is then reported without G)")
        self.max_tokens, self.temperature = max_tokens, temperature
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.timeout, self.concurrency = timeout, max(1, concurrency)
        self._fatal: str | None = None
        self._client = None

    @property
    def identity(self) -> str:
        return f"openai-chat|{self.base_url}|{self.model}|max_tokens={self.max_tokens}|" \
               f"temperature={self.temperature}|{PROMPT_VERSION}"

    @property
    def name(self) -> str:
        return f"openai:{self.model}"

    def _http(self):
        if self._client is None:
            import httpx

            headers = {"Content-Type": "application/json"}
            if self.api_key:
                headers["Authorization"] = f"Bearer {self.api_key}"
            self._client = httpx.Client(timeout=self.timeout, headers=headers,
                                        limits=httpx.Limits(max_connections=self.concurrency))
        return self._client

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff * (2 ** attempt) * (0.5 + random.random() / 2)
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        time.sleep(min(delay, self.max_backoff))

    def _one(self, item: JudgeItem) -> tuple[str | None, str | None]:
        import httpx

        body = {"model": self.model, "messages": build_messages(item.input, item.reference, item.prediction),
                "max_tokens": self.max_tokens}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        url = f"{self.base_url}/chat/completions"
        error = None
        for attempt in range(self.max_retries + 1):
            if self._fatal:
                return None, self._fatal
            try:
                r = self._http().post(url, json=body)
            except httpx.HTTPError as e:
                error = f"{type(e).__name__}: {e}"
                if attempt < self.max_retries:
                    self._sleep(attempt, None)
                continue
            if r.status_code == 200:
                try:
                    data = r.json()
                    return str(data["choices"][0]["message"]["content"] or ""), None
                except (ValueError, KeyError, IndexError, TypeError):
                    return None, f"malformed response body: {r.text[:200]!r}"
            error = f"HTTP {r.status_code}: {r.text[:200]}"
            if r.status_code in self.RETRY_STATUS:
                if attempt < self.max_retries:
                    self._sleep(attempt, r.headers.get("retry-after"))
                continue
            if r.status_code in (400, 401, 403, 404):
                self._fatal = f"judge endpoint {url} refused the request ({error}); check the model " \
                              "name, base URL and API key"
            return None, error
        return None, f"gave up after {self.max_retries + 1} attempts ({error})"

    def _ask(self, items, attempt):
        out: list[tuple[str | None, str | None]] = [(None, None)] * len(items)
        with ThreadPoolExecutor(max_workers=self.concurrency) as ex:
            futs = {ex.submit(self._one, it): k for k, it in enumerate(items)}
            for f in as_completed(futs):
                out[futs[f]] = f.result()
        if self._fatal:
            raise JudgeFatalError(self._fatal)
        return out

    def close(self):
        if self._client is not None:
            self._client.close()
            self._client = None


# ---------------------------------------------------------------------------------------------
# Local Hugging Face model
# ---------------------------------------------------------------------------------------------

class HFJudge(Judge):
    """A local causal LM as the judge: chat template when it has one, greedy first, sampled retries."""

    def __init__(self, model, tokenizer=None, *, name: str | None = None, max_new_tokens: int = 5,
                 batch_size: int = 8, seed: int = 0, cache: RatingCache | str | os.PathLike | None | bool = True):
        super().__init__(cache)
        if isinstance(model, (str, os.PathLike)):
            from pesc.models import load_model, load_tokenizer

            name = name or str(model)
            tokenizer = tokenizer or load_tokenizer(str(model))
            model = load_model(str(model))
        if tokenizer is None:
            raise ConfigError("HFJudge needs a tokenizer with a model object")
        self.model, self.tokenizer = model, tokenizer
        self._name = name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
        self.max_new_tokens, self.batch_size, self.seed = max_new_tokens, batch_size, seed

    @property
    def identity(self) -> str:
        return f"hf|{self._name}|max_new_tokens={self.max_new_tokens}|{PROMPT_VERSION}"

    @property
    def name(self) -> str:
        return f"hf:{self._name}"

    def _prompt_ids(self, item: JudgeItem) -> list[int]:
        msgs = build_messages(item.input, item.reference, item.prediction)
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        text = f"{msgs[0]['content']}\n{msgs[1]['content']}\nRating:"
        return tok(text, add_special_tokens=True)["input_ids"]

    def _ask(self, items, attempt):
        import torch

        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        out = []
        for i in range(0, len(items), self.batch_size):
            batch = [self._prompt_ids(it) for it in items[i:i + self.batch_size]]
            n = max(len(b) for b in batch)
            ids = torch.full((len(batch), n), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), n), dtype=torch.long)
            for r, b in enumerate(batch):  # left padding for generation
                ids[r, n - len(b):] = torch.tensor(b)
                mask[r, n - len(b):] = 1
            kw = {"do_sample": False} if attempt == 0 else {"do_sample": True, "temperature": 0.7, "top_p": 0.95}
            if attempt:
                torch.manual_seed(self.seed + attempt)
            with torch.no_grad():
                gen = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                          max_new_tokens=self.max_new_tokens, pad_token_id=pad, **kw)
            for r in range(len(batch)):
                out.append((self.tokenizer.decode(gen[r, n:], skip_special_tokens=True), None))
        return out


def build_judge(spec: str | None, cache: RatingCache | str | os.PathLike | None | bool = True) -> Judge | None:
    """`--judge` values: none | openai | openai:MODEL | hf:PATH_OR_HUB_ID."""
    if spec is None or spec in ("", "none"):
        return None
    if spec == "openai" or spec.startswith("openai:"):
        model = spec.split(":", 1)[1] if ":" in spec else None
        return OpenAIJudge(model=model or None, cache=cache)
    if spec.startswith("hf:"):
        return HFJudge(spec[3:], cache=cache)
    raise ConfigError(f"unknown judge {spec!r}: use 'openai' (endpoint and key from PESC_JUDGE_BASE_URL / "
                      "PESC_JUDGE_API_KEY), 'openai:MODEL', or 'hf:PATH_OR_HUB_ID'")
