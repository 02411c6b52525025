"""Training commands: `pesc train-teacher`, `pesc cache-teacher`, `pesc distill`, `pesc sweep`, `pesc push`.

Thin: parse the config (preset < YAML file < flags), build, train. The stages share one run
directory (--out), so they chain:

    pesc train-teacher --preset smoke --data ../shared/data/pesc --out runs/s
    pesc cache-teacher --preset smoke --data ../shared/data/pesc --out runs/s
    pesc distill --preset smoke --data ../shared/data/pesc --out runs/s --teacher-cache runs/s/teacher-cache
    torchrun --nproc_per_node=2 -m pesc distill ...      # data parallel, same results
"""

from __future__ import annotations

import argparse

from pesc.errors import ConfigError

EPILOG = ("Any RunConfig option can be set with --set KEY=VALUE (YAML syntax: --set lr=1e-4 "
          "loss_params='{cost: cosine}'). The resolved config is saved as <out>/config.yaml; running the "
          "same command again resumes from the last checkpoint when save_steps > 0.")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only when there is one worth showing."""

    def _get_help_string(self, action):
        if action.default in (None, False, [], argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _common(p, *, loss: bool = False) -> None:
    from pesc.training.config import PRESETS

    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="smoke: tiny random models (CPU, a minute); quickstart: SmolLM2-135M teacher and a "
                        "26-layer student cut from it; paper: Qwen2.5-7B -> 1.5B with LoRA (GPUs). Default: the config "
                        "file's preset, else smoke")
    p.add_argument("--config", help="YAML run config (options of pesc.training.config.RunConfig)")
    p.add_argument("--data", help="directory with the PESC files (train.json and/or val.json); default: the "
                                  "sample set shipped with pesc")
    p.add_argument("--out", help="run directory (default runs/<preset>)")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (merged into the saved weights)")
    if loss:
        p.add_argument("--loss", help="distillation loss name (see pesc.losses.available_losses())")
        p.add_argument("--alpha", type=float, help="weight of the distillation term: (1-a) CE + a D")
        p.add_argument("--temperature", type=float, help="distillation temperature")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", default=[], help="override any config option")


def build_config(args, *, lora_field: str | None = None, default_out: str = "runs/{preset}"):
    from pesc.cli.run import parse_overrides
    from pesc.training.config import load_config

    try:
        overrides = parse_overrides(args.set)
    except argparse.ArgumentTypeError as e:
        raise ConfigError(str(e)) from None
    for name in ("loss", "alpha", "temperature", "seed"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    if args.data:
        overrides["data"] = args.data
    if getattr(args, "teacher_cache", None):
        overrides["teacher_cache"] = args.teacher_cache
    if getattr(args, "topk", None):
        overrides["cache_topk"] = args.topk
    if lora_field and args.lora:
        overrides[lora_field] = True
    cfg = load_config(args.preset, args.config, overrides)
    if args.out:
        cfg.output_dir = args.out
    elif "output_dir" not in overrides and not (args.config and _yaml_has_output(args.config)):
        cfg.output_dir = default_out.format(preset=cfg.preset)
    return cfg


def _yaml_has_output(path: str) -> bool:
    import yaml

    try:
        return "output_dir" in (yaml.safe_load(open(path, encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError):
        return False


def register(sub) -> None:
    fmt = _Formatter
    p = sub.add_parser("train-teacher", help="fine-tune the teacher on the training dialogues (SFT, optional LoRA)",
                       description="Fine-tune the teacher on the supporter replies of the training dialogues "
                                   "(response-token cross-entropy), evaluating on held-out dialogues every "
                                   "eval_steps. Writes <out>/teacher (adapters merged).",
                       epilog=EPILOG, formatter_class=fmt)
    _common(p)
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("cache-teacher", help="run the teacher once and store its top-k log-probs per target token",
                       description="Run the run's teacher (<out>/teacher, or the initial teacher when "
                                   "teacher_steps=0) over the training and validation examples and store, per "
                                   "target position, its top-k token ids, their log-probabilities and the log "
                                   "of the leftover mass: sharded, memory-mapped, with a hash of the examples. "
                                   "`pesc distill --teacher-cache DIR` then never loads the teacher.",
                       epilog=EPILOG, formatter_class=fmt)
    _common(p)
    p.add_argument("--topk", type=int, help="tokens kept per position (config cache_topk)")
    p.add_argument("--cache-out", help="cache directory (default <out>/teacher-cache)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache directory")
    p.set_defaults(func=cmd_cache_teacher)

    p = sub.add_parser("distill", help="distil the student from the teacher (live or cached) with a chosen loss",
                       description="Distil the student: (1-alpha) CE + alpha D(teacher, student) with D any "
                                   "registered loss, on transformers.Trainer (works under torchrun / Accelerate). "
                                   "Evaluates on held-out data before, every eval_steps and after (loss, "
                                   "teacher-student KL, BLEU-4, ROUGE-L); writes <out>/student with results.json.",
                       epilog=EPILOG, formatter_class=fmt)
    _common(p, loss=True)
    p.add_argument("--teacher-cache", help="teacher cache directory from `pesc cache-teacher` (the teacher is not "
                                           "loaded; losses that need the full vocabulary refuse it)")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("sweep", help="compare distillation losses on one seed, data and budget",
                       description="Fine-tune the teacher once, then distil the same initial student with each "
                                   "loss of the list on the same data, seed and budget, and write the "
                                   "comparison table: per loss the relative change of KL, BLEU-4 and ROUGE-L "
                                   "from the untrained student and the difference from the FKL baseline "
                                   "(sweep.md, sweep.csv, sweep.png in --out).",
                       epilog=EPILOG + " Loss specs: name or name:key=value,key=value (e.g. sinkhorn:cost=cosine).",
                       formatter_class=fmt)
    _common(p)
    p.add_argument("--losses", help="comma-separated loss specs; 'research' = the published rows, 'all' = every "
                                    "registered loss with default parameters (default: research)")
    p.add_argument("--alpha", type=float, help="weight of the distillation term for every loss")
    p.add_argument("--temperature", type=float, help="distillation temperature for every loss")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("push", help="upload a distilled run to the Hugging Face Hub with a model card",
                       description="Upload RUN/student (safetensors weights, tokenizer, generation config), the run "
                                   "config and a model card (base_model, datasets, loss, hyperparameters, "
                                   "model-index of the validation results) to ORG/NAME. The token comes from "
                                   "HF_TOKEN (or HUGGING_FACE_HUB_TOKEN); HF_ENDPOINT selects another Hub.",
                       formatter_class=fmt)
    p.add_argument("run", help="run directory (holding student/ from pesc distill, or a model directory)")
    p.add_argument("--repo-id", required=True, help="target repository, ORG/NAME")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--commit-message", default=None, help="commit message")
    p.add_argument("--dry-run", metavar="DIR", help="write the folder that would be uploaded to DIR, upload nothing")
    p.set_defaults(func=cmd_push)


def cmd_train_teacher(args) -> int:
    from pesc.training.stages import is_main_process, train_teacher

    cfg = build_config(args, lora_field="teacher_lora")
    r = train_teacher(cfg)
    if is_main_process():
        print(f"teacher: {cfg.output_dir}/teacher ({r['steps']} steps, train loss {r['train_loss']:.4f})")
        _print_scores("held-out", {"after": r["eval"].get("after", {})})
    return 0


def cmd_cache_teacher(args) -> int:
    from pesc.training.stages import cache_teacher, is_main_process
    from pesc.training.teacher_cache import TeacherCache

    cfg = build_config(args)
    dest = cache_teacher(cfg, out=args.cache_out, overwrite=args.overwrite)
    if is_main_process():
        c = TeacherCache(dest)
        sizes = ", ".join(f"{k} {v['examples']} examples / {v['positions']} positions"
                          for k, v in c.manifest["splits"].items())
        print(f"teacher cache: {dest} (top-{c.topk}; {sizes})")
    return 0


def cmd_distill(args) -> int:
    from pesc.training.stages import distill, is_main_process

    cfg = build_config(args, lora_field="student_lora")
    r = distill(cfg)
    if is_main_process():
        print(f"student: {cfg.output_dir}/student (loss {r['loss']}, {r['hyperparameters']['steps']} steps, "
              f"train loss {r['train_loss']:.4f})")
        _print_scores("held-out", r["eval"])
    return 0


def cmd_sweep(args) -> int:
    from pesc.training.stages import is_main_process
    from pesc.training.sweep import format_table, parse_loss_specs, run_sweep

    cfg = build_config(args, default_out="runs/sweep-{preset}")
    specs = parse_loss_specs(args.losses or "research")
    table = run_sweep(cfg, specs)
    if is_main_process():
        print("\n" + format_table(table))
        print(f"\nwritten: {cfg.output_dir}/sweep.md, sweep.csv, sweep.png")
    return 0


def cmd_push(args) -> int:
    from pesc.hub import push_run, stage_folder

    if args.dry_run:
        out = stage_folder(args.run, args.dry_run, repo_id=args.repo_id)
        print(f"would upload {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
        return 0
    url = push_run(args.run, args.repo_id, private=args.private, commit_message=args.commit_message)
    print(f"pushed {args.run} to {url}")
    return 0


def _print_scores(title: str, ev: dict) -> None:
    rows = [(k, ev[k]) for k in ("before", "after") if isinstance(ev.get(k), dict) and ev[k]]
    if not rows:
        return
    keys = [k for k in ("kl", "kl_topk", "bleu4", "rougeL", "meteor", "total_no_g") if any(k in r for _, r in rows)]
    print(f"{title:10}" + "".join(f"{k:>12}" for k in keys))
    for name, r in rows:
        print(f"{name:10}" + "".join(f"{r[k]:>12.4f}" if k in r else f"{'':>12}" for k in keys))
