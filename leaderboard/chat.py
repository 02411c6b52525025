"""The chat tab's logic: a profile, a chosen model, streamed replies, and the crisis guard.

Every user message goes through `leaderboard.safety` first. When it expresses self-harm or suicidal
intent, the fixed CRISIS_REPLY is yielded as its own message before the model is even called; the
model's reply (if any) comes after it. The crisis message is never fed back to the model.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from typing import Callable, Iterator

from leaderboard.safety import CRISIS_REPLY, crisis_match
from pesc.data.dialogue import PROFILE_FIELDS, SEEKER, SUPPORTER, Turn, merge_consecutive
from pesc.errors import ConfigError, PescError

log = logging.getLogger("pesc.leaderboard")

Message = dict  # {"role": "user" | "assistant", "content": str}
StreamFn = Callable[..., Iterator[str]]

DEFAULT_OPTIONS = {"max_new_tokens": 96, "do_sample": True, "temperature": 0.7, "top_p": 0.9,
                   "repetition_penalty": 1.1, "max_reply_chars": 1500}
MAX_MESSAGE_CHARS = 2000


def parse_profile(text: str | dict | None) -> dict[str, str]:
    """A profile typed as JSON (an object of strings) or as `Key: value` lines."""
    if isinstance(text, dict):
        obj = text
    else:
        text = (text or "").strip()
        if not text:
            return {}
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise PescError(f"the profile is not valid JSON: {e.msg} (line {e.lineno}, "
                                f"column {e.colno})") from None
        else:
            obj = {}
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                key, colon, value = line.partition(":")
                if not colon:
                    raise PescError(f"profile line {n} must look like 'Key: value', got {line[:40]!r}")
                obj[key.strip()] = value.strip()
    if not isinstance(obj, dict):
        raise PescError("the profile must be an object of text fields")
    out = {}
    for k, v in obj.items():
        if isinstance(v, (dict, list)):
            raise PescError(f"profile field {k!r} must be text")
        out[str(k)] = "" if v is None else str(v)
    return out


def profile_text(profile: dict) -> str:
    """JSON for the editable profile box, in the organisers' field order."""
    keys = [k for k in PROFILE_FIELDS if k in profile] + [k for k in profile if k not in PROFILE_FIELDS]
    return json.dumps({k: profile[k] for k in keys}, indent=2, ensure_ascii=False)


def message_text(content) -> str | None:
    """The text of a chat message's content: a string, or Gradio 6's list of parts
    ([{"type": "text", "text": ...}, ...]; files and components have no text and are skipped)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if isinstance(content, (list, tuple)):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type", "text") == "text"
                 and isinstance(p.get("text"), str)]
        return "\n".join(texts) if texts else None
    return None


def normalise_history(messages) -> list[Message]:
    """Chat history from the UI or the API as [{"role", "content": str}], non-text parts dropped."""
    out = []
    for m in messages or []:
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            continue
        text = message_text(m.get("content"))
        if text is not None:
            out.append({"role": m["role"], "content": text})
    return out


def is_notice(content) -> bool:
    """The crisis reply and the app's own italic notes are not part of the dialogue."""
    return not isinstance(content, str) or content == CRISIS_REPLY or (
        len(content) > 2 and content.startswith("_") and content.endswith("_"))


def history_turns(messages: list[Message]) -> list[Turn]:
    """Chat messages as dialogue turns, without notices (the model never sees them); consecutive
    messages of one speaker are merged into one turn."""
    turns = [Turn(SEEKER if m.get("role") == "user" else SUPPORTER, m["content"])
             for m in messages if not is_notice(m.get("content"))]
    return merge_consecutive(turns)


class ModelPool:
    """Loads chat models lazily (one at a time on CPU) and keeps them."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self._loaded: dict[str, tuple] = {}
        self._lock = threading.Lock()

    def get(self, name: str):
        if name not in self.names:
            raise ConfigError(f"model {name!r} is not offered by this server")
        with self._lock:
            if name not in self._loaded:
                from pesc.models import load_model, load_tokenizer

                self._loaded[name] = (load_model(name, device="cpu"), load_tokenizer(name))
            return self._loaded[name]


def _guarded(stream: Iterator[str], idle_timeout: float) -> Iterator[tuple[str, str]]:
    """Items of `stream` as ("item", text), then ("done", "") or ("idle", "") when no new item came
    for `idle_timeout` seconds. The stream runs in its own thread, so a model that stalls (or a
    generator that does not return after its last token) cannot hold the chat forever."""
    q: queue.Queue = queue.Queue()

    def pump():
        try:
            for x in stream:
                q.put(("item", x))
            q.put(("done", ""))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(("error", e))

    threading.Thread(target=pump, daemon=True, name="chat-stream").start()
    while True:
        try:
            kind, value = q.get(timeout=idle_timeout)
        except queue.Empty:
            yield "idle", ""
            return
        if kind == "error":
            raise value
        yield kind, value
        if kind == "done":
            return


class ChatService:
    def __init__(self, models: list[str], stream_fn: StreamFn | None = None,
                 options: dict | None = None, idle_timeout: float = 30.0):
        self.pool = ModelPool(models)
        self._stream_fn = stream_fn
        self.options = dict(DEFAULT_OPTIONS if options is None else options)
        self.idle_timeout = idle_timeout
        self.idle_stops = 0     # replies ended because the model went quiet (see _guarded)

    @property
    def models(self) -> list[str]:
        return self.pool.names

    def _stream(self, model_name: str, profile: dict, turns: list[Turn]) -> Iterator[str]:
        if self._stream_fn is not None:
            yield from self._stream_fn(model_name, profile, turns)
            return
        from pesc.generation import GenerationOptions, stream_reply

        model, tok = self.pool.get(model_name)
        yield from stream_reply(model, tok, profile, turns, options=GenerationOptions(**self.options))

    def respond(self, message: str, history: list[Message] | None, profile: dict,
                model_name: str | None) -> Iterator[list[Message]]:
        """Yield the growing conversation after `message` (the UI re-renders each yield)."""
        history = normalise_history(history)
        message = (message_text(message) or "").strip()
        if not message:
            yield history
            return
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS]
        history.append({"role": "user", "content": message})
        if crisis_match(message):
            history.append({"role": "assistant", "content": CRISIS_REPLY})
            yield [dict(m) for m in history]
        if not model_name:
            if not self.models:
                history.append({"role": "assistant", "content":
                                "_No chat model is configured on this server (start it with "
                                "`--model PATH`)._"})
            else:
                history.append({"role": "assistant", "content": "_Choose a model first._"})
            yield history
            return
        turns = history_turns(history)
        history.append({"role": "assistant", "content": ""})
        try:
            for kind, partial in _guarded(self._stream(model_name, profile, turns), self.idle_timeout):
                if kind == "idle":
                    self.idle_stops += 1
                    log.warning("chat: no new text from %s for %.0f s; reply closed", model_name,
                                self.idle_timeout)
                    break
                if kind == "item":
                    history[-1] = {"role": "assistant", "content": partial}
                    yield [dict(m) for m in history]
        except PescError as e:
            history[-1] = {"role": "assistant", "content": f"_The model could not answer: {e}_"}
            yield history
            return
        if not history[-1]["content"].strip():
            history[-1] = {"role": "assistant", "content": "_(the model gave an empty reply)_"}
        yield history
