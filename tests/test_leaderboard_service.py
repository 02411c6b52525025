"""The leaderboard's service layer with the real scorer and pre-flight check (no UI)."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from leaderboard.config import LeaderboardConfig
from leaderboard.service import BASELINE_MARK, LeaderboardService
from leaderboard.storage import utcnow
from leaderboard_helpers import GOLD, RESULT, make_zip, malformed_corpus, small_limits, variant
from pesc.errors import PescError
from pesc.metrics import score

TOKEN = "admin-token-for-tests-0123"


@pytest.fixture(scope="module")
def official():
    """The scorer's own numbers for the fixture result, to compare the board against."""
    return score(str(RESULT), str(GOLD), mode="official", workers=1, progress=False)


def make_service(tmp_path, **kw) -> LeaderboardService:
    limits = kw.pop("limits", small_limits())
    cfg = LeaderboardConfig(gold=GOLD, db_url=f"sqlite:///{tmp_path}/lb.db", limits=limits,
                            admin_token=kw.pop("admin_token", TOKEN), **kw)
    return LeaderboardService(cfg)


def test_submit_scores_ranks_and_dedupes(tmp_path, official):
    svc = make_service(tmp_path)
    steps = []
    out = svc.submit(RESULT, "Night Owls", "student-v1", progress=lambda f, m: steps.append((f, m)))
    assert out.ok and out.created and out.code == "accepted", out.message
    assert out.summary["rank"] == 1
    assert out.summary["total"] == pytest.approx(official.metrics["total_no_g"], abs=1e-12)
    assert out.summary["official"]["meteor"] == pytest.approx(official.metrics["meteor"], abs=1e-12)
    assert out.summary["corrected_total"] is not None and out.summary["total_g"] is None
    # progress went forward from reading to done
    fracs = [f for f, _ in steps]
    assert fracs == sorted(fracs) and fracs[-1] == 1.0
    assert any("official" in m for _, m in steps) and any("corrected" in m for _, m in steps)
    before = svc.store.counts()
    # the same result.json again, bare and inside a zip, by another team: one entry, no quota used
    again = svc.submit(RESULT, "Someone Else", "copy")
    z = make_zip(tmp_path / "sub.zip", [("sub/result.json", RESULT.read_bytes()),
                                       ("sub/README.md", b"our code")])
    zipped = svc.submit(z, "Night Owls", "student-v1-zip")
    for o in (again, zipped):
        assert o.ok and not o.created and o.code == "duplicate"
        assert o.submission_id == out.submission_id
        assert f"#{out.submission_id}" in o.message and "Night Owls" in o.message
    assert svc.store.counts() == before
    board = svc.board()
    assert list(board["team"]) == ["Night Owls"]
    assert board.iloc[0]["total (no G)"] == round(100 * official.metrics["total_no_g"], 2)
    assert board.iloc[0]["METEOR"] == round(100 * official.metrics["meteor"], 2)
    svc.close()


def test_daily_limit_per_team_per_utc_day(tmp_path):
    svc = make_service(tmp_path, limits=small_limits(per_team_per_day=2))
    day = dt.datetime(2025, 6, 1, 10, 0)
    assert svc.submit(variant(1), "Team Q", "a", now=day).created
    assert svc.submit(variant(2), "team q", "b", now=day).created     # same team, other case
    before = svc.store.counts()
    third = svc.submit(variant(3), "TEAM Q", "c", now=day + dt.timedelta(hours=13))
    assert not third.ok and third.code == "daily_limit"
    assert "used its 2 submissions for today (UTC)" in third.message
    assert svc.store.counts() == before
    # another team is not affected, and the next UTC day the team may submit again
    assert svc.submit(variant(3), "Team R", "c", now=day).created
    assert svc.submit(variant(4), "Team Q", "d", now=day + dt.timedelta(days=1)).created
    svc.close()


def test_malformed_corpus_is_rejected_and_changes_nothing(tmp_path):
    limits = small_limits(per_team_per_day=1)
    svc = make_service(tmp_path, limits=limits)
    # one accepted submission so that the daily-limit case has something to count
    assert svc.submit(variant(50), "Full Team", "v", now=utcnow()).created
    cases = malformed_corpus(tmp_path / "corpus", limits)
    from leaderboard_helpers import Case
    cases.append(Case("limit.json", RESULT, "daily_limit", "used its 1 submission", team="Full Team"))
    for case in cases:
        before = svc.store.counts()
        out = svc.submit(case.path, case.team, case.system, case.model_ref)
        assert not out.ok, case.name
        assert out.code == case.code, (case.name, out.code, out.message)
        assert case.fragment in out.message, (case.name, out.message)
        assert svc.store.counts() == before, case.name
    # the pre-flight case lists every problem with its dialogue id and turn
    pre = next(c for c in cases if c.code == "preflight")
    out = svc.submit(pre.path, "x team", "y")
    where = {(p["dialogue_id"], p["turn"], p["code"]) for p in out.problems}
    assert ("9001", 3, "empty_reply") in where and ("9001", 4, "seeker_changed") in where
    assert len(svc.board()) == 1
    svc.close()


def test_submission_detail_respects_reference_access(tmp_path, official):
    for access in ("none", "scores", "full"):
        svc = make_service(tmp_path / access, reference_access=access)
        sid = svc.submit(RESULT, "Team D", "s").submission_id
        d = svc.detail(sid)
        assert d["reference_access"] == access and d["rank"] == 1
        if access == "none":
            assert d["per_turn"] == []
            continue
        assert len(d["per_turn"]) == 30
        has_ref = {"reference" in t for t in d["per_turn"]}
        assert has_ref == {access == "full"}
        # worst first, and the values are the scorer's per-turn numbers
        scores = [t["turn_score"] for t in d["per_turn"]]
        assert scores == sorted(scores)
        by_key = {(r["dialogue_id"], r["turn"]): r for r in official.per_turn}
        worst = d["per_turn"][0]
        ref = by_key[(worst["dialogue_id"], worst["turn"])]
        assert worst["meteor"] == pytest.approx(ref["meteor"], abs=1e-12)
        assert worst["prediction"] == ref["prediction"] and worst["seeker"] == ref["input"]
        expected = (0.2 * ref["meteor"] + 0.2 * ref["bleu4"] + 0.2 * ref["rougeL"]
                    + 0.1 * ref["extrema"]) / 0.7
        assert worst["turn_score"] == pytest.approx(expected, abs=1e-12)
        # the admin always sees the references
        assert "reference" in svc.detail(sid, admin=True)["per_turn"][0]
        svc.close()


def test_baselines_are_marked_rows_and_flagged(tmp_path):
    svc = make_service(tmp_path)
    ids = svc.ensure_baselines()
    assert len(ids) == 4 and svc.ensure_baselines() == ids          # idempotent
    svc.submit(RESULT, "Team B", "real")
    board = svc.board()
    assert list(board["rank"]).count(BASELINE_MARK) == 4
    totals = dict(zip(board["system"], board["total (no G)"]))
    assert totals["gold"] == max(totals.values())
    assert totals["generic"] == min(totals.values())
    assert totals["real"] > totals["echo"] and totals["real"] > totals["random"]
    flags = dict(zip(board["system"], board["flags"]))
    assert "copied_seeker" in flags["echo"] and "repeated_reply" in flags["generic"]
    assert flags["real"] == ""
    team_rows = board[board["rank"] != BASELINE_MARK]
    assert list(team_rows["rank"]) == ["1"]
    assert list(svc.board(include_baselines=False)["system"]) == ["real"]
    assert set(svc.board(flagged="flagged")["system"]) == {"echo", "generic"}
    assert "real" in set(svc.board(flagged="unflagged")["system"])
    assert list(svc.board(query="team b")["system"]) == ["real"]
    cols = svc.board(columns=["METEOR"]).columns.tolist()
    assert cols == ["rank", "team", "system", "METEOR"]
    csv = svc.board_csv(tmp_path / "b.csv")
    assert csv.read_text().splitlines()[0].startswith("rank,id,team,system,date,total (no G)")
    assert len(csv.read_text().splitlines()) == 6
    top = svc.top_metrics(3)
    assert set(top["entry"]) == {f"#{svc.board(query='real').iloc[0]['id']} Team B/real"}
    # uploading a baseline's file is a duplicate of the baseline, not a new entry
    base_file = svc.store.blob(svc.store.get(ids[3], with_turns=False)["result_sha"])
    dup = svc.submit(base_file, "Team C", "sneaky")
    assert dup.code == "duplicate" and "baseline" in dup.message
    svc.close()


def test_admin_hide_delete_rescore(tmp_path, monkeypatch):
    svc = make_service(tmp_path, admin_token=None)
    sid = svc.submit(RESULT, "Team E", "s").submission_id
    with pytest.raises(PescError, match="disabled"):
        svc.admin("anything", "hide", sid)
    svc.close()
    svc = make_service(tmp_path)
    with pytest.raises(PescError, match="invalid admin token"):
        svc.admin("wrong-token-wrong-token", "hide", sid)
    with pytest.raises(PescError, match="no submission #999"):
        svc.admin(TOKEN, "hide", 999)
    assert "hidden" in svc.admin(TOKEN, "hide", sid)
    assert svc.board().empty and svc.detail(sid) is None
    assert svc.detail(sid, admin=True)["id"] == sid
    svc.admin(TOKEN, "unhide", sid)
    assert list(svc.board()["id"]) == [sid]
    # re-scoring recomputes from the stored file: same numbers, new timestamp
    before = svc.store.get(sid, with_turns=False)
    assert "re-scored" in svc.admin(TOKEN, "rescore", sid)
    after = svc.store.get(sid, with_turns=False)
    assert after["total"] == pytest.approx(before["total"], abs=1e-15)
    assert after["scored_at"] >= before["scored_at"]
    sid2 = svc.submit(variant(7), "Team E", "t").submission_id
    assert "re-scored 2" in svc.admin(TOKEN, "rescore_all")
    assert "deleted" in svc.admin(TOKEN, "delete", sid)
    assert svc.store.get(sid) is None and list(svc.board()["id"]) == [sid2]
    actions = [a["action"] for a in svc.store.audit_log()]
    assert actions == ["delete", "rescore_all", "rescore", "unhide", "hide"]
    svc.close()


def test_model_reference_without_teacher_records_why_no_kl(tmp_path):
    svc = make_service(tmp_path)
    out = svc.submit(RESULT, "Team K", "s", model_ref="someone/student-135m")
    row = svc.store.get(out.submission_id, with_turns=False)
    assert row["model_ref"] == "someone/student-135m"
    assert row["kl"] is None and "no KL teacher configured" in row["kl_status"]
    svc.close()


def test_real_validation_file_as_gold(tmp_path, shared_pesc):
    """The real val.json on the server: a degraded copy of the gold scores below the gold baseline
    and exactly as the scorer says."""
    gold = shared_pesc / "val.json"
    cfg = LeaderboardConfig(gold=gold, db_url=f"sqlite:///{tmp_path}/lb.db",
                            limits=small_limits(max_upload_bytes=8 * 2**20, max_json_bytes=8 * 2**20,
                                                max_reply_chars=2000))
    svc = LeaderboardService(cfg)
    obj = json.loads(gold.read_text(encoding="utf-8"))
    for entry in obj.values():   # drop every fifth word of each reply
        entry["whole_dialog"] = [s if not s.startswith("supporter:") else
                                 "supporter:" + " ".join(w for k, w in enumerate(s[10:].split())
                                                         if k % 5 != 4)
                                 for s in entry["whole_dialog"]]
    path = tmp_path / "result.json"
    path.write_text(json.dumps(obj, indent=4), encoding="utf-8")
    out = svc.submit(path, "Real Data", "drop-every-fifth")
    assert out.ok and out.created, out.message
    expect = score(str(path), str(gold), mode="official", workers=1, progress=False)
    row = svc.store.get(out.submission_id)
    assert row["total"] == pytest.approx(expect.metrics["total_no_g"], abs=1e-12)
    assert len(row["per_turn"]) == 1500
    assert 0.3 < row["total"] < 0.9
    # the pre-flight check runs against the gold with blanked supporter turns
    obj[next(iter(obj))]["whole_dialog"][5] = "supporter:"
    path.write_text(json.dumps(obj, indent=4), encoding="utf-8")
    bad = svc.submit(path, "Real Data", "broken")
    assert bad.code == "preflight" and bad.problems[0]["turn"] == 5
    svc.close()


def test_new_gold_file_hides_stale_scores_until_rescored(tmp_path):
    svc = make_service(tmp_path)
    sid = svc.submit(RESULT, "Team S", "s").submission_id
    old_total = svc.store.get(sid, with_turns=False)["total"]
    svc.store.set_kl(sid, None, "pending")          # as if the server stopped during a KL run
    svc.close()
    # the operator edits one reference: a different gold file on the same database
    gold2 = tmp_path / "gold2.json"
    obj = json.loads(GOLD.read_text(encoding="utf-8"))
    obj["9001"]["whole_dialog"][1] = "supporter:Six night shifts is really hard. Are you able to sleep?"
    gold2.write_text(json.dumps(obj, indent=4), encoding="utf-8")
    cfg = LeaderboardConfig(gold=gold2, db_url=f"sqlite:///{tmp_path}/lb.db", limits=small_limits(),
                            admin_token=TOKEN)
    svc2 = LeaderboardService(cfg)
    row = svc2.store.get(sid, with_turns=False)
    assert row["kl_status"].startswith("failed: interrupted by a server restart")
    assert svc2.board().empty and svc2.stale_count() == 1
    assert svc2.detail(sid)["stale"] is True
    svc2.admin(TOKEN, "rescore_all")
    assert svc2.stale_count() == 0
    new_total = svc2.board().iloc[0]["total (no G)"]
    assert new_total != round(100 * old_total, 2)      # the edited reference changed the score
    expect = score(str(RESULT), str(gold2), mode="official", workers=1, progress=False)
    assert new_total == round(100 * expect.metrics["total_no_g"], 2)
    svc2.close()


def test_server_side_failures_store_nothing_and_say_so(tmp_path, monkeypatch):
    from leaderboard import scoring
    from pesc.metrics.offline import ResourceError

    svc = make_service(tmp_path)
    before = svc.store.counts()

    def missing(*a, **k):
        raise ResourceError("WordNet 3.0 not found: apt-get install wordnet-base")

    monkeypatch.setattr(scoring, "score_result", missing)
    out = svc.submit(RESULT, "Team F", "s")
    assert out.code == "server_error" and "WordNet 3.0 not found" in out.message
    assert "tell the organisers" in out.message

    def bug(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(scoring, "score_result", bug)
    out = svc.submit(RESULT, "Team F", "s")
    assert out.code == "internal" and "boom" not in out.message and "nothing was stored" in out.message
    assert svc.store.counts() == before
    monkeypatch.undo()
    assert svc.submit(RESULT, "Team F", "s").created      # the quota was not consumed by failures
    svc.close()


def test_with_a_judge_the_board_ranks_by_the_total_with_g(tmp_path):
    from leaderboard.scoring import baseline_result
    from pesc.metrics.judge import Judge

    class CopyHatingJudge(Judge):
        """Rates 1 when the reply repeats the seeker turn, else 5 (a stand-in for an LLM judge)."""
        identity = "stub-judge"

        def _ask(self, items, attempt):
            return [("1" if it.prediction.strip() == it.input.strip() else "5", None) for it in items]

    plain = make_service(tmp_path / "plain")
    judged = make_service(tmp_path / "judged", judge=CopyHatingJudge(cache=False))
    for svc in (plain, judged):
        for name in ("echo", "random"):
            assert svc.submit(baseline_result(name, svc.gold), f"Team {name}", name).created
    # without G the echo submission edges out the random one; the judge reverses that
    assert list(plain.board()["system"]) == ["echo", "random"]
    board = judged.board()
    assert list(board["system"]) == ["random", "echo"] and list(board["rank"]) == ["1", "2"]
    g = dict(zip(board["system"], board["G-Score"]))
    assert g == {"random": 100.0, "echo": 20.0}
    rows = {r["system"]: r for r in judged.store.list_submissions()}
    for name, r in rows.items():
        assert r["total_g"] == pytest.approx(r["total"] + 0.1 * r["official"]["gscore"], abs=1e-12)
    plain.close()
    judged.close()
