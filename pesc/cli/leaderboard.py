"""`pesc leaderboard serve`: run the leaderboard web app (submit, rank, inspect, chat)."""

from __future__ import annotations

import argparse
import logging

from pesc.cli.argtypes import positive_int
from pesc.errors import ConfigError


_positive_int = positive_int


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def register(sub) -> None:
    p = sub.add_parser(
        "leaderboard", help="the leaderboard web app: submissions, ranking, per-turn drill-down, chat",
        description="Run the PESC leaderboard (a Gradio app). Teams upload a submission zip or a "
                    "result.json; it is checked, scored in official and corrected mode against the "
                    "server's gold file and ranked beside the sanity baselines.")
    lsub = p.add_subparsers(dest="leaderboard_command", metavar="ACTION")
    s = lsub.add_parser(
        "serve", help="start the web app",
        description="Start the leaderboard web app. The gold file (e.g. val.json with filled supporter "
                    "turns) stays on the server; how much of it submitters see is --reference-access. "
                    "Admin actions (hide, delete, re-score) need the token in "
                    "$PESC_LEADERBOARD_ADMIN_TOKEN (at least 12 characters); without it they are off.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--gold", required=True, help="reference file with filled supporter turns")
    s.add_argument("--db", default="sqlite:///leaderboard.db",
                   help="SQLAlchemy database URL (SQLite file by default; e.g. postgresql://...)")
    s.add_argument("--model", action="append", default=[], metavar="PATH",
                   help="chat model (local directory or Hub id); repeat to offer several")
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    s.add_argument("--port", type=_positive_int, default=7860, help="port to listen on")
    s.add_argument("--reference-access", choices=["none", "scores", "full"], default="scores",
                   help="submission pages show: none = aggregate scores only; scores = per-turn "
                        "scores with seeker turn and reply; full = also the reference replies")
    s.add_argument("--per-team-per-day", type=_positive_int, default=5,
                   help="accepted submissions per team per UTC day")
    s.add_argument("--max-upload-mb", type=_positive_float, default=20.0, help="upload size limit")
    s.add_argument("--max-reply-chars", type=_positive_int, default=2000,
                   help="longest accepted reply (pre-flight check)")
    s.add_argument("--judge", metavar="SPEC",
                   help="G-Score judge: openai | openai:MODEL (endpoint and key from "
                        "PESC_JUDGE_BASE_URL / PESC_JUDGE_API_KEY) | hf:PATH_OR_HUB_ID; without it "
                        "totals are reported without G")
    s.add_argument("--kl-teacher", metavar="PATH",
                   help="teacher model for the KL of submitted models (off when not given)")
    s.add_argument("--kl-model-root", action="append", default=[], metavar="DIR",
                   help="directory under which submitted local model paths are accepted for KL "
                        "(repeatable; Hub ids need no root)")
    s.add_argument("--kl-examples", type=_positive_int, default=300,
                   help="gold supporter turns (evenly spread) used for the KL")
    s.add_argument("--workers", type=_positive_int, default=1,
                   help="scorer processes per submission")
    s.add_argument("--concurrency", type=_positive_int, default=2,
                   help="submissions scored at the same time")
    s.add_argument("--no-baselines", action="store_true",
                   help="do not score the echo/random/generic/gold baselines at start-up")
    s.add_argument("--title", default="PESC leaderboard", help="page title")
    s.set_defaults(func=serve)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def build_config(args):
    from leaderboard.config import LeaderboardConfig, Limits
    from pesc.metrics.judge import build_judge

    limits = Limits(per_team_per_day=args.per_team_per_day,
                    max_upload_bytes=int(args.max_upload_mb * 2**20),
                    max_reply_chars=args.max_reply_chars)
    return LeaderboardConfig(gold=args.gold, db_url=args.db, models=list(args.model),
                             kl_teacher=args.kl_teacher, kl_model_roots=list(args.kl_model_root),
                             kl_max_examples=args.kl_examples,
                             reference_access=args.reference_access,
                             limits=limits, score_workers=args.workers,
                             submit_concurrency=args.concurrency,
                             compute_baselines=not args.no_baselines, title=args.title,
                             judge=build_judge(args.judge) if args.judge else None)


def serve(args) -> int:
    from leaderboard.app import launch
    from leaderboard.service import LeaderboardService

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = build_config(args)
    for m in config.models:
        if m.startswith((".", "/", "~")):
            from pathlib import Path

            if not Path(m).expanduser().exists():
                raise ConfigError(f"chat model {m!r} does not exist")
    service = LeaderboardService(config)
    if config.compute_baselines:
        service.start_baselines()
    print(f"leaderboard: gold {config.gold} ({len(service.gold.dialogues)} dialogues), "
          f"database {config.db_url}, admin {'on' if service.admin_enabled() else 'off'}, "
          f"references {config.reference_access}")
    stale = service.stale_count()
    if stale:
        print(f"leaderboard: {stale} submission(s) were scored against another gold file and stay off "
              "the board until an admin runs rescore_all")
    launch(service, host=args.host, port=args.port, block=True)
    return 0
