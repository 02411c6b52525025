"""`pesc run`: the whole pipeline on a preset (teacher SFT, distillation, result.json, scores)."""

from __future__ import annotations

import argparse


def parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise argparse.ArgumentTypeError(f"--set expects key=value, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip().replace("-", "_")] = v
    return out


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="run the whole pipeline: fine-tune teacher, distil student, write result.json, score",
        description="Fine-tune the teacher on the training dialogues, distil the student with the chosen "
                    "loss, generate the supporter turns of the test file into result.json, and score the "
                    "student on held-out dialogues (BLEU-4, ROUGE-L, teacher-student KL before/after). "
                    "Artefacts (config, checkpoints, logs, table) go to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=["smoke", "quickstart"], default="smoke",
                   help="smoke: tiny random models (about a minute); quickstart: SmolLM2-135M teacher")
    p.add_argument("--config", help="YAML config file (options of pesc.training.config.RunConfig)")
    p.add_argument("--data", help="directory with the PESC files (train.json and/or val.json, test.json); "
                                  "default: the small sample set shipped with pesc")
    p.add_argument("--out", help="run directory (default runs/<preset>-<loss>)")
    p.add_argument("--loss", help="distillation loss name, e.g. fkl, l1, w1_cdf, sinkhorn, hybrid, layer_emd; "
                                  "its parameters follow as --loss.KEY VALUE (e.g. --loss.cost euclidean "
                                  "--loss.topk 100 --loss.epsilon 0.1)")
    p.add_argument("--alpha", type=float, help="weight of the distillation term: (1-a) CE + a D")
    p.add_argument("--temperature", type=float, help="distillation temperature")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", default=[],
                   help="override any config option, e.g. --set distill_steps=200 max_length=1024")
    p.set_defaults(func=main)


def main(args) -> int:
    from pesc.training.config import load_config
    from pesc.training.pipeline import run_pipeline

    overrides = parse_overrides(args.set)
    for name in ("loss", "alpha", "temperature"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.data:
        overrides["data"] = args.data
    if getattr(args, "loss_args", None):
        from pesc.losses import parse_loss_args

        overrides["loss_params"] = parse_loss_args(args.loss_args, overrides.get("loss"))
    cfg = load_config(args.preset, args.config, overrides)
    if args.out:
        cfg.output_dir = args.out
    elif "output_dir" not in overrides:
        cfg.output_dir = f"runs/{cfg.preset}-{cfg.loss}"
    run_pipeline(cfg)
    return 0
