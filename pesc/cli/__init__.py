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
    "pesc.cli.evaluate",
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


def split_loss_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull `--loss.KEY VALUE` / `--loss.KEY=VALUE` out of argv (argparse cannot declare them).

    Returns (remaining argv, ["KEY=VALUE", ...]); the pairs become the loss's parameters.
    """
    rest, pairs = [], []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--loss."):
            key = tok[len("--loss."):]
            if "=" in key:
                pairs.append(key)
            elif i + 1 < len(argv):
                pairs.append(f"{key}={argv[i + 1]}")
                i += 1
            else:
                raise PescError(f"{tok} needs a value")
        else:
            rest.append(tok)
        i += 1
    return rest, pairs


def reject_unknown(parser: argparse.ArgumentParser, args, unknown: list[str]) -> None:
    """Exit with the subcommand's own usage and a close option name, e.g. `--output` -> `--out`."""
    import difflib

    target = parser
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if sub is not None and getattr(args, "command", None) in sub.choices:
        target = sub.choices[args.command]
    known = [o for a in target._actions for o in a.option_strings]
    msg = f"unrecognized arguments: {' '.join(unknown)}"
    for tok in unknown:
        close = difflib.get_close_matches(tok.split("=", 1)[0], known, n=1, cutoff=0.6) if tok.startswith("-") else []
        if close:
            msg += f" (did you mean {close[0]}?)"
            break
    target.error(msg)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        argv, loss_pairs = split_loss_args(list(sys.argv[1:] if argv is None else argv))
    except PescError as e:
        parser.error(str(e))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        reject_unknown(parser, args, unknown)
    args.loss_args = loss_pairs
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
