"""The thin slice, end to end: data -> teacher SFT -> distillation -> result.json -> score table.

    pesc run --preset smoke --data ../shared/data/pesc

Every artefact lands in the run directory: config.yaml, teacher/, student-init/, student/,
result.json, summary.json (the table), log.jsonl.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from pesc.data.dialogue import Dialogue
from pesc.data.pesc_json import dump_pesc, load_pesc
from pesc.errors import ConfigError
from pesc.training.config import RunConfig

log = logging.getLogger("pesc.run")


@dataclass
class RunData:
    train: list[Dialogue]
    heldout: list[Dialogue]
    test: list[Dialogue]
    description: str


def blank_supporters(dialogues: list[Dialogue]) -> list[Dialogue]:
    return [d.with_supporter_texts([""] * len(d.supporter_indices())) for d in dialogues]


def load_run_data(cfg: RunConfig) -> RunData:
    """Train / held-out / test dialogues from `cfg.data` (a PESC directory) or the shipped samples."""
    from pesc.data import load_dialogues, split_dialogues
    from pesc.data.samples import sample_path

    if cfg.data:
        root = Path(cfg.data)
        if not root.is_dir():
            raise ConfigError(f"--data {cfg.data}: not a directory (expected train/val/test.json)")
        val = load_pesc(root / "val.json") if (root / "val.json").exists() else []
        if (root / "train.json").exists():
            train, heldout = load_pesc(root / "train.json"), val
        elif val:
            train, heldout = split_dialogues(val, cfg.holdout_dialogues, seed=cfg.seed)
        else:
            raise ConfigError(f"{root}: needs train.json or val.json")
        test_path = root / "test.json"
        test = load_pesc(test_path) if test_path.exists() else blank_supporters(heldout)
        desc = f"{root} (train {len(train)}, held-out {len(heldout)}, test {len(test)} dialogues)"
    else:
        samples = load_pesc(sample_path())
        train, heldout = split_dialogues(samples, max(1, min(cfg.holdout_dialogues, len(samples) // 4)),
                                         seed=cfg.seed)
        test = blank_supporters(heldout)
        desc = f"shipped sample set ({len(train)} train, {len(heldout)} held-out dialogues)"
    for spec in cfg.extra_train:
        train = train + load_dialogues(spec, split="train")
    if cfg.max_train_dialogues:
        train = train[: cfg.max_train_dialogues]
    if cfg.max_test_dialogues:
        test = test[: cfg.max_test_dialogues]
    return RunData(train, heldout, test, desc)


def prepare_models(cfg: RunConfig, data: RunData, run_dir: Path):
    """Paths of the initial teacher and student (built, converted or resolved)."""
    from pesc.models.pretrained import materialise_smollm2, pruned_layer_subset, student_from_teacher
    from pesc.models import load_model, load_tokenizer, save_model

    if cfg.teacher == "smoke":
        from pesc.models.smoke import build_smoke_models

        teacher_path, student_path = build_smoke_models(
            data.train, run_dir, teacher_layers=cfg.smoke_teacher_layers, student_layers=cfg.student_layers,
            hidden=cfg.smoke_hidden, vocab_size=cfg.smoke_vocab_size, seed=cfg.seed)
        return str(teacher_path), str(student_path)
    teacher_path = cfg.teacher
    if cfg.teacher == "smollm2":
        teacher_path = str(materialise_smollm2(Path.home() / ".cache" / "pesc" / "smollm2-135m-instruct-f32"))
    if cfg.student == "from-teacher":
        teacher = load_model(teacher_path, cfg.dtype, device="cpu")
        layers = pruned_layer_subset(teacher.config.num_hidden_layers, cfg.student_layers)
        student = student_from_teacher(teacher, layers)
        student_path = run_dir / "student-init"
        save_model(student, load_tokenizer(teacher_path), student_path)
        (student_path / "pesc_layers.json").write_text(json.dumps({"teacher_layers": layers}))
        del teacher, student
        return teacher_path, str(student_path)
    return teacher_path, cfg.student


class Timer:
    """Named wall-clock sections, printed as headers so a long run shows where it is."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        print(f"\n== {name}", flush=True)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = round(time.perf_counter() - t, 1)


def run_pipeline(cfg: RunConfig) -> dict:
    """Teacher SFT -> distillation (stages, evaluated before/after) -> result.json -> summary table."""
    from pesc.generation import GenerationOptions, generate_dialogues
    from pesc.models import load_model, load_tokenizer
    from pesc.training.stages import distill, train_teacher

    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    with timer("data"):
        data = load_run_data(cfg)
        print(f"data: {data.description}")
    teacher_res = None
    if cfg.teacher_steps > 0 or cfg.teacher_epochs:
        with timer("teacher fine-tuning"):
            teacher_res = train_teacher(cfg, data)
    with timer("distillation (with evaluation before and after)"):
        res = distill(cfg, data)
    cfg.save(run_dir / "config.yaml")

    with timer("generate test result.json"):
        student_dir = run_dir / "student"
        student, tokenizer = load_model(str(student_dir), cfg.dtype), load_tokenizer(str(student_dir))
        options = GenerationOptions(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size,
                                    do_sample=False, seed=cfg.seed, max_prompt_tokens=cfg.max_length)
        filled = generate_dialogues(student, tokenizer, data.test, options,
                                    checkpoint_path=run_dir / "result.partial.json")
        dump_pesc(filled, run_dir / "result.json")
        problems = check_against_test(run_dir / "result.json", data.test)

    ev = res["eval"]
    before, after = ev.get("before", {}), ev.get("after", {})
    teacher_after = (teacher_res or {}).get("eval", {}).get("after", {})
    kl0, kl1 = before.get("kl"), after.get("kl")
    summary = {
        "preset": cfg.preset, "loss": cfg.loss, "loss_params": cfg.loss_params, "alpha": cfg.alpha,
        "temperature": cfg.temperature, "data": data.description, "teacher": res["teacher"],
        "student_init": res["student_init"], "kl_temperature": cfg.kl_temperature,
        "eval_examples": ev.get("examples"), "eval_turns": ev.get("turns"),
        "kl_before": kl0, "kl_after": kl1,
        "kl_relative_change": (kl1 - kl0) / kl0 if kl0 and kl1 is not None else None,
        "kl_sum_before": before.get("kl_sum"), "kl_sum_after": after.get("kl_sum"),
        "scores": {"teacher": teacher_after, "student_before": before, "student_after": after},
        "result_json": str(run_dir / "result.json"), "test_dialogues": len(filled),
        "result_check_problems": problems, "seconds": timer.times,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print("\n" + format_summary(summary))
    return summary


def check_against_test(result_path: Path, test: list[Dialogue]) -> list[str]:
    """The submission pre-flight check on the written file; problems are reported, not fatal."""
    from submission.check import check_result

    report = check_result(result_path, test)
    if not report.ok:
        print(report.format())
    return [f"{p.dialogue_id}/{p.turn}: {p.message}" for p in report.problems]


def _fmt(v, scale=1.0, digits=4):
    return "-" if v is None else f"{v * scale:.{digits}f}"


def format_summary(s: dict) -> str:
    out = [f"pesc run: preset {s['preset']}, loss {s['loss']} (alpha {s['alpha']}, tau {s['temperature']})",
           f"data: {s['data']}", ""]
    change = s["kl_relative_change"]
    out.append(f"{'teacher-student KL on ' + str(s['eval_examples']) + ' held-out examples':52} "
               f"{'before':>9} {'after':>9} {'change':>8}")
    out.append(f"{'  per token, tau=' + str(s['kl_temperature']):52} {_fmt(s['kl_before']):>9} "
               f"{_fmt(s['kl_after']):>9} {('-' if change is None else f'{100 * change:+.1f}%'):>8}")
    out.append(f"{'  per-example sum (research convention)':52} {_fmt(s['kl_sum_before'], digits=2):>9} "
               f"{_fmt(s['kl_sum_after'], digits=2):>9}")
    out.append("")
    names = [("bleu4", "BLEU-4"), ("rougeL", "ROUGE-L"), ("meteor", "METEOR"), ("distinct2", "D-2")]
    out.append(f"{'held-out replies (' + str(s['eval_turns']) + ' turns, gold history, x100)':52} "
               + " ".join(f"{label:>9}" for _, label in names))
    for who, label in (("teacher", "teacher (fine-tuned)"), ("student_before", "student before distillation"),
                       ("student_after", "student after distillation")):
        row = s["scores"].get(who) or {}
        out.append(f"{'  ' + label:52} " + " ".join(f"{_fmt(row.get(k), 100, 2):>9}" for k, _ in names))
    out.append("")
    n_prob = len(s["result_check_problems"])
    out.append(f"result.json: {s['result_json']} ({s['test_dialogues']} dialogues; pre-flight check: "
               f"{'passed' if not n_prob else str(n_prob) + ' problems'})")
    out.append("time (s): " + ", ".join(f"{k} {v}" for k, v in s["seconds"].items()))
    return "\n".join(out)
