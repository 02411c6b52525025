"""The leaderboard's logic, free of any UI: submit, rank, inspect, administer.

The Gradio app (`leaderboard.app`) only calls this class, so tests can drive the same code paths
directly or through the HTTP API.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import re
import threading
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from leaderboard import scoring
from leaderboard.config import ADMIN_TOKEN_ENV, LeaderboardConfig
from leaderboard.storage import QuotaExceeded, Store, team_key, utcnow
from leaderboard.uploads import UploadRejected, parse_result_json, read_upload, sha256
from pesc.errors import PescError
from pesc.metrics.offline import ResourceError

log = logging.getLogger("pesc.leaderboard")

Progress = Callable[[float, str], None]

# Display names of the stored metric keys, in the order of the organisers' table.
METRIC_LABELS = {
    "meteor": "METEOR", "bleu4": "BLEU-4", "rougeL": "ROUGE-L", "extrema": "Extrema",
    "distinct2": "Distinct-2", "distinct3": "Distinct-3", "gscore": "G-Score",
}
BASE_COLUMNS = ["rank", "id", "team", "system", "date"]
SCORE_COLUMNS = ["total (no G)", "total (with G)", "corrected total"]
METRIC_COLUMNS = list(METRIC_LABELS.values())
EXTRA_COLUMNS = ["KL", "flags"]
ALL_COLUMNS = BASE_COLUMNS + SCORE_COLUMNS + METRIC_COLUMNS + EXTRA_COLUMNS
BASELINE_MARK = "◆ baseline"
RESERVED_TEAMS = {"baseline", "baselines", "admin", "organisers", "organizers"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


@dataclass
class SubmitOutcome:
    ok: bool
    message: str
    code: str = "accepted"              # rule code on rejection, "accepted" or "duplicate"
    submission_id: int | None = None
    created: bool = False
    problems: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "code": self.code, "message": self.message,
                "submission_id": self.submission_id, "created": self.created,
                "problems": self.problems, "summary": self.summary}


def _clean_name(value: str | None, what: str, max_chars: int) -> str:
    value = unicodedata.normalize("NFC", " ".join((value or "").split()))
    if not value:
        raise UploadRejected(f"bad_{what}", f"the {what} name is empty; type a {what} name")
    if len(value) > max_chars:
        raise UploadRejected(f"bad_{what}", f"the {what} name is {len(value)} characters; the limit "
                                             f"is {max_chars}")
    if any(unicodedata.category(c)[0] == "C" for c in value):
        raise UploadRejected(f"bad_{what}", f"the {what} name contains control characters")
    return value


def _fmt_pct(x) -> float | None:
    return None if x is None else round(100.0 * float(x), 2)


def compute_kl(teacher_ref: str, student_ref: str, dialogues, *, max_examples: int | None = 300,
               temperature: float = 1.0, max_length: int = 1024) -> dict:
    """KL(teacher || student) per target token (and the per-example-sum convention) on the gold
    supporter turns, teacher-forced, at `temperature`. The two models must share a tokenizer."""
    from pesc.data.examples import build_examples
    from pesc.metrics.kl import teacher_student_kl
    from pesc.models import load_model, load_tokenizer

    tok = load_tokenizer(student_ref)
    teacher_tok = load_tokenizer(teacher_ref)
    if tok.get_vocab() != teacher_tok.get_vocab():
        raise PescError("the model's tokenizer differs from the teacher's; KL needs a shared "
                        "vocabulary")
    examples = build_examples(list(dialogues), tok, max_length)
    if max_examples is not None and len(examples) > max_examples:
        step = len(examples) / max_examples   # an even spread over the dialogues, deterministic
        examples = [examples[int(i * step)] for i in range(max_examples)]
    teacher = load_model(teacher_ref, device="cpu")
    student = load_model(student_ref, device="cpu")
    res = teacher_student_kl(teacher, student, examples, tok.pad_token_id, temperature=temperature,
                             vocab_size=len(tok), progress=False)
    out = res.to_dict()
    out["teacher"] = teacher_ref
    return out


class LeaderboardService:
    def __init__(self, config: LeaderboardConfig, store: Store | None = None, *, warm_up: bool = True):
        """`warm_up` loads the scorer's resources (WordNet, GloVe) now, once, before requests
        arrive in parallel threads."""
        self.config = config
        self.gold = scoring.GoldSet(config.gold)
        self.store = store or Store(config.db_url)
        self._baseline_thread: threading.Thread | None = None
        self._kl_threads: list[threading.Thread] = []
        self._kl_lock = threading.Lock()
        self.baseline_status = "not started" if config.compute_baselines else "off"
        # KL jobs do not survive a restart: say so instead of "pending" forever
        for row in self.store.list_submissions(include_hidden=True):
            if row["kl_status"] == "pending":
                self.store.set_kl(row["id"], None, "failed: interrupted by a server restart "
                                                   "(an admin re-score runs it again)")
        if warm_up:
            scoring.warm_up()

    # ------------------------------------------------------------ submitting
    def submit(self, upload: str | Path | bytes | None, team: str | None, system: str | None,
               model_ref: str | None = None, *, upload_name: str | None = None,
               progress: Progress | None = None, now: dt.datetime | None = None) -> SubmitOutcome:
        """Check, score and store one submission. A rejection changes nothing in the database."""
        def step(frac: float, msg: str):
            if progress is not None:
                progress(frac, msg)

        limits = self.config.limits
        now = now or utcnow()
        try:
            if upload is None or (isinstance(upload, (str, Path)) and not str(upload)):
                raise UploadRejected("missing", "no file was uploaded; choose a .zip or result.json")
            team_name = _clean_name(team, "team", limits.max_name_chars)
            system_name = _clean_name(system, "system", limits.max_name_chars)
            if team_key(team_name) in RESERVED_TEAMS:
                raise UploadRejected("bad_team", f"the team name {team_name!r} is reserved")
            model_ref = self._clean_model_ref(model_ref)
            step(0.02, "reading the upload")
            up = read_upload(upload, limits, name=upload_name)
            existing = self.store.find_by_result_sha(up.result_sha)
            if existing is not None:
                return self._duplicate(existing)
            used = self.store.used_today(team_key(team_name), now.date())
            if used >= limits.per_team_per_day:
                raise self._quota_error(team_name)
            step(0.05, "pre-flight check")
            problems = scoring.preflight(up.result, self.gold, limits.max_reply_chars)
            if problems:
                return SubmitOutcome(False, f"the pre-flight check found {len(problems)} "
                                            f"problem{'s' if len(problems) != 1 else ''}; nothing "
                                            "was stored", code="preflight",
                                     problems=[p.as_dict() for p in problems])
            scores = scoring.score_result(up.result_bytes, self.gold, judge=self.config.judge,
                                          workers=self.config.score_workers,
                                          progress=lambda f, m: step(0.1 + 0.85 * f, m))
            step(0.97, "saving")
            added = self.store.add_submission(
                result_bytes=up.result_bytes, result_sha=up.result_sha, upload_bytes=up.upload_bytes,
                upload_sha=up.upload_sha, upload_name=up.upload_name, team=team_name,
                system=system_name, model_ref=model_ref, kind="team", scores=scores,
                daily_limit=limits.per_team_per_day, now=now)
        except UploadRejected as e:
            return SubmitOutcome(False, str(e), code=e.code)
        except QuotaExceeded:
            return SubmitOutcome(False, str(self._quota_error(team)), code="daily_limit")
        except ResourceError as e:  # the server's fault (WordNet/GloVe missing), not the upload's
            log.error("scoring resource missing: %s", e)
            return SubmitOutcome(False, f"the server cannot score right now ({e}); nothing was "
                                        "stored, please tell the organisers", code="server_error")
        except PescError as e:  # the result parses but is malformed in a way the check let through
            return SubmitOutcome(False, str(e), code="invalid")
        except Exception:  # noqa: BLE001 - a bug must not leave a half-done submission or a trace
            log.exception("submission failed")
            return SubmitOutcome(False, "an internal error stopped the scoring; nothing was stored, "
                                        "please tell the organisers", code="internal")
        if not added.created:
            return self._duplicate(self.store.get(added.id, with_turns=False))
        if model_ref:
            self._schedule_kl(added.id, model_ref)
        step(1.0, "done")
        row = self.store.get(added.id, with_turns=False)
        return SubmitOutcome(True, f"accepted as submission #{added.id}; it is on the board",
                             submission_id=added.id, created=True, summary=self._summary(row))

    def _quota_error(self, team: str) -> UploadRejected:
        n = self.config.limits.per_team_per_day
        tomorrow = (utcnow().date() + dt.timedelta(days=1)).isoformat()
        return UploadRejected("daily_limit", f"team {team!r} has used its {n} submission"
                                             f"{'s' if n != 1 else ''} for today (UTC); the next "
                                             f"one is possible from {tomorrow} 00:00 UTC")

    def _duplicate(self, row: dict) -> SubmitOutcome:
        who = "baseline" if row["kind"] == "baseline" else f"team {row['team']!r}"
        return SubmitOutcome(True, f"this result.json is already on the board as submission "
                                   f"#{row['id']} ({who}, {row['system']!r}); nothing new was stored",
                             code="duplicate", submission_id=row["id"], created=False,
                             summary=self._summary(row))

    def _clean_model_ref(self, ref: str | None) -> str | None:
        ref = (ref or "").strip()
        if not ref:
            return None
        if len(ref) > 512 or any(unicodedata.category(c)[0] == "C" for c in ref):
            raise UploadRejected("bad_model_ref", "the model reference must be a local path or a Hub "
                                                  "id (owner/name) of at most 512 characters")
        if not (_HUB_ID.match(ref) or ref.startswith(("/", "./", "~"))):
            raise UploadRejected("bad_model_ref", f"{ref!r} is neither a Hub id (owner/name) nor a "
                                                  "path on the server")
        return ref

    def _summary(self, row: dict) -> dict:
        return {"id": row["id"], "team": row["team"], "system": row["system"], "kind": row["kind"],
                "total": row["total"], "total_g": row["total_g"],
                "corrected_total": row["corrected_total"], "official": row["official"],
                "corrected": row["corrected"], "flags": row["flags"], "notes": row["notes"],
                "rank": self.rank_of(row["id"])}

    # ------------------------------------------------------------- KL
    def _kl_refusal(self, model_ref: str) -> str | None:
        """Why the server will not compute KL for this model reference (None: it will)."""
        if not self.config.kl_teacher:
            return "not computed: the server has no KL teacher configured"
        if _HUB_ID.match(model_ref) and not Path(model_ref).expanduser().exists():
            return None
        path = Path(model_ref).expanduser().resolve()
        roots = [Path(r).expanduser().resolve() for r in self.config.kl_model_roots]
        if not any(path == r or r in path.parents for r in roots):
            where = ", ".join(str(r) for r in roots) or "none configured"
            return (f"not computed: local models must be under an operator-approved directory "
                    f"({where})")
        if not path.is_dir():
            return f"not computed: {model_ref} is not a model directory on the server"
        return None

    def _schedule_kl(self, sub_id: int, model_ref: str):
        refusal = self._kl_refusal(model_ref)
        if refusal:
            self.store.set_kl(sub_id, None, refusal)
            return
        self.store.set_kl(sub_id, None, "pending")
        t = threading.Thread(target=self._run_kl, args=(sub_id, model_ref), daemon=True,
                             name=f"kl-{sub_id}")
        self._kl_threads.append(t)
        t.start()

    def wait_for_kl(self, timeout: float | None = None):
        """Block until the background KL jobs started so far have finished (tests, shutdown)."""
        for t in list(self._kl_threads):
            t.join(timeout)

    def _run_kl(self, sub_id: int, model_ref: str):
        with self._kl_lock:  # one model pair in memory at a time
            try:
                kl = compute_kl(self.config.kl_teacher, model_ref, self.gold.dialogues,
                                max_examples=self.config.kl_max_examples)
                self.store.set_kl(sub_id, scoring._clean(kl), "done")
            except Exception as e:  # noqa: BLE001 - a failed KL must never break the board
                log.warning("KL for submission %s failed: %s", sub_id, e)
                self.store.set_kl(sub_id, None, f"failed: {e}")

    # ------------------------------------------------------------ baselines
    def ensure_baselines(self, progress: Progress | None = None) -> list[int]:
        """Score and store the sanity baselines for the current gold (idempotent)."""
        ids = []
        for i, name in enumerate(scoring.BASELINES):
            self.baseline_status = f"scoring baseline {name} ({i + 1}/{len(scoring.BASELINES)})"
            if progress:
                progress(i / len(scoring.BASELINES), self.baseline_status)
            data = scoring.baseline_result(name, self.gold)
            sha = sha256(data)
            row = self.store.find_by_result_sha(sha)
            if row is not None and row["gold_sha"] == self.gold.sha:
                ids.append(row["id"])
                continue
            scores = scoring.score_result(data, self.gold, judge=self.config.judge,
                                          workers=self.config.score_workers)
            if row is not None:
                self.store.update_scores(row["id"], scores)
                ids.append(row["id"])
                continue
            added = self.store.add_submission(
                result_bytes=data, result_sha=sha, upload_bytes=data, upload_sha=sha,
                upload_name=f"baseline-{name}.json", team="baseline", system=name, model_ref=None,
                kind="baseline", scores=scores, daily_limit=None)
            ids.append(added.id)
        self.baseline_status = "ready"
        return ids

    def start_baselines(self) -> threading.Thread:
        """Score the baselines in the background (the board shows them when ready)."""
        def run():
            try:
                self.ensure_baselines()
            except Exception as e:  # noqa: BLE001
                log.exception("baselines failed")
                self.baseline_status = f"failed: {e}"

        self._baseline_thread = threading.Thread(target=run, daemon=True, name="baselines")
        self._baseline_thread.start()
        return self._baseline_thread

    # --------------------------------------------------------------- board
    def _rows(self) -> list[dict]:
        return self.store.list_submissions(include_hidden=False, gold_sha=self.gold.sha)

    def stale_count(self) -> int:
        """Visible submissions scored against another gold file (off the board until re-scored)."""
        return sum(1 for r in self.store.list_submissions() if r["gold_sha"] != self.gold.sha)

    def rank_of(self, sub_id: int) -> int | None:
        ranked = [r for r in self._sorted(self._rows()) if r["kind"] == "team"]
        for i, r in enumerate(ranked, 1):
            if r["id"] == sub_id:
                return i
        return None

    @property
    def rank_key(self) -> str:
        """The ranking column: the total with G when the server has a judge, else without G.
        Rows without that number (e.g. scored before the judge was configured) come last."""
        return "total_g" if self.config.judge is not None else "total"

    def _sorted(self, rows: list[dict]) -> list[dict]:
        key = self.rank_key
        return sorted(rows, key=lambda r: (r[key] is None, -(r[key] or 0.0), r["created_at"], r["id"]))

    def board(self, *, include_baselines: bool = True, query: str = "", flagged: str = "all",
              columns: list[str] | None = None) -> pd.DataFrame:
        """The ranked table (metrics x 100). `flagged`: "all", "flagged" or "unflagged"."""
        rows = self._sorted(self._rows())
        out = []
        rank = 0
        q = (query or "").strip().casefold()
        for r in rows:
            if r["kind"] == "team":
                rank += 1
            if r["kind"] == "baseline" and not include_baselines:
                continue
            if q and q not in f"{r['team']} {r['system']} #{r['id']}".casefold():
                continue
            if flagged == "flagged" and not r["flags"]:
                continue
            if flagged == "unflagged" and r["flags"]:
                continue
            out.append(self._board_row(r, rank))
        df = pd.DataFrame(out, columns=ALL_COLUMNS)
        if columns:
            keep = [c for c in ALL_COLUMNS if c in columns or c in ("rank", "team", "system")]
            df = df[keep]
        return df

    def _board_row(self, r: dict, rank: int) -> dict:
        off = r["official"] or {}
        kl_val = (r.get("kl") or {}).get("per_token_mean")
        row = {
            "rank": BASELINE_MARK if r["kind"] == "baseline" else str(rank),
            "id": r["id"], "team": r["team"], "system": r["system"],
            "date": r["created_at"].strftime("%Y-%m-%d %H:%M"),
            "total (no G)": _fmt_pct(r["total"]), "total (with G)": _fmt_pct(r["total_g"]),
            "corrected total": _fmt_pct(r["corrected_total"]),
            "KL": None if kl_val is None else round(float(kl_val), 4),
            "flags": ", ".join(f["code"] for f in r["flags"]) if r["flags"] else "",
        }
        for key, label in METRIC_LABELS.items():
            row[label] = _fmt_pct(off.get(key))
        return row

    def board_csv(self, path: str | Path, **kw) -> Path:
        path = Path(path)
        self.board(**kw).to_csv(path, index=False)
        return path

    def top_metrics(self, n: int = 5) -> pd.DataFrame:
        """Long table (entry, metric, value x 100) of the top n team entries, for the plot."""
        rows = [r for r in self._sorted(self._rows()) if r["kind"] == "team"][:n]
        recs = []
        for r in rows:
            label = f"#{r['id']} {r['team']}/{r['system']}"
            for key, name in METRIC_LABELS.items():
                v = (r["official"] or {}).get(key)
                if v is not None:
                    recs.append({"entry": label, "metric": name, "value": 100.0 * v})
            recs.append({"entry": label, "metric": "total", "value": 100.0 * (r["total"] or 0.0)})
        return pd.DataFrame(recs, columns=["entry", "metric", "value"])

    # ---------------------------------------------------------- submission page
    def detail(self, sub_id: int, *, admin: bool = False) -> dict | None:
        """Everything the submission page shows; reference texts only as the operator allows."""
        row = self.store.get(int(sub_id), with_turns=True)
        if row is None or (row["hidden"] and not admin):
            return None
        access = "full" if admin else self.config.reference_access
        turns = []
        if access != "none":
            for rec in row["per_turn"]:
                t = {k: rec.get(k) for k in ("dialogue_id", "turn", "turn_score", *scoring.TURN_METRICS,
                                             "seeker", "prediction")}
                if access == "full":
                    t["reference"] = rec.get("reference")
                turns.append(t)
            turns.sort(key=lambda t: (t["turn_score"] is None, t["turn_score"] or 0.0,
                                      str(t["dialogue_id"]), t["turn"] or 0))
        row = {k: v for k, v in row.items() if k != "per_turn"}
        row["per_turn"] = turns
        row["reference_access"] = access
        row["rank"] = self.rank_of(row["id"]) if row["kind"] == "team" else None
        row["stale"] = row["gold_sha"] != self.gold.sha
        return row

    # ------------------------------------------------------------- admin
    def admin_enabled(self) -> bool:
        return bool(self.config.admin_token)

    def check_token(self, token: str | None) -> bool:
        if not self.config.admin_token or not token:
            return False
        return hmac.compare_digest(token.encode(), self.config.admin_token.encode())

    def admin(self, token: str | None, action: str, sub_id: int | None = None) -> str:
        """hide | unhide | delete | rescore (one id) | rescore_all. Returns what happened."""
        if not self.admin_enabled():
            raise PescError(f"admin actions are disabled: set ${ADMIN_TOKEN_ENV} when starting "
                            "the server")
        if not self.check_token(token):
            raise PescError("invalid admin token")
        if action == "rescore_all":
            ids = [r["id"] for r in self.store.list_submissions(include_hidden=True)]
            for i in ids:
                self._rescore(i)
            self.store.audit("rescore_all", None, f"{len(ids)} submissions")
            return f"re-scored {len(ids)} submissions against the current gold"
        if sub_id is None:
            raise PescError("give a submission id")
        sub_id = int(sub_id)
        if self.store.get(sub_id, with_turns=False) is None:
            raise PescError(f"no submission #{sub_id}")
        if action in ("hide", "unhide"):
            self.store.set_hidden(sub_id, action == "hide")
            msg = f"submission #{sub_id} is {'hidden' if action == 'hide' else 'visible again'}"
        elif action == "delete":
            self.store.delete(sub_id)
            msg = f"submission #{sub_id} deleted"
        elif action == "rescore":
            self._rescore(sub_id)
            row = self.store.get(sub_id, with_turns=False)
            msg = f"submission #{sub_id} re-scored: total {_fmt_pct(row['total'])}"
        else:
            raise PescError(f"unknown admin action {action!r}")
        self.store.audit(action, sub_id)
        return msg

    def _rescore(self, sub_id: int):
        row = self.store.get(sub_id, with_turns=False)
        data = self.store.blob(row["result_sha"])
        result = parse_result_json(data, self.config.limits)
        problems = scoring.preflight(result, self.gold, self.config.limits.max_reply_chars)
        if problems:
            first = problems[0]
            raise PescError(f"submission #{sub_id} does not fit the current gold ({len(problems)} "
                            f"problems; first: dialogue {first.dialogue_id}, turn {first.turn}: "
                            f"{first.message}); not re-scored")
        scores = scoring.score_result(data, self.gold, judge=self.config.judge,
                                      workers=self.config.score_workers)
        self.store.update_scores(sub_id, scores)
        if row["model_ref"] and row["kl_status"] != "done":
            self._schedule_kl(sub_id, row["model_ref"])

    def close(self):
        self.store.close()

