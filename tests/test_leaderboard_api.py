"""The leaderboard app over HTTP: gradio_client against the running app on 127.0.0.1.

One app (in a thread of this process, random free port) serves the module; a second, stricter one
checks what a submitter may see. Includes the load test (20 concurrent submissions).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import pytest
from gradio_client import Client, handle_file

from leaderboard.app import launch
from leaderboard.chat import ChatService
from leaderboard.config import LeaderboardConfig
from leaderboard.safety import CRISIS_REPLY
from leaderboard.service import BASELINE_MARK, LeaderboardService
from leaderboard_helpers import GOLD, RESULT, free_port, malformed_corpus, small_limits, variant
from pesc.metrics import score

TOKEN = "api-admin-token-0123456789"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke preset's (untrained) teacher and student, built offline from the fixtures."""
    from pesc.data.pesc_json import load_pesc
    from pesc.models.smoke import build_smoke_models

    out = tmp_path_factory.mktemp("smoke")
    teacher, student = build_smoke_models(load_pesc(GOLD), out)
    return {"root": str(out), "teacher": str(teacher), "student": str(student)}


@pytest.fixture(scope="module")
def app(tmp_path_factory, smoke):
    tmp = tmp_path_factory.mktemp("lb")
    limits = small_limits(per_team_per_day=10, max_upload_bytes=256 * 1024)
    cfg = LeaderboardConfig(gold=GOLD, db_url=f"sqlite:///{tmp}/lb.db", limits=limits,
                            reference_access="full", admin_token=TOKEN, models=[smoke["student"]],
                            submit_concurrency=2, kl_teacher=smoke["teacher"],
                            kl_model_roots=[smoke["root"]], kl_max_examples=12)
    service = LeaderboardService(cfg)
    service.ensure_baselines()
    # idle_timeout bounds a reply whose stream stalls; see test_chat_stream_ends_after_last_token
    chat = ChatService(cfg.models, options={"max_new_tokens": 12, "do_sample": False}, idle_timeout=5)
    demo, url = launch(service, chat, host="127.0.0.1", port=free_port(), block=False, quiet=True)
    client = Client(url, verbose=False, download_files=str(tmp / "downloads"))
    yield {"service": service, "url": url, "client": client, "tmp": tmp, "model": smoke["student"],
           "smoke": smoke, "chat": chat}
    demo.close()
    service.close()


def _submit(client, path, team, system, model_ref=""):
    status, _problems, receipt, _sid = client.predict(handle_file(str(path)), team, system, model_ref,
                                                      api_name="/submit")
    return status, receipt


def _frame(update) -> dict:
    """A Dataframe output (a bare value or a component update) as {"headers", "data"}."""
    return update["value"] if "__type__" in update else update


def test_api_endpoints_are_named(app):
    api = app["client"].view_api(print_info=False, return_format="dict")
    assert {"/submit", "/board", "/board_csv", "/submission", "/chat", "/chat_reset", "/admin",
            "/profile"} <= set(api["named_endpoints"])


def test_submit_board_and_submission_page(app):
    client, service = app["client"], app["service"]
    status, receipt = _submit(client, RESULT, "API Team", "api-system")
    assert receipt["ok"] and receipt["created"], receipt
    sid = receipt["submission_id"]
    expect = score(str(RESULT), str(GOLD), mode="official", workers=1, progress=False)
    assert receipt["summary"]["total"] == pytest.approx(expect.metrics["total_no_g"], abs=1e-12)
    assert "Accepted" in status and f"id {sid}" in status
    # the board: our row with the scorer's numbers, baselines as marked rows
    table, _plot, _note = client.predict("", "all", True, ["date", "total (no G)", "METEOR"],
                                         api_name="/board")
    headers, rows = _frame(table)["headers"], _frame(table)["data"]
    assert headers == ["rank", "id", "team", "system", "date", "total (no G)", "METEOR"]
    ours = next(r for r in rows if r[1] == sid)
    assert ours[2] == "API Team" and ours[0] == "1"
    assert ours[5] == round(100 * expect.metrics["total_no_g"], 2)
    assert sum(r[0] == BASELINE_MARK for r in rows) == 4
    # the CSV download
    csv_path = client.predict("API", "all", False, ["total (no G)"], api_name="/board_csv")
    lines = open(csv_path, encoding="utf-8").read().splitlines()
    assert lines[0] == "rank,id,team,system,total (no G)" and len(lines) == 2 and "API Team" in lines[1]
    # the submission page: header with the numbers, flags, per-turn table worst first
    header, flags, turns = client.predict(sid, api_name="/submission")
    turns = _frame(turns)
    assert f"Submission #{sid}" in header and "API Team" in header
    assert f"{100 * expect.metrics['meteor']:.2f}" in header
    assert "Flags" in flags
    t_headers, t_rows = turns["headers"], turns["data"]
    assert t_headers[:3] == ["dialogue", "turn", "turn score"] and t_headers[-1] == "reference"
    assert len(t_rows) == 30
    scores = [r[2] for r in t_rows]
    assert scores == sorted(scores)
    by_key = {(r["dialogue_id"], r["turn"]): r for r in expect.per_turn}
    first = by_key[(t_rows[0][0], t_rows[0][1])]
    assert t_rows[0][-2] == first["prediction"] and t_rows[0][-1] == first["reference"]
    assert service.detail(sid)["per_turn"][0]["turn_score"] * 100 == pytest.approx(t_rows[0][2], abs=0.006)


def test_malformed_uploads_rejected_over_http_and_db_unchanged(app):
    client, service = app["client"], app["service"]
    limits = service.config.limits
    cases = malformed_corpus(app["tmp"] / "corpus", limits)
    for case in cases:
        before = service.store.counts()
        status, receipt = _submit(client, case.path, case.team, case.system, case.model_ref or "")
        assert receipt["ok"] is False, case.name
        assert receipt["code"] == case.code, (case.name, receipt)
        assert case.fragment in receipt["message"] and case.fragment in status, (case.name, status)
        assert service.store.counts() == before, case.name
    # no file at all
    _status, _p, receipt, _ = client.predict(None, "t", "s", "", api_name="/submit")
    assert receipt["code"] == "missing" and "no file was uploaded" in receipt["message"]
    pre = next(c for c in cases if c.code == "preflight")
    _status, problems_update, receipt, _ = client.predict(handle_file(str(pre.path)), "t", "s", "",
                                                          api_name="/submit")
    # the problems are shown as a readable list naming the dialogue and turn
    shown = problems_update["value"] if isinstance(problems_update, dict) else problems_update
    assert "dialogue **9001**, turn **3**" in shown and "empty" in shown


def test_gold_file_is_not_served(app):
    url = app["url"].rstrip("/")
    for path in (f"/gradio_api/file={GOLD.resolve()}", f"/file={GOLD.resolve()}"):
        r = httpx.get(url + path, timeout=10)
        assert r.status_code in (403, 404), (path, r.status_code)
        assert "9001" not in r.text


def test_admin_over_http(app):
    client, service = app["client"], app["service"]
    path = app["tmp"] / "admin_target.json"
    path.write_bytes(variant(31))
    _, receipt = _submit(client, path, "Admin Target", "x")
    sid = receipt["submission_id"]
    assert "invalid admin token" in client.predict("nope-nope-nope", "hide", sid, api_name="/admin")
    assert sid in [r["id"] for r in service.store.list_submissions()]
    assert "hidden" in client.predict(TOKEN, "hide", sid, api_name="/admin")
    table, _, _ = client.predict("", "all", True, [], api_name="/board")
    assert sid not in [r[1] for r in _frame(table)["data"]]
    header, _, _ = client.predict(sid, api_name="/submission")
    assert f"No visible submission #{sid}" in header
    assert "deleted" in client.predict(TOKEN, "delete", sid, api_name="/admin")
    assert service.store.get(sid) is None


def test_kl_of_a_submitted_model(app):
    """KL(teacher || model) is computed in the background and shown on the board and the page."""
    client, service, smoke = app["client"], app["service"], app["smoke"]
    sids = {}
    for k, (ref, team) in enumerate([(smoke["student"], "KL Student"), (smoke["teacher"], "KL Self"),
                                     ("/etc", "KL Outside"), ("nobody/no-such-model", "KL Hub")]):
        path = app["tmp"] / f"kl_{k}.json"
        path.write_bytes(variant(200 + k))
        _, receipt = _submit(client, path, team, "kl", ref)
        assert receipt["ok"], receipt
        sids[team] = receipt["submission_id"]
    service.wait_for_kl(timeout=120)
    rows = {t: service.store.get(i, with_turns=False) for t, i in sids.items()}
    student, self_kl = rows["KL Student"]["kl"], rows["KL Self"]["kl"]
    assert rows["KL Student"]["kl_status"] == "done" and student["n_examples"] == 12
    assert student["per_token_mean"] > 0.01 and student["temperature"] == 1.0
    assert abs(self_kl["per_token_mean"]) < 1e-6          # a model against itself
    assert "operator-approved directory" in rows["KL Outside"]["kl_status"]
    assert rows["KL Hub"]["kl_status"].startswith("failed:")
    table, _, _ = client.predict("KL Student", "all", True, ["KL"], api_name="/board")
    row = _frame(table)["data"][0]
    assert row[-1] == round(student["per_token_mean"], 4)
    header, _, _ = client.predict(sids["KL Student"], api_name="/submission")
    assert f"{student['per_token_mean']:.4f} per token" in header


def _texts(history) -> list[str]:
    """Message texts of a Chatbot value (Gradio 6 sends content as a list of text parts)."""
    from leaderboard.chat import message_text

    return [message_text(m["content"]) for m in history]


def test_chat_streams_and_crisis_reply_comes_first(app):
    client, chat = app["client"], app["chat"]
    profile = client.predict("9002", api_name="/profile")
    assert json.loads(profile)["Name"] == "Tomas Reyes"
    job = client.submit("I failed my exam and feel bad.", [], profile, app["model"], api_name="/chat")
    history, box = job.result(timeout=120)
    texts = _texts(history)
    assert box == "" and texts[0] == "I failed my exam and feel bad."
    assert history[1]["role"] == "assistant" and texts[1].strip() and texts[1] != CRISIS_REPLY
    partials = [_texts(h)[-1] for h, _ in job.outputs() if len(h) == 2]
    assert len(partials) >= 2 and partials[-1] == texts[1]      # streamed, growing reply
    # a crisis message: the fixed reply is streamed out before any model text
    job = client.submit("Honestly I want to kill myself.", history, profile, app["model"],
                        api_name="/chat")
    final, _ = job.result(timeout=120)
    first_with_reply = next(h for h, _ in job.outputs() if len(h) > len(history) + 1)
    assert _texts(first_with_reply)[len(history) + 1] == CRISIS_REPLY
    assert _texts(final)[len(history):len(history) + 2] == ["Honestly I want to kill myself.",
                                                             CRISIS_REPLY]
    assert len(final) == len(history) + 3 and _texts(final)[-1].strip()   # then the model
    assert client.predict(api_name="/chat_reset") == ([], "")


def test_chat_stream_ends_after_last_token(smoke):
    """The chat relies on pesc.generation.stream_reply returning once the reply is complete (here:
    after max_new_tokens). A stream that keeps the generator open would hold the one chat slot until
    the idle guard gives up."""
    import threading

    from pesc.data.dialogue import Turn
    from pesc.generation import GenerationOptions, stream_reply
    from pesc.models import load_model, load_tokenizer

    model, tok = load_model(smoke["student"], device="cpu"), load_tokenizer(smoke["student"])
    parts, done = [], threading.Event()

    def run():
        for x in stream_reply(model, tok, {"Name": "Ai"}, [Turn("seeker", "I feel alone.")],
                              options=GenerationOptions(max_new_tokens=6, do_sample=False)):
            parts.append(x)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(30), (f"stream_reply yielded {parts!r} but did not return within 30 s after "
                           "its last token (it waits on the exhausted TextIteratorStreamer)")
    assert parts and parts[-1].strip()


def test_references_hidden_when_operator_says_so(tmp_path):
    cfg = LeaderboardConfig(gold=GOLD, db_url=f"sqlite:///{tmp_path}/lb.db", limits=small_limits(),
                            reference_access="scores", compute_baselines=False)
    service = LeaderboardService(cfg, warm_up=False)
    demo, url = launch(service, ChatService([]), host="127.0.0.1", port=free_port(), block=False,
                       quiet=True)
    try:
        client = Client(url, verbose=False, download_files=str(tmp_path / "dl"))
        _, receipt = _submit(client, RESULT, "Private", "p")
        header, flags, turns = client.predict(receipt["submission_id"], api_name="/submission")
        turns = _frame(turns)
        assert "reference" not in turns["headers"] and len(turns["data"]) == 30
        gold_refs = {s[len("supporter:"):] for e in json.loads(GOLD.read_text()).values()
                     for s in e["whole_dialog"] if s.startswith("supporter:")}
        shown = json.dumps([header, flags, turns])
        assert not any(ref in shown for ref in gold_refs)
        assert "not disclosed" in flags
    finally:
        demo.close()
        service.close()


def test_load_20_concurrent_submissions(app, capsys):
    """20 distinct submissions from 5 teams at once through the client: all stored and ranked, no
    database lock errors. Prints throughput and the worst latency."""
    client, service = app["client"], app["service"]
    before = service.store.counts()["submissions"]
    files = []
    for k in range(20):
        p = app["tmp"] / f"load_{k}.json"
        p.write_bytes(variant(100 + k))
        files.append(p)

    def one(k):
        t0 = time.perf_counter()
        _, receipt = _submit(client, files[k], f"Load Team {k % 5}", f"sys-{k}")
        return receipt, time.perf_counter() - t0

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=20) as ex:
        results = list(ex.map(one, range(20)))
    wall = time.perf_counter() - t0
    receipts = [r for r, _ in results]
    latencies = [lat for _, lat in results]
    bad = [r for r in receipts if not (r["ok"] and r["created"])]
    assert bad == [], bad
    assert not any("locked" in r["message"].lower() for r in receipts)
    ids = {r["submission_id"] for r in receipts}
    assert len(ids) == 20
    assert service.store.counts()["submissions"] == before + 20
    board = service.board(include_baselines=False)
    ranked = board[board["id"].isin(ids)]
    assert len(ranked) == 20 and ranked["rank"].map(int).is_monotonic_increasing
    totals = ranked["total (no G)"].tolist()
    assert totals == sorted(totals, reverse=True)
    with capsys.disabled():
        print(f"\nload test: 20 concurrent submissions in {wall:.2f} s = {20 / wall:.2f} submissions/s; "
              f"worst latency {max(latencies):.2f} s, median {sorted(latencies)[10]:.2f} s")


def test_cli_serve_in_a_subprocess(tmp_path):
    """`pesc leaderboard serve` starts the app; the baselines appear on the board by themselves."""
    import subprocess
    import sys

    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pesc", "leaderboard", "serve", "--gold", str(GOLD),
                             "--db", f"sqlite:///{tmp_path}/cli.db", "--port", str(port),
                             "--per-team-per-day", "2"], stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 120
        rows = []
        while time.time() < deadline:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    client = Client(url, verbose=False, download_files=str(tmp_path / "dl"))
                    table, _, _ = client.predict("", "all", True, [], api_name="/board")
                    rows = _frame(table)["data"]
                    if len(rows) == 4:
                        break
            except (httpx.HTTPError, OSError):
                pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(1)
        assert sorted(r[3] for r in rows) == ["echo", "generic", "gold", "random"]
        about_rules = "At most **2** accepted submissions"
        page = httpx.get(url + "config", timeout=10).text
        assert about_rules in page
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_cli_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pesc", "leaderboard", "serve", "--gold",
                        str(tmp_path / "missing.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"pesc leaderboard: error: {tmp_path / 'missing.json'}: gold file not found"]
    r = subprocess.run([sys.executable, "-m", "pesc", "leaderboard", "serve", "--gold", str(GOLD),
                        "--db", "nonsense"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a database URL" in r.stderr and "Traceback" not in r.stderr
