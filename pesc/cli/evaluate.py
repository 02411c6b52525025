"""`pesc evaluate`: score any model on held-out dialogues, optionally against a teacher (KL).

The same evaluator as the before/after tables of `pesc run` and `pesc distill`
(`pesc.training.evaluation.ValidationEvaluator`): replies generated with the gold history and scored
by the project's scorer, and the teacher-student KL per target token on the dialogues' examples.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pesc.cli.argtypes import batch_size, positive_int


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="score a model on held-out dialogues (METEOR, BLEU-4, ROUGE-L, ...; KL to a teacher)",
        description="Generate every supporter turn of the held-out dialogues with the gold history, score "
                    "the replies with the project's scorer (METEOR, BLEU-4, ROUGE-L, Extrema, Distinct; "
                    "x100 in the table), and with --teacher also the teacher-student KL per target token "
                    "(full vocabulary). Prints one table; --out writes it as JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, metavar="PATH_OR_ID", help="the model to evaluate")
    p.add_argument("--teacher", metavar="PATH_OR_ID",
                   help="a teacher sharing the model's tokenizer: adds KL(teacher || model)")
    p.add_argument("--dialogues", required=True, metavar="SPEC",
                   help="held-out dialogues with gold supporter turns: a PESC file (val.json) or any "
                        "source spec of pesc.data.load_dialogues (e.g. esconv-json:ESConv.json)")
    p.add_argument("--split", default="validation", help="split to read when SPEC is a directory or a Hub id")
    p.add_argument("--max-dialogues", type=positive_int, default=None, metavar="N",
                   help="evaluate the first N dialogues only")
    p.add_argument("--kl-examples", type=positive_int, default=64, metavar="N",
                   help="supporter turns for the KL (the first N, as in a run's evaluation)")
    p.add_argument("--max-length", type=positive_int, default=1024, metavar="N",
                   help="token budget of a prompt, and of prompt + reply in the KL examples (history is "
                        "cut from the oldest turns); as a run's max_length")
    p.add_argument("--max-new-tokens", type=positive_int, default=48, metavar="N")
    p.add_argument("--batch-size", type=batch_size, default="auto", metavar="N|auto",
                   help="generation rows per batch")
    p.add_argument("--kl-temperature", type=float, default=1.0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--out", type=Path, help="write the table as JSON here")
    p.set_defaults(func=main)


def main(args) -> int:
    from pesc.data import load_dialogues
    from pesc.data.examples import build_examples
    from pesc.errors import ConfigError
    from pesc.models import load_model, load_tokenizer, require_shared_vocab
    from pesc.training.evaluation import FINAL_METRICS, ValidationEvaluator

    dialogues = load_dialogues(args.dialogues, split=args.split)
    if args.max_dialogues:
        dialogues = dialogues[: args.max_dialogues]
    if not dialogues:
        raise ConfigError(f"{args.dialogues}: no dialogues to evaluate")
    print(f"loading model {args.model}", flush=True)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, args.dtype)
    teacher = None
    if args.teacher:
        print(f"loading teacher {args.teacher}", flush=True)
        require_shared_vocab(args.teacher, len(tokenizer), "the KL")
        teacher = load_model(args.teacher, args.dtype)
    examples = build_examples(dialogues, tokenizer, args.max_length)[: args.kl_examples] if teacher else []
    evaluator = ValidationEvaluator(
        tokenizer=tokenizer, examples=examples, dialogues=dialogues, teacher=teacher,
        kl_temperature=args.kl_temperature, vocab_size=len(tokenizer), max_new_tokens=args.max_new_tokens,
        gen_batch_size=args.batch_size, max_prompt_tokens=args.max_length, metrics=FINAL_METRICS,
        progress=True)
    scores = evaluator.evaluate(model)
    turns = sum(1 for d in dialogues for t in d.turns if t.role == "supporter")
    table = {"model": args.model, "teacher": args.teacher, "dialogues": args.dialogues,
             "n_dialogues": len(dialogues), "n_turns": turns, "kl_examples": len(examples),
             "kl_temperature": args.kl_temperature if teacher else None, "scores": scores}
    print("\n" + format_table(table))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(table, indent=2), encoding="utf-8")
        print(f"written: {args.out}")
    return 0


def format_table(t: dict) -> str:
    from pesc.metrics.report import LABELS, METRIC_ORDER

    s = t["scores"]
    cols = [(k, LABELS[k]) for k in (*METRIC_ORDER, "total_no_g") if k in s]
    lines = [f"model {t['model']} on {t['n_dialogues']} dialogues ({t['n_turns']} supporter turns, gold history)"]
    if "kl" in s:
        lines.append(f"teacher-student KL per target token (tau={t['kl_temperature']}, {t['kl_examples']} turns, "
                     f"teacher {t['teacher']}): {s['kl']:.4f}")
    lines.append("  ".join(f"{label:>8}" for _, label in cols))
    lines.append("  ".join(f"{100 * s[k]:>{max(8, len(label))}.2f}" for k, label in cols))
    return "\n".join(lines)
