"""G-Score judges against a local OpenAI-compatible stub server on 127.0.0.1."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pesc.metrics import score
from pesc.metrics.judge import (SYSTEM_PROMPT, HFJudge, JudgeFatalError, JudgeItem, OpenAIJudge, RatingCache, build_judge,
                                parse_rating, rating_to_score)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "metrics"


class StubState:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []        # (prediction, body) per request
        self.seen = {}            # prediction -> count
        self.status = None        # force every reply to this HTTP status


def _generated(body: dict) -> str:
    user = body["messages"][1]["content"]
    return user.split("Candidate reply: ", 1)[1].split("\n", 1)[0]


def make_handler(state: StubState):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            pred = _generated(body)
            with state.lock:
                state.requests.append((pred, body, self.path, self.headers.get("Authorization")))
                n = state.seen[pred] = state.seen.get(pred, 0) + 1
            if state.status:
                return self._send(state.status, {"error": {"message": "nope"}})
            if pred.startswith("flaky") and n == 1:      # first try: server overloaded
                return self._send(503, {"error": {"message": "overloaded"}})
            if pred.startswith("chatty") and n == 1:     # first try: words instead of a number
                return self._reply("I would say it is quite good")
            if pred.startswith("broken"):                # never a number
                return self._reply("excellent!")
            if pred.startswith("generous"):
                return self._reply("7")                  # clipped to 5
            if pred.startswith("harsh"):
                return self._reply("Score: 0")           # clipped to 1
            return self._reply("4" if "you" in pred.lower() else "2")

        def _reply(self, content):
            self._send(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})

        def _send(self, code, obj):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


@pytest.fixture
def stub():
    state = StubState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()
    server.server_close()


def _judge(stub, tmp_path, **kw):
    return OpenAIJudge(model="stub-judge", base_url=stub.url, api_key="sk-test", backoff=0.01,
                       cache=tmp_path / "ratings.sqlite", **kw)


def test_parse_rating_and_clipping():
    assert parse_rating(" 4 ") == 4.0 and parse_rating("4.5") == 4.5
    assert parse_rating("Score: 3") == 3.0 and parse_rating("3/5") == 3.0 and parse_rating("5.") == 5.0
    assert parse_rating("good") is None and parse_rating("4 or 5") is None and parse_rating("nan") is None
    assert parse_rating(None) is None
    assert [rating_to_score(v) for v in (0, 1, 3, 5, 9)] == [0.2, 0.2, 0.6, 1.0, 1.0]


def test_ratings_retries_failures_and_request_shape(stub, tmp_path):
    judge = _judge(stub, tmp_path)
    items = [JudgeItem("I feel alone", "You are not alone.", p)
             for p in ("you matter", "flaky you", "chatty", "broken", "generous", "harsh", "ok then")]
    res = judge.rate(items)
    assert [r.score for r in res] == [0.8, 0.8, 0.4, None, 1.0, 0.2, 0.4]
    assert [r.rating for r in res] == [4.0, 4.0, 2.0, None, 7.0, 0.0, 2.0]
    assert "not a number" in res[3].error and res[3].reply == "excellent!"
    # flaky: 503 then success (HTTP retry); chatty: bad reply then a number; broken: 1 + 2 retries
    assert stub.seen == {"you matter": 1, "flaky you": 2, "chatty": 2, "broken": 3, "generous": 1,
                         "harsh": 1, "ok then": 1}
    pred, body, path, auth = stub.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
    assert body["model"] == "stub-judge" and body["max_tokens"] == 5
    assert body["messages"][0]["content"] == SYSTEM_PROMPT
    assert "Seeker's message: I feel alone\nReference reply: You are not alone.\nCandidate reply: " in body["messages"][1]["content"]


def test_cache_makes_a_rescore_free(stub, tmp_path):
    items = [JudgeItem("in", "ref", p) for p in ("you a", "b", "broken c")]
    first = _judge(stub, tmp_path).rate(items)
    n = len(stub.requests)
    again = _judge(stub, tmp_path).rate(items)  # a new judge object, same cache file
    assert [r.score for r in again] == [r.score for r in first] == [0.8, 0.4, None]
    assert [r.cached for r in again] == [True, True, False]
    assert len(stub.requests) == n + 3  # only the failed one is asked again (1 + 2 retries)
    assert len(RatingCache(tmp_path / "ratings.sqlite")) == 2
    # another judge model is another cache key
    other = OpenAIJudge(model="other", base_url=stub.url, api_key="k", backoff=0.01,
                        cache=tmp_path / "ratings.sqlite")
    other.rate(items[:1])
    assert stub.requests[-1][1]["model"] == "other"


def test_duplicate_triples_are_asked_once(stub, tmp_path):
    items = [JudgeItem("in", "ref", "you same")] * 4
    res = _judge(stub, tmp_path, concurrency=2).rate(items)
    assert [r.score for r in res] == [0.8] * 4 and stub.seen == {"you same": 1}


def test_auth_error_stops_the_run(stub, tmp_path):
    stub.status = 401
    with pytest.raises(JudgeFatalError, match="API key"):
        _judge(stub, tmp_path).rate([JudgeItem("a", "b", f"c{i}") for i in range(20)])
    assert len(stub.requests) < 20  # it stops instead of trying every pair


def test_persistent_server_errors_become_failures(stub, tmp_path):
    stub.status = 500
    res = _judge(stub, tmp_path, max_retries=2).rate([JudgeItem("a", "b", "c")])
    assert res[0].score is None and "HTTP 500" in res[0].error
    assert len(stub.requests) == 3 * 3  # (1 + 2 HTTP retries) x (1 + 2 reply retries)


def test_key_required_for_remote_endpoints(monkeypatch):
    for k in ("PESC_JUDGE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(Exception, match="PESC_JUDGE_API_KEY"):
        OpenAIJudge(base_url="https://api.example.com/v1", cache=False)
    monkeypatch.setenv("PESC_JUDGE_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("PESC_JUDGE_MODEL", "env-model")
    j = build_judge("openai", cache=False)
    assert j.base_url == "http://127.0.0.1:9/v1" and j.model == "env-model" and j.name == "openai:env-model"
    with pytest.raises(Exception, match="unknown judge"):
        build_judge("gpt5", cache=False)


def test_score_with_judge_reports_g_total_and_failures(stub, tmp_path):
    gold, result = FIXTURES / "gold_small.json", FIXTURES / "result_small.json"
    rep = score(result, gold, judge=_judge(stub, tmp_path), progress=False)
    # the six predictions: "you" appears in 3 of them -> 4, else 2
    preds = [r["prediction"] for r in rep.per_turn]
    expected = [0.8 if "you" in p.lower() else 0.4 for p in preds]
    assert [r["gscore"] for r in rep.per_turn] == expected
    assert rep.metrics["gscore"] == pytest.approx(sum(expected) / 6, abs=1e-12)
    m = rep.metrics
    assert m["total"] == pytest.approx(m["total_no_g"] + 0.1 * m["gscore"], abs=1e-12)
    assert rep.judge == "openai:stub-judge" and rep.gscore_failures == 0
    # the judge saw the seeker turn before each response as the input (official: 'seeker:' removed)
    inputs = {_generated(b): b["messages"][1]["content"].split("Seeker's message: ", 1)[1].split("\n", 1)[0]
              for _, b, _, _ in stub.requests}
    assert inputs[preds[1]] == " My friends all passed on the first try though."


def test_all_judge_failures_leave_g_absent(stub, tmp_path):
    gold = FIXTURES / "gold_small.json"
    obj = json.loads(gold.read_text())
    for d in obj.values():
        d["whole_dialog"][1::2] = ["supporter:broken reply"] * 2
    result = tmp_path / "broken.json"
    result.write_text(json.dumps(obj))
    rep = score(result, gold, judge=_judge(stub, tmp_path), progress=False)
    assert "gscore" not in rep.metrics and "total" not in rep.metrics and "total_no_g" in rep.metrics
    assert rep.gscore_failures == 6
    assert any("judge failed on 6 of 6" in n and "dialogue 9001 turn 1" in n for n in rep.notes)
    assert all(r["gscore"] is None and "not a number" in r["gscore_error"] for r in rep.per_turn)


def test_hf_judge_with_a_random_tiny_model_fails_cleanly(tmp_path):
    """A local model that does not answer with numbers: every pair is a reported failure."""
    from pesc.data.pesc_json import load_pesc
    from pesc.models.smoke import tiny_model, train_tokenizer

    tok = train_tokenizer(load_pesc(FIXTURES / "gold_small.json", expected_turns=None), vocab_size=300)
    model = tiny_model(len(tok), layers=1, hidden=32).eval()
    judge = HFJudge(model, tok, name="tiny-random", max_new_tokens=3, cache=tmp_path / "c.sqlite")
    res = judge.rate([JudgeItem("I feel sad", "I hear you.", "That is hard."),
                      JudgeItem("I lost my job", "That is a shock.", "Sorry to hear that.")])
    assert all(r.score is None and r.error.startswith("not a number") for r in res)
    assert judge.name == "hf:tiny-random"
