"""Persona-aware, turn-by-turn generation of supporter turns.

One module serves the submission builder, the scorer's KL runs and the app's chat:

- `generate_dialogues` fills every supporter turn of a list of dialogues. Turn k of every dialogue
  goes through the model in batches (KV cache on), so 150 dialogues of 10 supporter turns cost
  about 10-20 rounds of `model.generate` instead of 1,500. Turn k sees the profile, the seeker
  turns so far and the model's own earlier replies (or the gold replies with
  `use_gold_history=True`), rendered by `pesc.data.examples.render_prompt` with `fit_prompt`'s
  truncation, the same renderer training uses.
- `stream_reply` / `generate_reply` answer one chat history (the Gradio chat).

Speed (see benchmarks/generation.py):
- Prefix reuse (`PrefixCache`): turn k+1's prompt extends turn k's, so each dialogue keeps the KV
  of its last prompt and only the new tokens (reply + next seeker turn) are run. Rows are laid
  out as [pad | reused | pad | new] so rows with different reuse share one forward pass.
- Rows are ordered by how many tokens they must run, then by length, so batches are dense;
  a row whose history was cut (prompt over budget) runs in a batch of its own kind.
- `generate` runs in rounds: when an eighth of the rows have finished, they leave the batch and
  the rest continue from the cache, instead of riding along until the longest reply ends.
- The KV cache is preallocated (StaticCache), so decoding writes in place.

Decoding: options not given in `GenerationOptions` come from the model's `generation_config`
(greedy when it says nothing). Sampling is done by `RowSampler`, which draws each row's random
numbers from a counter-based generator keyed by (seed, dialogue id, turn, attempt, step): a reply
does not depend on which other dialogues share its batch, so a resumed run reproduces the
uninterrupted one.

Cleaning (`clean_reply`): the prompt is never decoded (only the new tokens are); a leading role tag
("Supporter:", "assistant") and a leading echo of the seeker's last turn are stripped; the reply is
cut where the model starts a new turn (a special token such as <|im_end|> or <|im_start|>, or a
role tag such as "Seeker:"); other special tokens are removed; whitespace, newlines included, is
collapsed to single spaces; an optional character cap cuts at a sentence end.

Empty replies: a reply that is empty after cleaning is regenerated once with sampling (end and
special tokens banned at its first step). If that is empty too, `FALLBACK_REPLY` is written and the
turn is reported as a `GenerationProblem` with code "fallback" (also logged and stored in the
checkpoint). A turn is never written empty.

Resumable: with `checkpoint_path`, the texts generated so far and the batch layout are saved
atomically every `checkpoint_every` dialogues' worth of turns (and at the end). A killed run
restarted with the same arguments reloads them, replays the prompt prefills of the finished
batches (no decoding) to rebuild the prefix cache exactly, and continues: the result is identical
to an uninterrupted run. A checkpoint written for other inputs, model or options is ignored with a
warning and overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from pesc.data.dialogue import SEEKER, SUPPORTER, Dialogue, Turn
from pesc.data.examples import render_prompt
from pesc.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128
# Prompt budget when neither the options nor the model say otherwise: the training default
# max_length (pesc.data.examples.build_examples), so generation sees what training saw.
DEFAULT_MAX_PROMPT_TOKENS = 1024
# Sampling used to regenerate an empty reply when the main decoding is greedy.
REGEN_TEMPERATURE = 0.8
REGEN_TOP_P = 0.95
# What is written when a reply is still empty after regeneration. It is a complete, neutral
# supporter turn so the file stays valid, and every use is reported (code "fallback").
FALLBACK_REPLY = ("I'm here with you. Could you tell me a bit more about how you are feeling "
                  "right now?")
# Memory the automatic batch size plans for: a fixed budget (not the currently free memory) so
# that batch layout, hence the output, is the same on every run. OOM still halves it.
AUTO_BATCH_BUDGET_CPU = 2 * 1024 ** 3
AUTO_BATCH_FRACTION_CUDA = 0.4
AUTO_BATCH_MAX = 256
# Memory for the per-dialogue prompt KV kept from one turn to the next (PrefixCache): this
# fraction of the machine's RAM (at least 1 GiB), or of the GPU's memory.
PREFIX_STORE_FRACTION_CPU = 0.25
PREFIX_STORE_FRACTION_CUDA = 0.25
# A generate round ends when this fraction of its rows has finished (they leave the batch).
PRUNE_FRACTION = 0.125
# Rows whose number of tokens to run differs by this band or more go to different batches.
PREFIX_BAND = 128

# Seconds the chat waits for the next streamed token before giving up.
STREAM_TIMEOUT = 300
# Tokens that end a turn in common chat formats; those present in a vocabulary stop generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>",
                      "</s>", "<|end_of_text|>")
# Markers that are not always registered as special tokens but never belong in a reply.
KNOWN_MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|begin_of_text|>", "<|end_of_text|>",
                 "<|user|>", "<|assistant|>", "<|system|>", "<|pad|>", "<start_of_turn>",
                 "<end_of_turn>", "<s>", "</s>", "<unk>", "<pad>", "[INST]", "[/INST]")
# Markers that remain unknown special-like tokens: anything shaped like <|...|>.
_SPECIAL_SHAPE = re.compile(r"<\|[^<>|\s]{1,40}\|>")
# A new turn begins: a PESC role tag anywhere, or a chat role tag at the start of a line.
_NEW_TURN = re.compile(r"\b(?:seeker|supporter)\s*:|^[ \t]*(?:user|assistant|system|human)[ \t]*:",
                       re.IGNORECASE | re.MULTILINE)
_LEADING_ROLE = re.compile(r"^\s*(?:supporter|assistant)\s*(?::|\n)\s*", re.IGNORECASE)


# ------------------------------------------------------------------------------------------------
# options

@dataclass
class GenerationOptions:
    """Decoding options; None means "what the model's generation_config says"."""

    max_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    # Rows per `model.generate` call: an int, or "auto" (planned from the model size and prompt
    # length against a fixed memory budget). Halved on out-of-memory either way.
    batch_size: int | str = "auto"
    # Prompt budget in tokens; older history is dropped in seeker/supporter pairs to fit.
    max_prompt_tokens: int | None = None
    seed: int = 0
    # Cut replies longer than this many characters at a sentence end (the submission cap).
    max_reply_chars: int | None = None
    # Keep each dialogue's prompt KV from turn to turn and run only the new tokens (PrefixCache).
    reuse_prefix: bool = True

    def __post_init__(self):
        def bad(name, value, need):
            raise ConfigError(f"generation option {name}={value!r}: {need}")

        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            bad("max_new_tokens", self.max_new_tokens, "must be a positive integer")
        if self.temperature is not None and not self.temperature >= 0:
            bad("temperature", self.temperature, "must be >= 0 (0 means greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "must be in (0, 1]")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            bad("top_k", self.top_k, "must be a non-negative integer (0 = off)")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            bad("repetition_penalty", self.repetition_penalty, "must be > 0 (1 = off)")
        if isinstance(self.batch_size, str) and self.batch_size != "auto":
            if not self.batch_size.isdigit():
                bad("batch_size", self.batch_size, "must be a positive integer or 'auto'")
            self.batch_size = int(self.batch_size)
        if not isinstance(self.batch_size, str) and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            bad("batch_size", self.batch_size, "must be a positive integer or 'auto'")
        if self.max_prompt_tokens is not None and (not isinstance(self.max_prompt_tokens, int) or self.max_prompt_tokens < 8):
            bad("max_prompt_tokens", self.max_prompt_tokens, "must be an integer >= 8")
        if self.max_reply_chars is not None and (not isinstance(self.max_reply_chars, int) or self.max_reply_chars < 20):
            bad("max_reply_chars", self.max_reply_chars, "must be an integer >= 20")


@dataclass(frozen=True)
class Decoding:
    """GenerationOptions resolved against the model and tokenizer: every value concrete."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    stop_ids: tuple[int, ...]
    pad_id: int
    max_prompt_tokens: int
    seed: int
    max_reply_chars: int | None
    context_limit: int | None = None  # longest prompt the model's context allows with max_new_tokens


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return [int(i) for i in x] if isinstance(x, (list, tuple)) else [int(x)]


def _model_length_limit(model, tokenizer) -> int | None:
    limits = []
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(cfg, "max_position_embeddings", None)
    if isinstance(n, int) and n > 0:
        limits.append(n)
    m = getattr(tokenizer, "model_max_length", None)
    if isinstance(m, int) and 0 < m < 10 ** 7:
        limits.append(m)
    return min(limits) if limits else None


def resolve_decoding(model, tokenizer, options: GenerationOptions | None = None) -> Decoding:
    """Fill unspecified options from `model.generation_config`, then from defaults."""
    o = options or GenerationOptions()
    gc = getattr(model, "generation_config", None)

    def pick(name, default):
        v = getattr(o, name)
        if v is None and gc is not None:
            v = getattr(gc, name, None)
        return default if v is None else v

    max_new = o.max_new_tokens or (gc.max_new_tokens if gc is not None and gc.max_new_tokens else None) \
        or DEFAULT_MAX_NEW_TOKENS
    temperature = float(pick("temperature", 1.0))
    do_sample = bool(pick("do_sample", False)) and temperature > 0
    stop = _as_list(getattr(gc, "eos_token_id", None) if gc is not None else None)
    stop += _as_list(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    stop += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    stop_ids = tuple(dict.fromkeys(stop))
    if not stop_ids:
        raise ConfigError("the tokenizer has no end-of-sequence token; generation could not stop")
    pad = tokenizer.pad_token_id
    if pad is None and gc is not None:
        pad = gc.pad_token_id if isinstance(gc.pad_token_id, int) else None
    pad = stop_ids[0] if pad is None else int(pad)
    limit = _model_length_limit(model, tokenizer)
    if o.max_prompt_tokens is not None:
        budget = o.max_prompt_tokens
        if limit is not None and budget + max_new > limit:
            raise ConfigError(f"max_prompt_tokens {budget} + max_new_tokens {max_new} exceed the model's "
                              f"context of {limit} tokens")
    else:
        budget = DEFAULT_MAX_PROMPT_TOKENS if limit is None else min(DEFAULT_MAX_PROMPT_TOKENS, limit - max_new)
        if budget < 8:
            raise ConfigError(f"max_new_tokens {max_new} leaves no room for a prompt in the model's "
                              f"context of {limit} tokens")
    return Decoding(
        max_new_tokens=int(max_new), do_sample=do_sample, temperature=temperature,
        top_p=float(pick("top_p", 1.0)), top_k=int(pick("top_k", 0) or 0),
        repetition_penalty=float(pick("repetition_penalty", 1.0)), stop_ids=stop_ids, pad_id=pad,
        max_prompt_tokens=int(budget), seed=int(o.seed), max_reply_chars=o.max_reply_chars,
        context_limit=None if limit is None else int(limit - max_new))


# ------------------------------------------------------------------------------------------------
# cleaning

def special_token_strings(tokenizer) -> tuple[str, ...]:
    """Every special/added-special token text of the tokenizer plus the common chat markers."""
    found = set(KNOWN_MARKERS)
    if tokenizer is not None:
        found.update(t for t in getattr(tokenizer, "all_special_tokens", []) if t)
        dec = getattr(tokenizer, "added_tokens_decoder", None) or {}
        found.update(t.content for t in dec.values() if getattr(t, "special", False) and t.content)
    return tuple(sorted(found, key=len, reverse=True))


def _truncate_chars(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    ends = [head.rfind(p) for p in (". ", "! ", "? ")] + [head.rfind(p) for p in ".!?" if head.endswith(p)]
    cut = max(ends)
    if cut >= max_chars // 2:
        return head[: cut + 1].strip()
    space = head.rfind(" ")
    return (head[:space] if space >= max_chars // 2 else head).strip()


def split_reply(text: str, special_tokens: Sequence[str] = KNOWN_MARKERS) -> tuple[str, bool]:
    """(body, ended): the text after leading specials/role tags, up to where a new turn starts.

    `ended` says a stop marker (special token or new-turn role tag) was found after the body.
    """
    specials = sorted(set(special_tokens), key=len, reverse=True)
    s = text
    while True:  # strip any mix of leading specials and role tags
        before = s
        s = s.lstrip()
        for sp in specials:
            if s.startswith(sp):
                s = s[len(sp):]
                break
        s = _LEADING_ROLE.sub("", s, count=1)
        if s == before:
            break
    cut = len(s)
    for sp in specials:
        i = s.find(sp)
        if 0 <= i < cut:
            cut = i
    for pattern in (_SPECIAL_SHAPE, _NEW_TURN):
        m = pattern.search(s)
        if m and m.start() < cut:
            cut = m.start()
    return s[:cut], cut < len(s)


def clean_reply(text: str, special_tokens: Sequence[str] = KNOWN_MARKERS, echo: str | None = None,
                max_chars: int | None = None) -> str:
    """Turn a decoded continuation into one clean supporter line (possibly empty).

    - leading whitespace, special tokens and a role tag ("Supporter:", "assistant\\n") are removed;
    - the text is cut at the first special token or new-turn role tag after that;
    - a leading copy of `echo` (the seeker's last turn) is removed;
    - all whitespace runs, newlines included, become one space;
    - with `max_chars`, a longer reply is cut at the last sentence end (else word) before the cap.
    """
    s = " ".join(split_reply(text, special_tokens)[0].split())
    if echo:
        e = " ".join(echo.split())
        if e and s.startswith(e):
            s = s[len(e):].lstrip(" ,.;:-")
    if max_chars is not None:
        s = _truncate_chars(s, max_chars)
    return s


# ------------------------------------------------------------------------------------------------
# sampling that does not depend on the batch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN  # uint64 arrays wrap modulo 2**64
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform_for(seeds: np.ndarray, step: int) -> np.ndarray:
    """One float64 in [0, 1) per seed, a pure function of (seed, step)."""
    with np.errstate(over="ignore"):
        z = _splitmix64(seeds.astype(np.uint64) ^ _splitmix64(np.full(seeds.shape, step, dtype=np.uint64)))
    return (z >> np.uint64(11)).astype(np.float64) / float(2 ** 53)


def row_seed(seed: int, key: str, turn: int, attempt: int) -> int:
    """A 64-bit seed for one reply: stable across runs, batches and processes."""
    h = hashlib.blake2b(f"{seed}\x00{key}\x00{turn}\x00{attempt}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def _logits_processor_base():
    from transformers import LogitsProcessor

    return LogitsProcessor


class RowSampler(_logits_processor_base()):
    """Samples each row with its own counter-based random numbers (temperature, top-k, top-p).

    Runs after the model's other processors (e.g. repetition penalty) and returns logits that are
    -inf everywhere but the drawn token, so `generate` in greedy mode emits exactly that token.
    `banned_first` token ids are excluded at the first generated position.
    """

    def __init__(self, seeds: Sequence[int], prompt_len: int, temperature: float, top_p: float,
                 top_k: int = 0, banned_first: Sequence[int] = ()):
        self.seeds = np.asarray([int(s) for s in seeds], dtype=np.uint64)
        self.prompt_len = prompt_len
        self.temperature = max(float(temperature), 1e-5)
        self.top_p, self.top_k = float(top_p), int(top_k)
        self.banned_first = torch.tensor(sorted(set(banned_first)), dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_len
        logits = scores.float() / self.temperature
        if step == 0 and len(self.banned_first):
            logits[:, self.banned_first.to(logits.device)] = -float("inf")
        if 0 < self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            drop = (probs.cumsum(-1) - probs) >= self.top_p  # the top token always stays
            sorted_logits = sorted_logits.masked_fill(drop, -float("inf"))
            logits = torch.full_like(logits, -float("inf")).scatter(1, order, sorted_logits)
        probs = torch.softmax(logits, dim=-1).double()
        cdf = probs.cumsum(-1)
        u = torch.from_numpy(uniform_for(self.seeds, step)).to(cdf.device).unsqueeze(1) * cdf[:, -1:]
        idx = torch.searchsorted(cdf, u).clamp_(max=cdf.shape[-1] - 1)
        out = torch.full_like(scores, -float("inf"))
        return out.scatter_(1, idx, 0.0)


# ------------------------------------------------------------------------------------------------
# one batch

@dataclass
class Request:
    """One reply to produce: the prompt ids and what identifies it for seeding and reports."""

    prompt: list[int]
    key: str  # dialogue id (or a chat key)
    turn: int
    echo: str | None = None


@dataclass
class SamplingSpec:
    """How a batch samples (None in its place means greedy)."""

    temperature: float
    top_p: float
    top_k: int
    seeds: list[int]
    banned_first: tuple[int, ...] = ()


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg
                                            or "cannot allocate memory" in msg)


class PrefixCache:
    """Per-dialogue KV cache of the last prompt (minus its final token), reused by the next turn.

    Turn k+1's prompt starts with turn k's prompt, so only the new part (the reply and the next
    seeker turn, ~10% of the prompt) is run through the model; the common prefix is found by
    comparing token ids, so any difference (a cut history, a re-tokenised reply) only shortens
    the reuse. Only the prompt's prefill is stored, never decoding steps, which is what lets a
    resumed run replay it exactly. The store is skipped for a turn whose prompts would take more
    than `budget` bytes, and for models whose cache is not a plain full-attention DynamicCache.
    """

    def __init__(self, model, budget: int):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        self.ids: dict[str, list[int]] = {}
        self.kv: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.budget = budget
        self.reused = self.computed = 0
        try:
            layers = DynamicCache(config=model.config).layers
            self.supported = bool(layers) and all(type(x) is DynamicLayer for x in layers) \
                and not getattr(model.config, "is_encoder_decoder", False)
        except Exception:  # noqa: BLE001 - an unusual model just runs without reuse
            self.supported = False
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = getattr(cfg, "num_attention_heads", 1)
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "hidden_size", 64) // heads
        width = next(model.parameters()).element_size()
        self.bytes_per_token = 2 * getattr(cfg, "num_hidden_layers", 1) * kv_heads * head_dim * width

    def fits(self, prompt_lengths: Sequence[int]) -> bool:
        return self.supported and sum(prompt_lengths) * self.bytes_per_token <= self.budget

    def common_prefix(self, key: str, prompt: list[int]) -> int:
        """Tokens of `prompt` whose KV is stored (at most len(prompt) - 1: the last one is always run)."""
        old = self.ids.get(key)
        if not old:
            return 0
        m = min(len(old), len(prompt) - 1)
        if m <= 0:
            return 0
        diff = torch.as_tensor(old[:m]) != torch.as_tensor(prompt[:m])
        return int(diff.int().argmax()) if bool(diff.any()) else m

    def clear(self) -> None:
        self.ids.clear()
        self.kv.clear()


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions as `generate` derives them from the attention mask (pads get 0)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


def _prefill_layout(model, prompts: list[list[int]], keys: list[str], dec: Decoding, store: PrefixCache):
    """Build ids/mask/cache for a batch that reuses stored prefixes, and run the uncached part.

    Row layout: [pad | reused c_r tokens | pad | new s_r tokens], blocks of width P = max c_r and
    S = max s_r. All but the last column go through one forward pass here (positions follow the
    mask, so the holes are invisible to the model); `generate` then runs the last column and
    decodes. Returns (ids, mask, cache, new_entries) where new_entries are the rows' KV of
    prompt[:-1] to store once the batch succeeds.
    """
    device = next(model.parameters()).device
    B = len(prompts)
    c = [store.common_prefix(k, p) for k, p in zip(keys, prompts)]
    s = [len(p) - ci for p, ci in zip(prompts, c)]
    P, S = max(c), max(s)
    ids = torch.full((B, P + S), dec.pad_id, dtype=torch.long)
    mask = torch.zeros((B, P + S), dtype=torch.long)
    for r, (p, ci, si) in enumerate(zip(prompts, c, s)):
        if ci:
            ids[r, P - ci:P] = torch.as_tensor(p[:ci], dtype=torch.long)
            mask[r, P - ci:P] = 1
        ids[r, P + S - si:] = torch.as_tensor(p[ci:], dtype=torch.long)
        mask[r, P + S - si:] = 1
    ids, mask = ids.to(device), mask.to(device)
    cache = _new_cache(model, P + S + dec.max_new_tokens)
    if P:
        n_layers = len(store.kv[keys[c.index(P)]])
        for li in range(n_layers):
            k0, v0 = store.kv[keys[c.index(P)]][li]
            K = torch.zeros((B, k0.shape[0], P, k0.shape[-1]), dtype=k0.dtype, device=device)
            V = torch.zeros((B, v0.shape[0], P, v0.shape[-1]), dtype=v0.dtype, device=device)
            for r, (key, ci) in enumerate(zip(keys, c)):
                if ci:
                    K[r, :, P - ci:] = store.kv[key][li][0][:, :ci]
                    V[r, :, P - ci:] = store.kv[key][li][1][:, :ci]
            cache.layers[li].update(K, V)
    if S > 1:
        with torch.inference_mode():
            model(input_ids=ids[:, P:P + S - 1], attention_mask=mask[:, :P + S - 1],
                  position_ids=_position_ids(mask)[:, P:P + S - 1], cache=cache, use_cache=True,
                  logits_to_keep=1)
    store.reused += sum(c)
    store.computed += sum(s)
    new_entries = {}
    snap = [(layer.keys, layer.values) for layer in cache.layers]
    for r, (key, p, ci, si) in enumerate(zip(keys, prompts, c, s)):
        kv = []
        for K, V in snap:
            kv.append((torch.cat([K[r, :, P - ci:P], K[r, :, P + S - si:P + S - 1]], dim=1),
                       torch.cat([V[r, :, P - ci:P], V[r, :, P + S - si:P + S - 1]], dim=1)))
        new_entries[key] = (p[:-1], kv)
    return ids, mask, cache, new_entries


class _PruneWhenDone:
    """Stopping criterion that ends a `generate` round once enough rows have finished.

    Finished rows keep costing attention and cache copies until the slowest row ends; stopping the
    round lets the caller drop them and continue the rest from the cache (same tokens, less work).
    """

    def __init__(self, width: int, stop_ids: torch.Tensor, fraction: float):
        self.width, self.stop_ids, self.fraction = width, stop_ids, fraction

    def __call__(self, input_ids, scores, **kwargs):
        B = input_ids.shape[0]
        done = torch.isin(input_ids[:, self.width:], self.stop_ids.to(input_ids.device)).any(1)
        n = int(done.sum())
        stop = 0 < n < B and n >= max(1, int(self.fraction * B))
        return torch.full((B,), stop, dtype=torch.bool, device=input_ids.device)


def _new_cache(model, length: int):
    """A preallocated KV cache of `length` positions: decoding writes in place instead of
    concatenating the whole cache at every step (DynamicCache)."""
    from transformers import DynamicCache, StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=length)
    except Exception:  # noqa: BLE001 - an architecture without a static cache still generates
        return DynamicCache(config=model.config)


def _select_rows(cache, keep: torch.Tensor) -> None:
    """Keep only the rows `keep` of the cache (static layers have no batch selection of their own)."""
    from transformers import DynamicCache

    if isinstance(cache, DynamicCache):
        cache.batch_select_indices(keep)
        return
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            layer.keys = layer.keys.index_select(0, keep.to(layer.keys.device))
            layer.values = layer.values.index_select(0, keep.to(layer.values.device))
            layer.batch_size = layer.keys.shape[0]


def generate_token_batch(model, prompts: list[list[int]], dec: Decoding, *, sampling: SamplingSpec | None = None,
                         store: PrefixCache | None = None, keys: list[str] | None = None) -> list[list[int]]:
    """Batched generation; the new tokens of each row, cut before the first stop id.

    Without `store`: plain left padding. With `store` (and `keys`, one per row): stored prefixes
    are reused (see PrefixCache) and, after success, each row's prompt prefill is stored.
    `model.generate` runs in rounds: when an eighth of the rows have finished, the round stops,
    finished rows leave the batch and the others continue from the cache.
    """
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    device = next(model.parameters()).device
    entries = None
    if store is not None:
        ids, mask, cache, entries = _prefill_layout(model, prompts, keys, dec, store)
    else:
        n = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), n), dec.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), n), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, n - len(p):] = torch.as_tensor(p, dtype=torch.long)
            mask[r, n - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        cache = _new_cache(model, n + dec.max_new_tokens)
    width = ids.shape[1]
    stop_t = torch.tensor(dec.stop_ids, dtype=torch.long)
    prune = _PruneWhenDone(width, stop_t, PRUNE_FRACTION)
    alive = list(range(len(prompts)))
    seeds = list(sampling.seeds) if sampling is not None else None
    result: list[list[int] | None] = [None] * len(prompts)
    seqs = ids
    while True:
        kwargs = {}
        if sampling is not None:
            kwargs["logits_processor"] = LogitsProcessorList([RowSampler(
                seeds, width, sampling.temperature, sampling.top_p, sampling.top_k, sampling.banned_first)])
        cfg = GenerationConfig(max_new_tokens=dec.max_new_tokens - (seqs.shape[1] - width), do_sample=False,
                               num_beams=1, temperature=1.0, top_p=1.0, repetition_penalty=dec.repetition_penalty,
                               eos_token_id=list(dec.stop_ids), pad_token_id=dec.pad_id, use_cache=True,
                               min_new_tokens=0, disable_compile=True)
        with torch.inference_mode():
            out = model.generate(input_ids=seqs, attention_mask=mask, cache=cache, generation_config=cfg,
                                 stopping_criteria=StoppingCriteriaList([prune]), **kwargs)
        new = out[:, width:]
        is_stop = torch.isin(new, stop_t.to(new.device))
        done = is_stop.any(1) | (new.shape[1] >= dec.max_new_tokens)
        first = torch.where(is_stop.any(1), is_stop.int().argmax(1), torch.full_like(done, new.shape[1], dtype=torch.long))
        new_cpu, first = new.cpu(), first.cpu()
        for j in done.nonzero().flatten().tolist():
            result[alive[j]] = new_cpu[j, : int(first[j])].tolist()
        if bool(done.all()):
            break
        keep = (~done).nonzero().flatten()
        _select_rows(cache, keep)
        mask = torch.cat([mask, torch.ones((mask.shape[0], out.shape[1] - mask.shape[1]), dtype=mask.dtype,
                                           device=mask.device)], dim=1)[keep]
        seqs = out[keep]
        kept = keep.tolist()
        alive = [alive[j] for j in kept]
        if seeds is not None:
            seeds = [seeds[j] for j in kept]
    if entries is not None:
        for key, (pid, kv) in entries.items():
            store.ids[key], store.kv[key] = pid, kv
    return result


def _sampling(tokenizer, reqs: list[Request], dec: Decoding, attempt: int) -> SamplingSpec | None:
    """Greedy (None) or the row-keyed sampling of attempt 0 (if the decoding samples) or 1 (regeneration)."""
    if attempt == 0 and not dec.do_sample:
        return None
    seeds = [row_seed(dec.seed, r.key, r.turn, attempt) for r in reqs]
    if attempt == 0:
        return SamplingSpec(dec.temperature, dec.top_p, dec.top_k, seeds)
    return SamplingSpec(dec.temperature if dec.do_sample else REGEN_TEMPERATURE,
                        dec.top_p if dec.do_sample and dec.top_p < 1 else REGEN_TOP_P,
                        dec.top_k if dec.do_sample else 0, seeds,
                        tuple(sorted(set(dec.stop_ids) | set(getattr(tokenizer, "all_special_ids", [])))))


def _replies(model, tokenizer, reqs: list[Request], dec: Decoding, specials: tuple[str, ...],
             attempt: int, store: PrefixCache | None = None) -> list[str]:
    """Generate and clean replies for `reqs`; attempt 0 uses `dec`, attempt 1 samples (regeneration)."""
    toks = generate_token_batch(model, [r.prompt for r in reqs], dec, sampling=_sampling(tokenizer, reqs, dec, attempt),
                                store=store, keys=[r.key for r in reqs] if store is not None else None)
    texts = tokenizer.batch_decode(toks, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return [clean_reply(t, specials, echo=r.echo, max_chars=dec.max_reply_chars) for t, r in zip(texts, reqs)]


@dataclass
class GenerationProblem:
    dialogue_id: str
    turn: int  # index in the dialogue's turns (= position in whole_dialog)
    # "regenerated" (empty, fixed by sampling), "fallback" (FALLBACK_REPLY written), "long_prompt"
    # (the profile and the latest seeker turn alone exceed the prompt budget; see _fit_from)
    code: str
    message: str

    def __str__(self):
        return f"dialogue {self.dialogue_id}, turn {self.turn} [{self.code}]: {self.message}"


def fill_empty(model, tokenizer, reqs: list[Request], texts: list[str], dec: Decoding,
               specials: tuple[str, ...]) -> list[GenerationProblem]:
    """Regenerate the empty entries of `texts` once with sampling; write FALLBACK_REPLY if still empty."""
    problems = []
    empty = [j for j, t in enumerate(texts) if not t]
    if not empty:
        return problems
    again = _replies(model, tokenizer, [reqs[j] for j in empty], dec, specials, 1)
    for j, t in zip(empty, again):
        r = reqs[j]
        if t:
            texts[j] = t
            problems.append(GenerationProblem(r.key, r.turn, "regenerated",
                                              "empty reply; regenerated once with sampling"))
        else:
            texts[j] = FALLBACK_REPLY
            problems.append(GenerationProblem(r.key, r.turn, "fallback",
                                              "empty reply, also when resampled; wrote the fallback reply"))
            log.warning("dialogue %s, turn %s: empty reply twice, wrote the fallback reply", r.key, r.turn)
    return problems


def reply_batch(model, tokenizer, reqs: list[Request], dec: Decoding, specials: tuple[str, ...] | None = None,
                store: PrefixCache | None = None) -> tuple[list[str], list[GenerationProblem]]:
    """Replies for one batch with the empty-reply policy applied: never returns an empty string."""
    specials = specials or special_token_strings(tokenizer)
    texts = _replies(model, tokenizer, reqs, dec, specials, 0, store)
    return texts, fill_empty(model, tokenizer, reqs, texts, dec, specials)


# ------------------------------------------------------------------------------------------------
# batch planning

def _auto_rows(model, prompt_len: int, new_tokens: int) -> int:
    """Rows that fit a fixed memory budget: KV cache + one layer's prefill attention + MLP."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(cfg, "num_hidden_layers", 12)
    heads = getattr(cfg, "num_attention_heads", 12)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", 768)
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    param = next(model.parameters())
    width = param.element_size()
    L = prompt_len + new_tokens
    per_row = (L * 2 * layers * kv_heads * head_dim * width + heads * prompt_len ** 2 * 4
               + prompt_len * inter * 3 * 4 + prompt_len * hidden * 8)
    if param.device.type == "cuda":
        budget = int(torch.cuda.get_device_properties(param.device).total_memory * AUTO_BATCH_FRACTION_CUDA)
    else:
        budget = AUTO_BATCH_BUDGET_CPU
    return int(max(1, min(AUTO_BATCH_MAX, budget // max(per_row, 1))))


# ------------------------------------------------------------------------------------------------
# checkpoint

CHECKPOINT_FORMAT = "pesc-generation-checkpoint"


def _fingerprint(model, tokenizer, dialogues: list[Dialogue], dec: Decoding, use_gold: bool,
                 options: GenerationOptions) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"decoding": asdict(dec), "gold": use_gold, "batch_size": options.batch_size,
                         "reuse": options.reuse_prefix}, sort_keys=True).encode())
    for dl in dialogues:
        turns = [(t.role, t.text if (t.role == SEEKER or use_gold) else "") for t in dl.turns]
        h.update(json.dumps([dl.id, turns, sorted((k, str(v)) for k, v in dl.profile.items())]).encode())
    h.update(json.dumps([getattr(model.config, "_name_or_path", ""), model.config.to_json_string()]).encode())
    with torch.no_grad():
        sums = torch.stack([p.detach().float().sum() for p in model.parameters()])
    h.update(sums.cpu().numpy().tobytes())
    h.update(json.dumps([len(tokenizer), getattr(tokenizer, "chat_template", None) or ""]).encode())
    return h.hexdigest()


def _save_checkpoint(path: Path, fingerprint: str, texts: dict, problems: list[GenerationProblem],
                     layout: dict[int, list[int]], halvings: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    data = {"format": CHECKPOINT_FORMAT, "version": 2, "fingerprint": fingerprint,
            "layout": {str(k): v for k, v in layout.items()}, "halvings": halvings, "texts": texts,
            "problems": [asdict(p) for p in problems]}
    tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _load_checkpoint(path: Path, fingerprint: str, texts: dict):
    """Fill `texts` from the checkpoint; returns (problems, layout, halvings) or None if not this run's."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ok = data.get("format") == CHECKPOINT_FORMAT and data.get("version") == 2 \
            and data.get("fingerprint") == fingerprint
        layout = {int(k): [int(x) for x in v] for k, v in data.get("layout", {}).items()}
        problems = [GenerationProblem(**p) for p in data.get("problems", [])]
        halvings = int(data.get("halvings", 0))
        saved = data["texts"]
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        ok = False
    if not ok:
        log.warning("%s is not a checkpoint of this run (other data, model or options); starting over", path)
        _warn(f"note: {path} belongs to another run (data, model or options differ); starting over")
        return None
    for did, slots in texts.items():
        got = saved.get(did)
        if isinstance(got, list) and len(got) == len(slots):
            slots[:] = [g if isinstance(g, str) and g else None for g in got]
    return problems, layout, halvings


def _warn(msg: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(msg)
    except ImportError:  # pragma: no cover
        print(msg)


# ------------------------------------------------------------------------------------------------
# dialogues

class GenerationResult(list):
    """The filled dialogues (a list) plus `.problems` (GenerationProblem list) and `.stats`."""

    def __init__(self, dialogues, problems=(), stats=None):
        super().__init__(dialogues)
        self.problems: list[GenerationProblem] = list(problems)
        self.stats: dict = dict(stats or {})


def _history(d: Dialogue, upto: int, own: list[str | None], slot_of: dict[int, int], use_gold: bool) -> list[Turn]:
    hist = []
    for i, t in enumerate(d.turns[:upto]):
        if t.role == SUPPORTER and not use_gold:
            hist.append(Turn(SUPPORTER, own[slot_of[i]] or ""))
        else:
            hist.append(t)
    return hist


@dataclass
class FittedPrompt:
    ids: list[int]
    start: int  # index of the first history turn kept
    note: str | None = None  # set when even the shortest prompt is over the budget


def _fit_from(tokenizer, profile: dict, history: list[Turn], budget: int, start: int = 0,
              hard_limit: int | None = None) -> FittedPrompt:
    """`fit_prompt`'s search for the prompt that fits (oldest turns dropped in pairs), begun at `start`.

    Generation passes the start the dialogue's previous turn needed: history only grows at the
    end, so the earlier starts still do not fit and the result is the one `fit_prompt` gives, with
    one or two renderings instead of up to ten. Where training would refuse an example (the profile
    and the latest seeker turn alone exceed the budget), generation still has to answer: it uses
    that shortest prompt whole if the model's context (`hard_limit`) allows, else its last
    `hard_limit` tokens, and says so in `note`.
    """
    candidates, s = [0], 0
    while len(history) - s > 1:
        s += 2 if len(history) - s > 2 else 1
        candidates.append(s)
    s = start if start in candidates else 0
    while True:
        ids = render_prompt(tokenizer, profile, history[s:])
        if len(ids) <= budget:
            return FittedPrompt(ids, s)
        if len(history) - s <= 1:
            break
        s += 2 if len(history) - s > 2 else 1
    if hard_limit is None or len(ids) <= hard_limit:
        return FittedPrompt(ids, s, f"the profile and the latest seeker turn take {len(ids)} tokens, more than "
                                    f"the prompt budget of {budget}; used them whole")
    return FittedPrompt(ids[-hard_limit:], s, f"the profile and the latest seeker turn take {len(ids)} tokens, more "
                                              f"than the model's context leaves ({hard_limit}); kept the last "
                                              f"{hard_limit}")


def _last_seeker(hist: list[Turn]) -> str | None:
    for t in reversed(hist):
        if t.role == SEEKER:
            return t.text
    return None


def _prefix_budget(model) -> int:
    param = next(model.parameters())
    if param.device.type == "cuda":
        return int(torch.cuda.get_device_properties(param.device).total_memory * PREFIX_STORE_FRACTION_CUDA)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 * 1024 ** 3
    return max(1024 ** 3, int(ram * PREFIX_STORE_FRACTION_CPU))


def generate_dialogues(model, tokenizer, dialogues: Sequence[Dialogue], options: GenerationOptions | None = None,
                       use_gold_history: bool = False, checkpoint_path: str | os.PathLike | None = None,
                       checkpoint_every: int = 10, progress: bool = True, *,
                       on_checkpoint: Callable[[int], None] | None = None) -> GenerationResult:
    """Copies of `dialogues` with every supporter turn generated, turn by turn, batched across dialogues.

    Turn k of a dialogue sees its profile, its seeker turns so far and the model's own earlier
    replies (the file's gold replies with `use_gold_history`). Returns a `GenerationResult` (a list
    of Dialogue, in input order) whose `.problems` lists replies that were empty (regenerated, or
    replaced by FALLBACK_REPLY) and `.stats` counts calls, rows and reused prefix tokens.

    With `checkpoint_path`, progress is saved every `checkpoint_every` dialogues' worth of turns
    and a rerun with the same arguments continues from it (same output as an uninterrupted run).
    `on_checkpoint(n_done_turns)` is called after each save (used to test resuming).
    """
    options = options or GenerationOptions()
    dec = resolve_decoding(model, tokenizer, options)
    dialogues = list(dialogues)
    if checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    seen = set()
    for d in dialogues:
        if d.id in seen:
            raise DataError("the same dialogue id appears twice", dialogue_id=d.id)
        seen.add(d.id)
    slots = [d.supporter_indices() for d in dialogues]
    slot_of = [{t: k for k, t in enumerate(s)} for s in slots]
    if use_gold_history:
        for d, s in zip(dialogues, slots):
            for i in s[:-1]:
                if not d.turns[i].text.strip():
                    raise DataError("use_gold_history needs gold supporter turns, this one is blank",
                                    dialogue_id=d.id, turn=i)
    texts: dict[str, list[str | None]] = {d.id: [None] * len(s) for d, s in zip(dialogues, slots)}
    problems: list[GenerationProblem] = []
    layout: dict[int, list[int]] = {}  # step -> row counts of its finished batches, in order
    halvings = 0  # out-of-memory halvings of the batch size so far (kept for the rest of the run)
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    fp = ""
    if ckpt is not None:
        fp = _fingerprint(model, tokenizer, dialogues, dec, use_gold_history, options)
        if ckpt.exists():
            loaded = _load_checkpoint(ckpt, fp, texts)
            if loaded is not None:
                problems, layout, halvings = loaded
    store = PrefixCache(model, _prefix_budget(model)) if options.reuse_prefix else None
    specials = special_token_strings(tokenizer)
    total = sum(len(s) for s in slots)
    done = sum(t is not None for v in texts.values() for t in v)
    turns_per_dialogue = max(1, round(total / max(1, len(dialogues))))
    save_every = checkpoint_every * turns_per_dialogue
    since_save = 0
    stats = {"turns": total, "resumed_turns": done, "generate_calls": 0, "rows": 0, "replayed_batches": 0}

    fit_start: dict[str, int] = {}  # per dialogue, where the last prompt's history began
    noted = {(p.dialogue_id, p.turn, p.code) for p in problems}

    def step_requests(k: int) -> list[tuple[int, Request]]:
        reqs = []
        for r in range(len(dialogues)):
            if k >= len(slots[r]):
                continue
            d, turn = dialogues[r], slots[r][k]
            hist = _history(d, turn, texts[d.id], slot_of[r], use_gold_history)
            fitted = _fit_from(tokenizer, d.profile, hist, dec.max_prompt_tokens, fit_start.get(d.id, 0),
                               dec.context_limit)
            fit_start[d.id] = fitted.start
            if fitted.note and (d.id, turn, "long_prompt") not in noted:
                noted.add((d.id, turn, "long_prompt"))
                problems.append(GenerationProblem(d.id, turn, "long_prompt", fitted.note))
            reqs.append((r, Request(fitted.ids, d.id, turn, _last_seeker(hist))))
        return reqs

    def order(reqs: list[tuple[int, Request]], use_store: bool) -> list[tuple[int, Request, int]]:
        """Deterministic batch order: by band of tokens to run (a prompt whose history was cut
        needs all of it, the others only the new turn), then longest first, then input order.
        Batches never mix bands. With a store the bands depend on it, which a resumed run
        rebuilds exactly before ordering."""
        out = []
        for r, q in reqs:
            todo = len(q.prompt) - (store.common_prefix(q.key, q.prompt) if use_store else 0)
            out.append((r, q, todo // PREFIX_BAND))
        out.sort(key=lambda x: (-x[2], -len(x[1].prompt), x[0]))
        return out

    from tqdm import tqdm

    bar = tqdm(total=total, initial=done, disable=not progress, unit="turn", desc="generating", dynamic_ncols=True)
    try:
        for k in range(max((len(s) for s in slots), default=0)):
            reqs = step_requests(k)
            use_store = store is not None and store.fits([len(q.prompt) for _, q in reqs])
            if store is not None and not use_store:
                store.clear()
            reqs = order(reqs, use_store)
            sizes = layout.setdefault(k, [])
            finished = [texts[q.key][k] is not None for _, q, _ in reqs]
            n_done = sum(sizes)
            if finished != [j < n_done for j in range(len(reqs))]:
                # Not the layout this checkpoint's run used (hand-edited or older file): finish the
                # missing rows anyway; only the bit-exact replay of cached prefixes is given up.
                if n_done or any(finished):
                    _warn(f"note: turn {k + 1}: checkpoint layout does not match; continuing without replay")
                if store is not None:
                    store.clear()
                use_store = False
                sizes.clear()
            elif use_store and n_done:
                pos = 0  # replay the prefill of this turn's finished batches, exactly as they ran
                for size in sizes:
                    chunk = reqs[pos: pos + size]
                    _, _, _, entries = _prefill_layout(model, [q.prompt for _, q, _ in chunk],
                                                       [q.key for _, q, _ in chunk], dec, store)
                    for key, (pid, kv) in entries.items():
                        store.ids[key], store.kv[key] = pid, kv
                    stats["replayed_batches"] += 1
                    pos += size
            pending = [x for x, f in zip(reqs, finished) if not f]
            if not pending:
                continue
            base = _auto_rows(model, max(len(q.prompt) for _, q, _ in reqs), dec.max_new_tokens) \
                if options.batch_size == "auto" else int(options.batch_size)
            bar.set_description(f"generating turn {k + 1}/{len(slots[pending[0][0]])}")
            pos = 0
            while pos < len(pending):
                size = max(1, base >> halvings)
                chunk = [x for x in pending[pos: pos + size] if x[2] == pending[pos][2]]
                try:
                    out, probs = reply_batch(model, tokenizer, [q for _, q, _ in chunk], dec, specials,
                                             store if use_store else None)
                except Exception as e:  # noqa: BLE001 - only OOM is handled, the rest re-raised
                    if not _is_oom(e) or size == 1:
                        raise
                    halvings += 1
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    _warn(f"out of memory with {size} rows per batch; retrying with {max(1, base >> halvings)}")
                    continue
                stats["generate_calls"] += 1
                stats["rows"] += len(chunk)
                for (_, q, _), t in zip(chunk, out):
                    texts[q.key][k] = t
                problems.extend(probs)
                sizes.append(len(chunk))
                pos += len(chunk)
                bar.update(len(chunk))
                since_save += len(chunk)
                if ckpt is not None and since_save >= save_every:
                    _save_checkpoint(ckpt, fp, texts, problems, layout, halvings)
                    since_save = 0
                    if on_checkpoint is not None:
                        on_checkpoint(sum(t is not None for v in texts.values() for t in v))
        if ckpt is not None and since_save:
            _save_checkpoint(ckpt, fp, texts, problems, layout, halvings)
    finally:
        bar.close()
        stats["halvings"] = halvings
        if store is not None:
            stats["prefix_tokens_reused"], stats["prefix_tokens_computed"] = store.reused, store.computed
            store.clear()
    out_dialogues = [d.with_supporter_texts(texts[d.id]) for d in dialogues]
    return GenerationResult(out_dialogues, problems, stats)


# ------------------------------------------------------------------------------------------------
# chat

def _chat_request(tokenizer, profile: dict, history: list[Turn], dec: Decoding) -> Request:
    if history and history[-1].role == SUPPORTER:
        raise ConfigError("the history ends with a supporter turn; the next turn is the seeker's")
    prompt = _fit_from(tokenizer, profile, list(history), dec.max_prompt_tokens, 0, dec.context_limit).ids
    key = "chat:" + hashlib.blake2b(json.dumps([t.text for t in history]).encode(), digest_size=8).hexdigest()
    return Request(prompt, key, len(history), _last_seeker(list(history)))


def generate_reply(model, tokenizer, profile: dict, history: list[Turn],
                   options: GenerationOptions | None = None) -> str:
    """The next supporter turn after `history` (never empty; see the module notes)."""
    dec = resolve_decoding(model, tokenizer, options)
    texts, _ = reply_batch(model, tokenizer, [_chat_request(tokenizer, profile, history, dec)], dec)
    return texts[0]


class _StopFlag:
    """A stopping criterion the consumer can trip (new turn seen, or the stream was closed)."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_reply(model, tokenizer, profile: dict, history: list[Turn],
                 options: GenerationOptions | None = None) -> Iterator[str]:
    """Yield the growing (cleaned) reply as tokens arrive; the last value is the final reply.

    Generation runs in a thread with a `TextIteratorStreamer`. It stops early once the model starts
    a new turn, and when the consumer stops iterating. An empty result is regenerated once with
    sampling, then replaced by FALLBACK_REPLY, as in batch generation.
    """
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList, TextIteratorStreamer

    dec = resolve_decoding(model, tokenizer, options)
    req = _chat_request(tokenizer, profile, history, dec)
    specials = special_token_strings(tokenizer)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=STREAM_TIMEOUT, skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
    stop = _StopFlag()
    device = next(model.parameters()).device
    ids = torch.tensor([req.prompt], dtype=torch.long, device=device)
    cfg = GenerationConfig(max_new_tokens=dec.max_new_tokens, do_sample=False, num_beams=1, temperature=1.0,
                           top_p=1.0, repetition_penalty=dec.repetition_penalty,
                           eos_token_id=list(dec.stop_ids), pad_token_id=dec.pad_id, use_cache=True)
    procs = LogitsProcessorList()
    if dec.do_sample:
        procs.append(RowSampler([row_seed(dec.seed, req.key, req.turn, 0)], len(req.prompt),
                                dec.temperature, dec.top_p, dec.top_k))
    error: list[BaseException] = []

    def run():
        try:
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg,
                               logits_processor=procs, stopping_criteria=StoppingCriteriaList([stop]),
                               streamer=streamer)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            error.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    raw, last, exhausted = "", "", False
    try:
        for piece in streamer:
            raw += piece
            body, ended = split_reply(raw, specials)
            text = clean_reply(body, (), echo=req.echo, max_chars=dec.max_reply_chars)
            if text and text != last:
                last = text
                yield text
            if ended:
                break
        else:
            exhausted = True
    finally:
        stop.event.set()  # stops generation at its next step if we left early
        if not exhausted:
            for _ in streamer:  # drain until the generating thread's end-of-stream
                pass
        thread.join()
    if error:
        raise error[0]
    if not last:
        texts = [""]
        fill_empty(model, tokenizer, [req], texts, dec, specials)
        yield texts[0]
