"""The `pesc` command. Each subcommand lives in its own module with `register(subparsers)`.

A user's mistake (PescError) is printed as one line and exits 2; it is never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pesc.errors import PescError

# Modules that define subcommands, in the order `pesc --help` lists them.
COMMAND_MODULES = [
    "pesc.cli.run",
    "pesc.cli.train",
    "pesc.cli.score",
    "pesc.cli.leaderboard",
    "pesc.cli.submission",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pesc",
        description="Personalized Emotional Support Conversation toolkit: train and distil supporter "
                    "models, score and package submissions, run the leaderboard.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except PescError as e:
        print(f"pesc {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
