"""`pesc submission build|check` and `pesc generate`: from a trained model to the zip the organisers get."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

from pesc.cli.argtypes import batch_size, positive_int
from pesc.errors import ConfigError, DataError

DEFAULT_MAX_REPLY_CHARS = 1500  # same as submission.check.DEFAULT_MAX_REPLY_CHARS


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and decoding (unset options come from the model's generation_config)")
    g.add_argument("--model", required=True, metavar="PATH_OR_ID",
                   help="trained model: a local directory (e.g. runs/smoke-fkl/student) or a Hub id")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default float32)")
    g.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--batch-size", type=batch_size, default="auto", metavar="N|auto",
                   help="dialogues per generate call; 'auto' plans it from the model size and a fixed "
                        "memory budget; halved automatically on out-of-memory (default auto)")
    g.add_argument("--max-new-tokens", type=positive_int, metavar="N",
                   help="longest reply in tokens (default: the model's pesc run config, else its "
                        "generation_config, else 128)")
    g.add_argument("--max-prompt-tokens", type=positive_int, metavar="N",
                   help="prompt budget; the oldest turns are dropped in pairs to fit (default: the "
                        "max_length the model was trained with when its pesc run directory says so, "
                        "else 1024 or what the model's context allows)")
    g.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None,
                   help="sample instead of greedy decoding (default: generation_config)")
    g.add_argument("--temperature", type=_float, help="sampling temperature")
    g.add_argument("--top-p", type=_float, help="nucleus sampling threshold")
    g.add_argument("--top-k", type=int, help="top-k sampling (0 = off)")
    g.add_argument("--repetition-penalty", type=_float, help="repetition penalty (1 = off)")
    g.add_argument("--seed", type=int, default=0, help="seed of sampled replies (per dialogue and turn)")
    g.add_argument("--checkpoint-every", type=positive_int, default=10, metavar="N",
                   help="save progress every N dialogues' worth of turns (default 10)")
    g.add_argument("--threads", type=positive_int, metavar="N",
                   help="CPU threads for torch (default: torch's choice; 1 is often fastest on a busy machine)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(sub) -> None:
    p = sub.add_parser(
        "submission", help="build the submission zip from a model, or check a result.json",
        description="Build the zip sent to the organisers (result.json + code + DESCRIPTION.md), or check "
                    "a result.json against the test file.")
    ssub = p.add_subparsers(dest="submission_command", metavar="ACTION")

    b = ssub.add_parser(
        "build", help="generate result.json with a model, check it, and package the zip",
        description="Generate every supporter turn of TEST with the model (turn by turn, batched across "
                    "dialogues; each turn sees the profile, the seeker turns and the model's own earlier "
                    "replies), write result.json, run the pre-flight check, and write the zip: "
                    "result.json, DESCRIPTION.md (model, teacher, loss, hyperparameters, commands, "
                    "validation scores) and the project's git-tracked code. Progress is saved in the "
                    "work directory: if the run is killed, the same command continues where it stopped "
                    "and produces the same result.json. Exit code 0 when the zip is written, 1 when the "
                    "result fails the check (the problems are listed; no zip is written).")
    _add_model_args(b)
    b.add_argument("--test", required=True, help="the official test.json (blank supporter turns)")
    b.add_argument("--out", default="submission.zip", help="zip to write (default submission.zip)")
    b.add_argument("--work-dir", help="where result.json and the progress files go "
                                      "(default: <out without .zip>-work next to the zip)")
    b.add_argument("--val", help="also generate for this file with gold supporter turns (e.g. val.json) and "
                                 "put its scores (pesc.metrics) in the description")
    b.add_argument("--val-gold-history", action="store_true",
                   help="for --val, let each turn see the gold earlier replies instead of the model's own")
    b.add_argument("--max-reply-chars", type=positive_int, default=DEFAULT_MAX_REPLY_CHARS, metavar="N",
                   help=f"longest allowed reply in characters; longer ones are cut at a sentence end "
                        f"(default {DEFAULT_MAX_REPLY_CHARS})")
    b.add_argument("--description", metavar="JSON", help="JSON file with extra description fields (title, "
                   "summary, teacher, loss, hyperparameters, training_data, notes, ...) overriding the "
                   "ones found next to the model")
    b.add_argument("--teacher", help="teacher model named in the description")
    b.add_argument("--loss", help="distillation loss named in the description")
    b.add_argument("--code-root", help="project checkout whose tracked files go into code/ (default: this pesc)")
    b.set_defaults(func=build_main)

    c = ssub.add_parser(
        "check", help="check a result.json against the test file; exit code 0 pass, 1 fail",
        description="Check RESULT against TEST: valid UTF-8 JSON, every id present once and in order, 20 turns "
                    "each with alternating roles, seeker turns and profiles unchanged, every supporter turn "
                    "non-empty, no leftover role tags or special tokens, no reply over the cap. All problems "
                    "are listed with dialogue id and turn (0-based position in whole_dialog). RESULT may "
                    "also be a submission zip (its result.json is checked).")
    c.add_argument("result", help="result.json (or a submission .zip)")
    c.add_argument("--test", required=True, help="the test.json the result answers")
    c.add_argument("--max-reply-chars", type=positive_int, default=DEFAULT_MAX_REPLY_CHARS, metavar="N",
                   help=f"longest allowed reply in characters (default {DEFAULT_MAX_REPLY_CHARS})")
    c.set_defaults(func=check_main)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    g = sub.add_parser(
        "generate", help="fill the supporter turns of a PESC file with a model",
        description="Generate every supporter turn of INPUT (turn by turn, batched across dialogues) and write "
                    "the filled file to --out; everything but the supporter turns is kept as it was. With "
                    "--gold-history each turn sees the file's gold earlier replies (validation runs). "
                    "Resumable: rerun the same command after an interruption.")
    _add_model_args(g)
    g.add_argument("--input", required=True, help="PESC file (test.json, val.json, ...)")
    g.add_argument("--out", required=True, help="filled file to write")
    g.add_argument("--gold-history", action="store_true", help="turn i sees the gold replies of turns < i")
    g.add_argument("--checkpoint", help="progress file (default <out>.progress.json; removed when done)")
    g.add_argument("--max-reply-chars", type=positive_int, default=DEFAULT_MAX_REPLY_CHARS, metavar="N",
                   help=f"longest reply in characters (default {DEFAULT_MAX_REPLY_CHARS})")
    g.set_defaults(func=generate_main)


# ------------------------------------------------------------------------------------------------

def _options(args):
    """Decoding options from the flags; unset limits come from the model's `pesc run` config."""
    from pesc.generation import GenerationOptions

    run_cfg = _run_metadata(args.model).get("config", {})
    max_prompt, max_new = args.max_prompt_tokens, args.max_new_tokens
    if max_prompt is None:
        trained = run_cfg.get("max_length")
        if isinstance(trained, int) and trained >= 8:
            max_prompt = trained
            print(f"note: prompts limited to {trained} tokens, the max_length the model was trained with "
                  f"(--max-prompt-tokens to change)", file=sys.stderr)
    if max_new is None:
        run_new = run_cfg.get("max_new_tokens")
        if isinstance(run_new, int) and run_new >= 1:
            max_new = run_new
            print(f"note: replies limited to {run_new} new tokens, as in the model's pesc run "
                  f"(--max-new-tokens to change)", file=sys.stderr)
    return GenerationOptions(max_new_tokens=max_new, do_sample=args.do_sample,
                             temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                             repetition_penalty=args.repetition_penalty, batch_size=args.batch_size,
                             max_prompt_tokens=max_prompt, seed=args.seed,
                             max_reply_chars=args.max_reply_chars)


def _load(args):
    from pesc.models import load_model, load_tokenizer

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(f"loading model {args.model}", file=sys.stderr)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, args.dtype, args.device)
    return model, tokenizer


def _generate(model, tokenizer, task, args, options, checkpoint: Path, gold: bool = False):
    from pesc.generation import generate_dialogues

    print(f"generating {sum(len(d.supporter_indices()) for d in task.dialogues)} supporter turns of "
          f"{len(task.dialogues)} dialogues ({task.path}); progress is saved to {checkpoint}: "
          f"if interrupted, rerun the same command to continue", file=sys.stderr)
    result = generate_dialogues(model, tokenizer, task.dialogues, options, use_gold_history=gold,
                                checkpoint_path=checkpoint, checkpoint_every=args.checkpoint_every,
                                progress=not args.no_progress)
    what = {"regenerated": "replies were empty and regenerated with sampling",
            "fallback": "replies stayed empty and got the fallback reply",
            "long_prompt": "prompts exceed the budget with only the profile and the latest seeker turn "
                           "(used whole; --max-prompt-tokens to raise it)"}
    for code, text in what.items():
        hits = [p for p in result.problems if p.code == code]
        if hits:
            print(f"note: {len(hits)} {text}: "
                  + "; ".join(f"{p.dialogue_id}/turn {p.turn}" for p in hits[:20])
                  + (" ..." if len(hits) > 20 else ""), file=sys.stderr)
    return result


def _command(args) -> str:
    """The `pesc submission build` command line that reproduces this run."""
    parts = ["pesc", "submission", "build", "--model", args.model, "--test", args.test, "--out", args.out]
    for flag, dest in (("--val", "val"), ("--dtype", "dtype"), ("--batch-size", "batch_size"),
                       ("--max-new-tokens", "max_new_tokens"), ("--max-prompt-tokens", "max_prompt_tokens"),
                       ("--temperature", "temperature"), ("--top-p", "top_p"), ("--top-k", "top_k"),
                       ("--repetition-penalty", "repetition_penalty"), ("--seed", "seed"),
                       ("--max-reply-chars", "max_reply_chars"), ("--teacher", "teacher"), ("--loss", "loss"),
                       ("--description", "description")):
        v = getattr(args, dest, None)
        if v is not None and not (dest == "dtype" and v == "float32") and not (dest == "batch_size" and v == "auto") \
                and not (dest == "seed" and v == 0) and not (dest == "max_reply_chars" and v == DEFAULT_MAX_REPLY_CHARS):
            parts += [flag, str(v)]
    if args.do_sample is not None:
        parts.append("--do-sample" if args.do_sample else "--no-do-sample")
    if args.val_gold_history:
        parts.append("--val-gold-history")
    return shlex.join(parts)


def _run_metadata(model: str) -> dict:
    """What a `pesc run` directory says about the model: its config.yaml and summary.json."""
    p = Path(model)
    if not p.exists():
        return {}
    out: dict = {}
    for d in (p, p.parent):
        cfg, summ = d / "config.yaml", d / "summary.json"
        if cfg.exists() and "config" not in out:
            try:
                import yaml

                loaded = yaml.safe_load(cfg.read_text(encoding="utf-8"))
                if isinstance(loaded, dict):
                    out["config"], out["config_path"] = loaded, str(cfg)
            except (OSError, ValueError, ImportError, yaml.YAMLError):
                pass
        if summ.exists() and "summary" not in out:
            try:
                loaded = json.loads(summ.read_text(encoding="utf-8"))
                if isinstance(loaded, dict):
                    out["summary"] = loaded
            except (OSError, ValueError):
                pass
    return out


def _description(args, dec, check_line: str, problems, val_scores: dict | None, val_note: str | None) -> dict:
    meta = _run_metadata(args.model)
    cfg, summary = meta.get("config", {}), meta.get("summary", {})
    desc: dict = {"model": str(Path(args.model).resolve()) if Path(args.model).exists() else args.model}
    teacher = args.teacher or summary.get("teacher") or cfg.get("teacher")
    if teacher:
        desc["teacher"] = teacher
    loss_name = args.loss or cfg.get("loss") or summary.get("loss")
    if loss_name:
        loss = {"name": loss_name}
        for k in ("alpha", "temperature", "loss_params"):
            if k in cfg and cfg[k] not in (None, {}):
                loss[k] = cfg[k]
        desc["loss"] = loss
    if cfg:
        desc["hyperparameters"] = {k: v for k, v in cfg.items() if k not in ("output_dir",)}
    if summary:
        kl = {k: summary[k] for k in ("kl_temperature", "kl_before", "kl_after", "kl_relative_change")
              if k in summary}
        if kl:
            desc["teacher-student KL (held-out)"] = kl
    desc["generation"] = {k: v for k, v in asdict(dec).items() if k not in ("stop_ids", "pad_id")}
    desc["generation"]["batch_size"] = args.batch_size
    if problems:
        desc["generation_problems"] = [str(p) for p in problems]
    if val_scores:
        desc["validation"] = val_scores
    if val_note:
        desc["validation_note"] = val_note
    desc["check"] = check_line
    commands = ["scripts/dev.sh setup   # pinned environment"]
    if "config_path" in meta:
        commands.append(f"pesc run --config {shlex.quote(meta['config_path'])}   # trains the model")
    commands.append(_command(args))
    desc["commands"] = commands
    if args.description:
        try:
            extra = json.loads(Path(args.description).read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"--description {args.description}: {e.strerror or e}") from None
        except ValueError as e:
            raise DataError(f"invalid JSON: {e}", path=args.description) from None
        if not isinstance(extra, dict):
            raise DataError("must be a JSON object of description fields", path=args.description)
        desc.update(extra)
    return desc


def _score_val(val_result: Path, gold: str, progress: bool) -> tuple[dict | None, str | None]:
    """Official-mode scores (x 100) of the generated val file against the gold one, or (None, why not).

    pesc.metrics is imported lazily: without it (or without its WordNet/GloVe resources) the zip is
    still built and the description says why the scores are missing.
    """
    try:
        from pesc.metrics import score
    except ImportError as e:
        return None, f"validation scores unavailable: pesc.metrics cannot be imported ({e})"
    try:
        report = score(str(val_result), str(gold), mode="official", per_turn=False, progress=progress,
                       on_missing="skip")
    except Exception as e:  # noqa: BLE001 - scoring is optional here; say why it is missing
        return None, f"validation scores unavailable: {type(e).__name__}: {e}"
    metrics = {k: round(100 * float(v), 2) for k, v in report.metrics.items()}
    notes = "; ".join(report.notes) if report.notes else None
    return metrics, notes


def build_main(args) -> int:
    from pesc.generation import resolve_decoding
    from submission.check import check_result
    from submission.package import REPO, build_package
    from submission.taskfile import fill_result, load_task, write_text_atomic

    t0 = time.time()
    out = Path(args.out)
    if out.suffix.lower() != ".zip":
        raise ConfigError(f"--out must name a .zip file, got {args.out}")
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.stem + "-work")
    code_root = Path(args.code_root) if args.code_root else REPO
    if not code_root.is_dir():
        raise ConfigError(f"--code-root {code_root} is not a directory")
    options = _options(args)
    test = load_task(args.test)
    blanks = sum(1 for d in test.dialogues for i in d.supporter_indices() if not d.turns[i].text.strip())
    if blanks == 0:
        print(f"note: {args.test} has no blank supporter turns; they will all be regenerated", file=sys.stderr)
    val = load_task(args.val) if args.val else None
    if val is not None:
        blank = [(d.id, i) for d in val.dialogues for i in d.supporter_indices() if not d.turns[i].text.strip()]
        if blank:
            raise DataError("--val needs gold supporter turns, this one is blank", path=args.val,
                            dialogue_id=blank[0][0], turn=blank[0][1])
    model, tokenizer = _load(args)
    dec = resolve_decoding(model, tokenizer, options)

    generated = _generate(model, tokenizer, test, args, options, work / "test.progress.json")
    result_path = write_text_atomic(work / "result.json", fill_result(test, generated))
    report = check_result(result_path, args.test, args.max_reply_chars)
    print(report.format())
    if not report.ok:
        print(f"pesc submission build: result.json fails the check; no zip written ({result_path})",
              file=sys.stderr)
        return 1

    val_scores, val_note = None, None
    if val is not None:
        val_gen = _generate(model, tokenizer, val, args, options, work / "val.progress.json",
                            gold=args.val_gold_history)
        write_text_atomic(work / "val.result.json", fill_result(val, val_gen))
        val_scores, val_note = _score_val(work / "val.result.json", args.val, not args.no_progress)
        history = "gold" if args.val_gold_history else "the model's own"
        if val_scores is not None:
            print("validation (official mode, x100): " + ", ".join(f"{k} {v:.2f}" for k, v in val_scores.items()))
            val_scores = {"file": str(args.val),
                          "mode": f"official (pesc.metrics.score), values x 100; each turn saw {history} "
                                  f"earlier replies", **val_scores}
        if val_note:
            print(f"note: {val_note}", file=sys.stderr)

    desc = _description(args, dec, report.format().splitlines()[0], generated.problems, val_scores, val_note)
    zip_path = build_package(result_path, out, desc, code_root, test=args.test,
                             max_reply_chars=args.max_reply_chars)
    import zipfile

    with zipfile.ZipFile(zip_path) as z:
        n_code = sum(1 for n in z.namelist() if n.startswith("code/"))
    print(f"wrote {zip_path} (result.json, DESCRIPTION.md, {n_code} code files; re-opened and verified) "
          f"in {time.time() - t0:.0f}s")
    return 0


def check_main(args) -> int:
    from submission.check import check_result

    report = check_result(Path(args.result), args.test, args.max_reply_chars)
    print(report.format())
    return 0 if report.ok else 1


def generate_main(args) -> int:
    from submission.taskfile import fill_result, load_task, write_text_atomic

    out = Path(args.out)
    task = load_task(args.input)
    options = _options(args)
    model, tokenizer = _load(args)
    ckpt = Path(args.checkpoint) if args.checkpoint else out.with_name(out.name + ".progress.json")
    result = _generate(model, tokenizer, task, args, options, ckpt, gold=args.gold_history)
    write_text_atomic(out, fill_result(task, result))
    ckpt.unlink(missing_ok=True)
    print(f"wrote {out} ({len(result)} dialogues, {sum(len(d.supporter_indices()) for d in result)} "
          f"supporter turns)")
    return 0
