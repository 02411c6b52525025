"""Leaderboard pieces that need no scorer: upload safety, storage, the crisis guard, the chat flow."""

from __future__ import annotations

import datetime as dt
import json
import threading
import zipfile

import pytest

from leaderboard.chat import ChatService, history_turns, parse_profile, profile_text
from leaderboard.config import LeaderboardConfig
from leaderboard.safety import CRISIS_REPLY, crisis_match, is_crisis
from leaderboard.storage import QuotaExceeded, Store, team_key
from leaderboard.uploads import UploadRejected, read_upload, sha256
from leaderboard_helpers import GOLD, RESULT, make_zip, malformed_corpus, small_limits
from pesc.errors import ConfigError, PescError

UPLOAD_LEVEL = {"too_large", "empty", "bad_zip", "unsupported_archive", "path_traversal",
                "absolute_path", "symlink", "special_file", "multiple_results", "no_result",
                "compression_bomb", "nested_archive", "encrypted", "too_many_entries",
                "zip_too_large", "json_too_large", "json_too_deep", "not_utf8", "bad_json",
                "duplicate_key", "bad_shape"}


# ------------------------------------------------------------------ uploads
def test_good_uploads_read_the_same_result(tmp_path):
    limits = small_limits()
    bare = read_upload(RESULT, limits)
    assert bare.kind == "json" and bare.result_bytes == RESULT.read_bytes()
    assert set(bare.result) == {"9001", "9002", "9003"}
    # a packaged submission: result.json in a folder, next to code and a description
    z = make_zip(tmp_path / "sub.zip", [("submission/result.json", RESULT.read_bytes()),
                                       ("submission/code/pesc/__init__.py", b"x = 1\n"),
                                       ("submission/DESCRIPTION.md", b"# our system\n")])
    packed = read_upload(z, limits)
    assert packed.kind == "zip" and packed.result_sha == bare.result_sha
    assert packed.upload_sha == sha256(z.read_bytes()) != packed.result_sha
    assert "submission/DESCRIPTION.md" in packed.members
    # stored (uncompressed) zips and a UTF-8 BOM are fine too
    z2 = make_zip(tmp_path / "stored.zip", [("result.json", RESULT.read_bytes())],
                  compression=zipfile.ZIP_STORED)
    assert read_upload(z2, limits).result == bare.result
    assert read_upload(b"\xef\xbb\xbf" + RESULT.read_bytes(), limits).result == bare.result


def test_every_upload_rule_rejects_with_its_message(tmp_path):
    limits = small_limits()
    cases = [c for c in malformed_corpus(tmp_path, limits) if c.code in UPLOAD_LEVEL]
    assert {c.code for c in cases} == UPLOAD_LEVEL
    for case in cases:
        with pytest.raises(UploadRejected) as ei:
            read_upload(case.path, limits)
        assert ei.value.code == case.code, (case.name, str(ei.value))
        assert case.fragment in str(ei.value), (case.name, str(ei.value))


def test_lying_zip_header_cannot_make_us_read_more(tmp_path):
    """A result.json whose declared size is small but whose data inflates beyond the limit."""
    limits = small_limits(max_json_bytes=4096, ratio_min_bytes=10**9)
    big = b"{" + b" " * 20000 + b"}"
    p = make_zip(tmp_path / "lie.zip", [("result.json", big)])
    raw = bytearray(p.read_bytes())
    # patch the uncompressed size (local header offset 22, central directory entry offset 24)
    cd = raw.rfind(b"PK\x01\x02")
    raw[22:26] = (100).to_bytes(4, "little")
    raw[cd + 24:cd + 28] = (100).to_bytes(4, "little")
    with pytest.raises(UploadRejected) as ei:
        read_upload(bytes(raw), limits)
    assert ei.value.code in {"json_too_large", "bad_zip"}


# ------------------------------------------------------------------ storage
SCORES = {"gold_sha": "g" * 64, "official": {"meteor": 0.3}, "corrected": {}, "total": 0.3,
          "total_g": None, "corrected_total": 0.25, "per_turn": [{"turn": 1}], "flags": [],
          "notes": []}


def _add(store, data: bytes, team="Team A", limit=3, now=None, kind="team"):
    return store.add_submission(result_bytes=data, result_sha=sha256(data), upload_bytes=data,
                                upload_sha=sha256(data), upload_name="result.json", team=team,
                                system="sys", model_ref=None, kind=kind, scores=SCORES,
                                daily_limit=limit, now=now)


def test_store_dedupes_by_content_and_counts_quota_per_utc_day(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/lb.db")
    day1 = dt.datetime(2025, 5, 1, 23, 59)
    a = _add(store, b"one", now=day1)
    again = _add(store, b"one", team="Other team", now=day1)
    assert a.created and not again.created and again.id == a.id
    assert store.counts() == {"blobs": 1, "submissions": 1, "quota": 1, "audit": 0}
    _add(store, b"two", team="  team   a ", now=day1)         # same team, other spelling
    _add(store, b"three", team="TEAM A", now=day1)
    assert store.used_today(team_key("Team A"), day1.date()) == 3
    before = store.counts()
    with pytest.raises(QuotaExceeded):
        _add(store, b"four", now=day1)
    assert store.counts() == before                              # nothing was written
    assert _add(store, b"four", now=day1 + dt.timedelta(minutes=2)).created  # next UTC day
    row = store.get(a.id)
    assert row["per_turn"] == [{"turn": 1}] and row["official"] == {"meteor": 0.3}
    assert store.blob(row["result_sha"]) == b"one"
    # deleting removes the row and its now-unreferenced blob, not the quota
    assert store.delete(a.id)
    assert store.get(a.id) is None and store.blob(sha256(b"one")) is None
    assert store.used_today(team_key("Team A"), day1.date()) == 3
    store.close()


def test_sqlite_is_wal_and_concurrent_writers_do_not_lock(tmp_path):
    url = f"sqlite:///{tmp_path}/lb.db"
    store = Store(url)
    with store.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 30000
    # two Store objects (as two server processes would have) writing from 16 threads at once
    other = Store(url)
    errors, ids = [], []

    def work(i):
        try:
            s = store if i % 2 else other
            ids.append(_add(s, f"payload {i}".encode(), team=f"team {i % 4}", limit=100).id)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(ids)) == 16 and store.counts()["submissions"] == 16
    # the quota is exact under concurrency: 10 threads race for 3 slots of one team
    got, refused = [], []

    def race(i):
        try:
            got.append(_add(other if i % 2 else store, f"race {i}".encode(), team="racers", limit=3))
        except QuotaExceeded:
            refused.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 3 and len(refused) == 7
    store.close()
    other.close()


def test_bad_database_url_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not a database URL"):
        Store("definitely not a url")


def test_config_rejects_short_admin_token_and_bad_access(monkeypatch):
    monkeypatch.setenv("PESC_LEADERBOARD_ADMIN_TOKEN", "short")
    with pytest.raises(ConfigError, match="at least 12"):
        LeaderboardConfig(gold=GOLD)
    monkeypatch.delenv("PESC_LEADERBOARD_ADMIN_TOKEN")
    assert LeaderboardConfig(gold=GOLD).admin_token is None
    with pytest.raises(ConfigError, match="reference access"):
        LeaderboardConfig(gold=GOLD, reference_access="everything")


# ------------------------------------------------------------------ safety
CRISIS = [
    "I want to kill myself",
    "I've been thinking about suicide a lot lately",
    "honestly I just want to die",
    "I don\u2019t want to live anymore",
    "Sometimes I cut myself when it gets bad",
    "I'm going to end my life tonight",
    "everyone would be better off without me",
    "I have been self-harming again",
    "thinking of taking an overdose of my pills",
    "I feel SUICIDAL",
    "there is no reason to live",
    "I plan to jump off the bridge",
]
NOT_CRISIS = [
    "My exam is killing me, I am so stressed",
    "I could kill for a coffee right now",
    "My boss will kill me if I am late",
    "I feel lonely since my husband died",
    "I am dying to see the new film",
    "I want to end this argument with my sister",
    "work is so hard, I just want a holiday",
]


@pytest.mark.parametrize("text", CRISIS)
def test_crisis_messages_are_detected(text):
    assert is_crisis(text), text


@pytest.mark.parametrize("text", NOT_CRISIS)
def test_ordinary_distress_is_not_a_crisis(text):
    assert crisis_match(text) is None, text


def test_crisis_reply_points_to_help():
    for must in ("emergency", "988", "116 123", "findahelpline.com", "112", "911"):
        assert must in CRISIS_REPLY


# ------------------------------------------------------------------ chat
class FakeModel:
    """Records what it was asked and streams a fixed reply word by word."""

    def __init__(self):
        self.calls = []
        self.seen_crisis_before_call = None

    def __call__(self, model_name, profile, turns):
        self.calls.append((model_name, profile, [(t.role, t.text) for t in turns]))
        words = "I hear you and I am here with you".split()
        for i in range(1, len(words) + 1):
            yield " ".join(words[:i])


def test_chat_streams_replies_with_profile_and_history():
    fake = FakeModel()
    chat = ChatService(["tiny"], stream_fn=fake)
    prof = {"Name": "Mara", "Age": "29"}
    updates = list(chat.respond("I had a long night shift.", [], prof, "tiny"))
    assert [u[-1]["content"] for u in updates[:3]] == ["I", "I hear", "I hear you"]
    final = updates[-1]
    assert final == [{"role": "user", "content": "I had a long night shift."},
                     {"role": "assistant", "content": "I hear you and I am here with you"}]
    updates = list(chat.respond("And I cannot sleep.", final, prof, "tiny"))
    name, seen_profile, turns = fake.calls[-1]
    assert name == "tiny" and seen_profile == prof
    assert turns == [("seeker", "I had a long night shift."),
                     ("supporter", "I hear you and I am here with you"),
                     ("seeker", "And I cannot sleep.")]


def test_crisis_reply_comes_before_anything_the_model_says():
    order = []

    def model(name, profile, turns):
        order.append("model called")
        # the model never sees the crisis notice
        assert all(t.text != CRISIS_REPLY for t in turns)
        yield "model words"

    chat = ChatService(["tiny"], stream_fn=model)
    gen = chat.respond("I want to end my life", [], {}, "tiny")
    first = next(gen)
    assert order == []                      # the fixed reply is out before the model is called
    assert first[-1] == {"role": "assistant", "content": CRISIS_REPLY}
    rest = list(gen)
    assert order == ["model called"]
    final = rest[-1]
    assert [m["content"] for m in final] == ["I want to end my life", CRISIS_REPLY, "model words"]
    # and it happens for every crisis message, not only the first of a conversation
    again = list(chat.respond("I still want to die", final, {}, "tiny"))[-1]
    assert again[-2]["content"] == CRISIS_REPLY
    assert [(t.role, t.text) for t in history_turns(again)] == [
        ("seeker", "I want to end my life"), ("supporter", "model words"),
        ("seeker", "I still want to die"), ("supporter", "model words")]


def test_chat_without_model_and_profile_parsing():
    chat = ChatService([])
    out = list(chat.respond("hello", [], {}, None))[-1]
    assert "No chat model is configured" in out[-1]["content"]
    assert parse_profile('{"Name": "Ai", "Age": 67}') == {"Name": "Ai", "Age": "67"}
    assert parse_profile("Name: Ai\nOccupation: Retired teacher") == {"Name": "Ai",
                                                                       "Occupation": "Retired teacher"}
    with pytest.raises(PescError, match="line 1"):
        parse_profile('{"Name": ')
    with pytest.raises(PescError, match="Key: value"):
        parse_profile("just some words")
    prof = json.loads(GOLD.read_text())["9003"]["character"]
    assert json.loads(profile_text(prof)) == prof


def test_a_stalled_model_cannot_hold_the_chat():
    import time

    release = threading.Event()

    def stalls(name, profile, turns):
        yield "Thank you for telling me"
        release.wait(30)          # never returns on its own within the test
        yield "too late"

    chat = ChatService(["m"], stream_fn=stalls, idle_timeout=0.5)
    t0 = time.monotonic()
    final = list(chat.respond("hello", [], {}, "m"))[-1]
    assert time.monotonic() - t0 < 5
    assert final[-1] == {"role": "assistant", "content": "Thank you for telling me"}
    assert chat.idle_stops == 1
    release.set()

    def fails(name, profile, turns):
        yield "partial"
        raise PescError("the prompt does not fit the model")

    final = list(ChatService(["m"], stream_fn=fails).respond("hi", [], {}, "m"))[-1]
    assert final[-1]["content"] == "_The model could not answer: the prompt does not fit the model_"
    # the app's own notes are not fed back to the model as supporter turns
    assert [t.role for t in history_turns(final)] == ["seeker"]


def test_gradio6_message_parts_reach_the_model_as_history():
    fake = FakeModel()
    chat = ChatService(["tiny"], stream_fn=fake)
    history = [{"role": "user", "content": [{"type": "text", "text": "I lost my job."}]},
               {"role": "assistant", "content": [{"type": "text", "text": "That must be a shock."}],
                "metadata": None},
               {"role": "assistant", "content": [{"type": "file", "file": {"path": "x.png"}}]}]
    final = list(chat.respond("What do I do now?", history, {}, "tiny"))[-1]
    assert fake.calls[-1][2] == [("seeker", "I lost my job."), ("supporter", "That must be a shock."),
                                 ("seeker", "What do I do now?")]
    assert final[0] == {"role": "user", "content": "I lost my job."}
