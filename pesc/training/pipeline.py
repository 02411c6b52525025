"""The thin slice, end to end: data -> teacher SFT -> distillation -> result.json -> score table.

    pesc run --preset smoke --data ../shared/data/pesc

Every artefact lands in the run directory: config.yaml, teacher/, student-init/, student/,
result.json, summary.json (the table), log.jsonl.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pesc.data.dialogue import Dialogue, Turn
from pesc.data.examples import build_examples
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
    from pesc.models.pretrained import even_layer_subset, materialise_smollm2, student_from_teacher
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
        layers = even_layer_subset(teacher.config.num_hidden_layers, cfg.student_layers)
        student = student_from_teacher(teacher, layers)
        student_path = run_dir / "student-init"
        save_model(student, load_tokenizer(teacher_path), student_path)
        (student_path / "pesc_layers.json").write_text(json.dumps({"teacher_layers": layers}))
        del teacher, student
        return teacher_path, str(student_path)
    return teacher_path, cfg.student


class Timer:
    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name):
        timer = self

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()
                print(f"\n== {name}", flush=True)

            def __exit__(self, *exc):
                timer.times[name] = round(time.perf_counter() - self.t, 1)
        return _T()


def fit(trainer_cls, model, examples, tokenizer, out_dir: Path, *, steps, lr, cfg: RunConfig, **kw):
    from pesc.training.trainer import Collator, ExampleDataset, training_args

    args = training_args(str(out_dir / "trainer"), steps=steps, lr=lr, batch_size=cfg.batch_size,
                         grad_accum=cfg.grad_accum, seed=cfg.seed, warmup_ratio=cfg.warmup_ratio,
                         weight_decay=cfg.weight_decay, logging_steps=max(1, steps // 6))
    trainer = trainer_cls(model=model, args=args, train_dataset=ExampleDataset(examples),
                          data_collator=Collator(tokenizer.pad_token_id), **kw)
    trainer.train()
    with open(out_dir / "log.jsonl", "a", encoding="utf-8") as f:
        for rec in trainer.state.log_history:
            f.write(json.dumps({"stage": out_dir.name, **rec}) + "\n")
    return trainer


def run_pipeline(cfg: RunConfig) -> dict:
    from pesc.generation import GenerationOptions, generate_dialogues
    from pesc.losses import build_loss
    from pesc.metrics import score_texts
    from pesc.metrics.kl import teacher_student_kl
    from pesc.models import load_model, load_tokenizer, save_model
    from pesc.training.trainer import DistillTrainer, SFTTrainer

    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    timer = Timer()

    with timer("data"):
        data = load_run_data(cfg)
        print(f"data: {data.description}")
    with timer("models"):
        teacher_path, student_path = prepare_models(cfg, data, run_dir)
        tokenizer = load_tokenizer(teacher_path)
        student_tok = load_tokenizer(student_path)
        if len(student_tok) != len(tokenizer):
            raise ConfigError("teacher and student tokenizers differ; the pipeline distils one family")
        train_ex = build_examples(data.train, tokenizer, cfg.max_length)
        held_ex = build_examples(data.heldout, tokenizer, cfg.max_length)
        print(f"examples: {len(train_ex)} train, {len(held_ex)} held-out (max_length {cfg.max_length})")
        teacher = load_model(teacher_path, cfg.dtype)
        student = load_model(student_path, cfg.dtype)
        vocab = len(tokenizer)

    if cfg.teacher_steps > 0:
        with timer("teacher fine-tuning"):
            fit(SFTTrainer, teacher.train(), train_ex, tokenizer, run_dir / "teacher",
                steps=cfg.teacher_steps, lr=cfg.teacher_lr, cfg=cfg)
            teacher.eval()
            save_model(teacher, tokenizer, run_dir / "teacher")

    with timer("KL before distillation"):
        kl_before = teacher_student_kl(teacher, student, held_ex, tokenizer.pad_token_id,
                                       temperature=cfg.kl_temperature, vocab_size=vocab)
    with timer("distillation"):
        loss = build_loss(cfg.loss, temperature=cfg.temperature, vocab_size=vocab, **cfg.loss_params)
        trainer = fit(DistillTrainer, student.train(), train_ex, tokenizer, run_dir / "student",
                      steps=cfg.distill_steps, lr=cfg.lr, cfg=cfg, teacher=teacher, distill_loss=loss,
                      alpha=cfg.alpha, vocab_size=vocab)
        student.eval()
        save_model(student, tokenizer, run_dir / "student")
        extra = trainer.distill_loss.state_dict()
        if extra:
            torch.save(extra, run_dir / "student" / "distill_loss_state.pt")
    with timer("KL after distillation"):
        kl_after = teacher_student_kl(teacher, student, held_ex, tokenizer.pad_token_id,
                                      temperature=cfg.kl_temperature, vocab_size=vocab)

    options = GenerationOptions(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size,
                                do_sample=False, seed=cfg.seed, max_prompt_tokens=cfg.max_length)
    with timer("generate test result.json"):
        filled = generate_dialogues(student, tokenizer, data.test, options,
                                    checkpoint_path=run_dir / "result.partial.json")
        dump_pesc(filled, run_dir / "result.json")
    with timer("score held-out"):
        eval_dialogues = data.heldout[: cfg.eval_dialogues] if cfg.eval_dialogues else data.heldout
        refs = [t.text for d in eval_dialogues for t in d.turns if t.role == "supporter"]
        rows = {}
        for name, model in (("teacher", teacher), ("student", student)):
            gen = generate_dialogues(model, tokenizer, eval_dialogues, options, use_gold_history=True,
                                     progress=True)
            preds = [t.text for d in gen for t in d.turns if t.role == "supporter"]
            rows[name] = score_texts(preds, refs, metrics=("bleu4", "rougeL"))

    summary = {
        "preset": cfg.preset, "loss": cfg.loss, "alpha": cfg.alpha, "temperature": cfg.temperature,
        "data": data.description, "teacher": teacher_path, "student_init": student_path,
        "heldout_examples": len(held_ex), "eval_turns": len(refs),
        "kl_temperature": cfg.kl_temperature,
        "kl_before": kl_before.per_token_mean, "kl_after": kl_after.per_token_mean,
        "kl_relative_change": (kl_after.per_token_mean - kl_before.per_token_mean) / kl_before.per_token_mean,
        "kl_sum_before": kl_before.per_example_sum_mean, "kl_sum_after": kl_after.per_example_sum_mean,
        "teacher_bleu4": rows["teacher"]["bleu4"], "teacher_rougeL": rows["teacher"]["rougeL"],
        "student_bleu4": rows["student"]["bleu4"], "student_rougeL": rows["student"]["rougeL"],
        "result_json": str(run_dir / "result.json"), "test_dialogues": len(filled),
        "seconds": timer.times,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print("\n" + format_summary(summary))
    return summary


def format_summary(s: dict) -> str:
    rows = [
        ("teacher-student KL (per token, tau={})".format(s["kl_temperature"]),
         f"{s['kl_before']:.4f}", f"{s['kl_after']:.4f}", f"{100 * s['kl_relative_change']:+.1f}%"),
        ("KL, per-example sum (research convention)", f"{s['kl_sum_before']:.2f}", f"{s['kl_sum_after']:.2f}", ""),
    ]
    out = [f"pesc run: preset {s['preset']}, loss {s['loss']} (alpha {s['alpha']}, tau {s['temperature']})",
           f"data: {s['data']}", ""]
    out.append(f"{'':48} {'before':>10} {'after':>10} {'change':>8}")
    out += [f"{a:48} {b:>10} {c:>10} {d:>8}" for a, b, c, d in rows]
    out.append("")
    out.append(f"{'held-out scores (' + str(s['eval_turns']) + ' turns, x100)':48} {'BLEU-4':>10} {'ROUGE-L':>10}")
    for who in ("teacher", "student"):
        out.append(f"{who:48} {100 * s[who + '_bleu4']:>10.2f} {100 * s[who + '_rougeL']:>10.2f}")
    out.append("")
    out.append(f"result.json: {s['result_json']} ({s['test_dialogues']} dialogues)")
    out.append("time (s): " + ", ".join(f"{k} {v}" for k, v in s["seconds"].items()))
    return "\n".join(out)
