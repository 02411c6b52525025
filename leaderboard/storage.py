"""The leaderboard's database: SQLAlchemy, SQLite by default, any SQLAlchemy URL otherwise.

Tables
- `blobs`: uploaded files and their result.json, keyed by SHA-256 (content-addressed, stored once);
- `submissions`: one row per distinct result.json (unique hash), its owner and its scores;
- `quota`: accepted submissions per team per UTC day, reserved atomically with the insert;
- `audit`: admin actions.

SQLite runs in WAL mode with a busy timeout, and write transactions start with BEGIN IMMEDIATE, so
concurrent submissions queue for the write lock instead of failing with "database is locked".
"""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, deferred, mapped_column, sessionmaker

from pesc.errors import ConfigError

SQLITE_BUSY_TIMEOUT_S = 60


def utcnow() -> dt.datetime:
    """Naive UTC (what every backend stores the same way)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Blob(Base):
    __tablename__ = "blobs"
    sha256: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    size: Mapped[int] = mapped_column(sa.Integer)
    data: Mapped[bytes] = deferred(mapped_column(sa.LargeBinary))
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime, default=utcnow)


class Submission(Base):
    __tablename__ = "submissions"
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    result_sha: Mapped[str] = mapped_column(sa.String(64), sa.ForeignKey("blobs.sha256"), unique=True)
    upload_sha: Mapped[str] = mapped_column(sa.String(64), sa.ForeignKey("blobs.sha256"))
    upload_name: Mapped[str] = mapped_column(sa.String(255))
    kind: Mapped[str] = mapped_column(sa.String(16), default="team")   # "team" or "baseline"
    team: Mapped[str] = mapped_column(sa.String(128))
    team_key: Mapped[str] = mapped_column(sa.String(128), index=True)
    system: Mapped[str] = mapped_column(sa.String(128))
    model_ref: Mapped[str | None] = mapped_column(sa.String(512), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime, default=utcnow, index=True)
    scored_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime, nullable=True)
    gold_sha: Mapped[str] = mapped_column(sa.String(64))
    scorer_version: Mapped[str] = mapped_column(sa.String(64), default="")
    hidden: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    total: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    total_g: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    corrected_total: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    official: Mapped[dict] = mapped_column(sa.JSON, default=dict)
    corrected: Mapped[dict] = mapped_column(sa.JSON, default=dict)
    flags: Mapped[list] = mapped_column(sa.JSON, default=list)
    notes: Mapped[list] = mapped_column(sa.JSON, default=list)
    kl: Mapped[dict | None] = mapped_column(sa.JSON, nullable=True)
    kl_status: Mapped[str | None] = mapped_column(sa.String(512), nullable=True)
    per_turn: Mapped[list] = deferred(mapped_column(sa.JSON, default=list))


class Quota(Base):
    __tablename__ = "quota"
    team_key: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    day: Mapped[dt.date] = mapped_column(sa.Date, primary_key=True)
    count: Mapped[int] = mapped_column(sa.Integer, default=0)


class AuditEvent(Base):
    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(sa.DateTime, default=utcnow)
    action: Mapped[str] = mapped_column(sa.String(32))
    submission_id: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    detail: Mapped[str] = mapped_column(sa.Text, default="")


SUMMARY_FIELDS = ("id", "kind", "team", "system", "model_ref", "created_at", "scored_at", "gold_sha",
                  "scorer_version", "hidden", "total", "total_g", "corrected_total", "official",
                  "corrected", "flags", "notes", "kl", "kl_status", "upload_name", "result_sha",
                  "upload_sha")


def row_dict(s: Submission, with_turns: bool = False) -> dict:
    d = {k: getattr(s, k) for k in SUMMARY_FIELDS}
    if with_turns:
        d["per_turn"] = s.per_turn
    return d


class QuotaExceeded(Exception):
    def __init__(self, used: int, limit: int):
        self.used, self.limit = used, limit
        super().__init__(f"{used} of {limit} used")


@dataclass
class Added:
    id: int
    created: bool          # False: the same result.json was already stored (that entry's id)


def team_key(team: str) -> str:
    """Quota and grouping key: case-insensitive, whitespace-collapsed."""
    return " ".join(team.split()).casefold()


class Store:
    def __init__(self, url: str):
        self.url = url
        try:
            parsed = sa.engine.make_url(url)
        except sa.exc.ArgumentError:
            raise ConfigError(f"not a database URL: {url!r} (e.g. sqlite:///leaderboard.db)") from None
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self._write_lock = threading.Lock()
        if self.is_sqlite:
            db = parsed.database
            if db and db != ":memory:":
                Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
            kw = dict(connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False})
            self.engine = sa.create_engine(url, **kw)
            self.write_engine = sa.create_engine(url, **kw)
            self._sqlite_setup(self.engine, immediate=False)
            self._sqlite_setup(self.write_engine, immediate=True)
        else:
            self.engine = sa.create_engine(url, pool_pre_ping=True)
            self.write_engine = self.engine
        try:
            Base.metadata.create_all(self.write_engine)
        except sa.exc.OperationalError as e:
            raise ConfigError(f"cannot open the leaderboard database {url!r}: {e.orig}") from None
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self.write_engine, expire_on_commit=False)

    @staticmethod
    def _sqlite_setup(engine, immediate: bool):
        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # let SQLAlchemy's BEGIN below own transactions
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    def writing(self) -> Session:
        return self._write()

    def reading(self) -> Session:
        return self._read()

    def close(self):
        self.engine.dispose()
        if self.write_engine is not self.engine:
            self.write_engine.dispose()

    # ------------------------------------------------------------------ reads
    def counts(self) -> dict[str, int]:
        """Rows per table (tests use this to prove a rejected upload changed nothing)."""
        with self.reading() as s:
            return {t.__tablename__: s.scalar(sa.select(sa.func.count()).select_from(t))
                    for t in (Blob, Submission, Quota, AuditEvent)}

    def find_by_result_sha(self, sha: str) -> dict | None:
        with self.reading() as s:
            sub = s.scalar(sa.select(Submission).where(Submission.result_sha == sha))
            return row_dict(sub) if sub else None

    def used_today(self, key: str, day: dt.date) -> int:
        with self.reading() as s:
            q = s.get(Quota, (key, day))
            return q.count if q else 0

    def list_submissions(self, *, include_hidden: bool = False, gold_sha: str | None = None) -> list[dict]:
        with self.reading() as s:
            stmt = sa.select(Submission).order_by(Submission.id)
            if not include_hidden:
                stmt = stmt.where(Submission.hidden.is_(False))
            if gold_sha is not None:
                stmt = stmt.where(Submission.gold_sha == gold_sha)
            return [row_dict(x) for x in s.scalars(stmt)]

    def get(self, sub_id: int, with_turns: bool = True) -> dict | None:
        with self.reading() as s:
            sub = s.get(Submission, sub_id)
            return row_dict(sub, with_turns) if sub else None

    def blob(self, sha: str) -> bytes | None:
        with self.reading() as s:
            b = s.get(Blob, sha)
            return b.data if b else None

    def audit_log(self, limit: int = 50) -> list[dict]:
        with self.reading() as s:
            rows = s.scalars(sa.select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit))
            return [{"at": r.at, "action": r.action, "submission_id": r.submission_id,
                     "detail": r.detail} for r in rows]

    # ----------------------------------------------------------------- writes
    def _put_blob(self, s: Session, data: bytes, sha: str):
        if s.get(Blob, sha) is None:
            s.add(Blob(sha256=sha, size=len(data), data=data))
            s.flush()

    def _reserve_quota(self, s: Session, key: str, day: dt.date, limit: int):
        """Count one accepted submission for (team, day) unless the limit is reached (atomic)."""
        table = Quota.__table__
        if self.is_sqlite or self.engine.dialect.name == "postgresql":
            dialect_insert = (sa.dialects.sqlite.insert if self.is_sqlite
                              else sa.dialects.postgresql.insert)
            s.execute(dialect_insert(table).values(team_key=key, day=day, count=0)
                      .on_conflict_do_nothing())
        elif s.get(Quota, (key, day)) is None:
            s.add(Quota(team_key=key, day=day, count=0))
            s.flush()
        res = s.execute(sa.update(table).where(table.c.team_key == key, table.c.day == day,
                                               table.c.count < limit)
                        .values(count=table.c.count + 1))
        if res.rowcount != 1:
            raise QuotaExceeded(limit, limit)

    def add_submission(self, *, result_bytes: bytes, result_sha: str, upload_bytes: bytes,
                       upload_sha: str, upload_name: str, team: str, system: str,
                       model_ref: str | None, kind: str, scores: dict, daily_limit: int | None,
                       now: dt.datetime | None = None) -> Added:
        """Store a scored submission in one transaction: blobs, quota, row. Nothing on failure."""
        now = now or utcnow()
        key = team_key(team)
        with self._write_lock, self.writing() as s:
            try:
                with s.begin():
                    existing = s.scalar(sa.select(Submission.id)
                                        .where(Submission.result_sha == result_sha))
                    if existing is not None:
                        return Added(existing, False)
                    if daily_limit is not None:
                        self._reserve_quota(s, key, now.date(), daily_limit)
                    self._put_blob(s, result_bytes, result_sha)
                    self._put_blob(s, upload_bytes, upload_sha)
                    sub = Submission(result_sha=result_sha, upload_sha=upload_sha,
                                     upload_name=upload_name[:255], kind=kind, team=team,
                                     team_key=key, system=system, model_ref=model_ref,
                                     created_at=now, hidden=False, **_score_columns(scores))
                    s.add(sub)
                    s.flush()
                    return Added(sub.id, True)
            except IntegrityError:
                # Another request stored the same result.json between our check and insert.
                with self.reading() as r:
                    existing = r.scalar(sa.select(Submission.id)
                                        .where(Submission.result_sha == result_sha))
                if existing is None:
                    raise
                return Added(existing, False)

    def update_scores(self, sub_id: int, scores: dict) -> bool:
        with self._write_lock, self.writing() as s, s.begin():
            sub = s.get(Submission, sub_id)
            if sub is None:
                return False
            for k, v in _score_columns(scores).items():
                setattr(sub, k, v)
            return True

    def set_kl(self, sub_id: int, kl: dict | None, status: str) -> bool:
        with self._write_lock, self.writing() as s, s.begin():
            sub = s.get(Submission, sub_id)
            if sub is None:
                return False
            sub.kl, sub.kl_status = kl, status[:512]
            return True

    def set_hidden(self, sub_id: int, hidden: bool) -> bool:
        with self._write_lock, self.writing() as s, s.begin():
            sub = s.get(Submission, sub_id)
            if sub is None:
                return False
            sub.hidden = hidden
            return True

    def delete(self, sub_id: int) -> bool:
        """Remove a submission and any blob no other submission references (quota is kept)."""
        with self._write_lock, self.writing() as s, s.begin():
            sub = s.get(Submission, sub_id)
            if sub is None:
                return False
            shas = {sub.result_sha, sub.upload_sha}
            s.delete(sub)
            s.flush()
            for sha in shas:
                used = s.scalar(sa.select(sa.func.count()).select_from(Submission).where(
                    sa.or_(Submission.result_sha == sha, Submission.upload_sha == sha)))
                if not used:
                    blob = s.get(Blob, sha)
                    if blob is not None:
                        s.delete(blob)
            return True

    def audit(self, action: str, submission_id: int | None, detail: str = ""):
        with self._write_lock, self.writing() as s, s.begin():
            s.add(AuditEvent(action=action, submission_id=submission_id, detail=detail[:2000]))


def _score_columns(scores: dict) -> dict:
    return {
        "gold_sha": scores["gold_sha"],
        "scorer_version": scores.get("scorer_version", ""),
        "scored_at": scores.get("scored_at") or utcnow(),
        "total": scores.get("total"),
        "total_g": scores.get("total_g"),
        "corrected_total": scores.get("corrected_total"),
        "official": scores.get("official", {}),
        "corrected": scores.get("corrected", {}),
        "flags": scores.get("flags", []),
        "notes": scores.get("notes", []),
        "per_turn": scores.get("per_turn", []),
    }
