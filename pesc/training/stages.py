"""The training stages behind `pesc train-teacher`, `pesc cache-teacher` and `pesc distill`.

A run directory holds everything of one run, and the same command run again continues it:

    config.yaml             the resolved config of the latest command (every stage also keeps its own)
    teacher-init/ student-init/   initial models built for the run (smoke models, a cut student)
    teacher/                fine-tuned teacher (adapters merged), results.json, log.jsonl, trainer/
    teacher-cache/          top-k teacher cache (pesc cache-teacher)
    student/                distilled student (adapters merged), distill_loss_state.pt,
                            results.json (validation before/after), log.jsonl, trainer/checkpoint-N

Each stage works the same under `torchrun --nproc_per_node=N` (data parallel, gloo on CPU, NCCL on
GPU): models are built and files written by the main process only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from pesc.errors import ConfigError
from pesc.training.config import RunConfig

RESULTS = "results.json"
HUB_NAMES = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
DATASET_IDS = {"esconv": "thu-coai/esconv", "augesc": "thu-coai/augesc"}
PESC_DATASET = "PESC (NLPCC 2025 shared task 8)"
# Options that may change between a run and its resumption without changing the training itself,
# and, per stage, the options of the other stages.
RESUME_IGNORED = {"output_dir", "resume", "eval_steps", "eval_examples", "eval_generate_dialogues",
                  "eval_dialogues", "logging_steps", "save_steps", "save_total_limit", "max_new_tokens",
                  "gen_batch_size", "kl_temperature", "max_test_dialogues", "cache_batch_size",
                  "cache_shard_positions", "preset"}
STAGE_IGNORED = {
    "teacher": {"distill_steps", "lr", "epochs", "loss", "loss_params", "alpha", "temperature", "student_lora",
                "teacher_cache", "cache_topk"},
    "student": {"teacher_steps", "teacher_lr", "teacher_epochs", "teacher_lora", "cache_topk"},
}


# --- processes -------------------------------------------------------------------------------------

def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def distributed_state():
    """Accelerate's process state when launched by torchrun (None for one process)."""
    if world_size() <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


@contextlib.contextmanager
def main_process_first():
    state = distributed_state()
    if state is None:
        yield
        return
    with state.main_process_first():
        yield


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# --- run directory, config, checkpoints -------------------------------------------------------------

def last_checkpoint(trainer_dir: Path) -> str | None:
    """The newest complete checkpoint (trainer_state.json is written last) or None."""
    if not trainer_dir.is_dir():
        return None
    found = []
    for p in trainer_dir.glob("checkpoint-*"):
        try:
            step = int(p.name.split("-", 1)[1])
        except ValueError:
            continue
        if (p / "trainer_state.json").exists():
            found.append((step, p))
    return str(max(found)[1]) if found else None


def config_diff(old: dict, new: dict, stage: str = "") -> list[str]:
    keys = sorted((set(old) | set(new)) - RESUME_IGNORED - STAGE_IGNORED.get(stage, set()))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def prepare_stage_dir(cfg: RunConfig, stage_dir: Path) -> str | None:
    """Save the stage's config; return the checkpoint to resume from (or None).

    A stage directory with checkpoints of a different config is refused (unless resume=false, which
    starts the stage over), so a resumed run can never silently mix two configurations.
    """
    trainer_dir = stage_dir / "trainer"
    saved = stage_dir / "config.yaml"
    resume = last_checkpoint(trainer_dir) if cfg.resume else None
    if cfg.resume and resume and saved.exists():
        diff = config_diff(yaml.safe_load(saved.read_text(encoding="utf-8")) or {}, asdict(cfg), stage_dir.name)
        if diff:
            raise ConfigError(f"{stage_dir} holds checkpoints of a run with another config ({'; '.join(diff)}); "
                              "use another --out, or --set resume=false to start this stage over")
    if is_main_process():
        if not cfg.resume and trainer_dir.exists():
            shutil.rmtree(trainer_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(saved)
        cfg.save(Path(cfg.output_dir) / "config.yaml")
    barrier()
    return resume


# --- data and models ------------------------------------------------------------------------------

def load_trainable(path: str, dtype: str = "float32"):
    """`pesc.models.load_model`, and a model whose weights are plain floating point but whose
    config still names GGUF as its quantization (SmolLM2 dequantised from the packaged GGUF) is
    marked as the plain model it is: otherwise the Trainer refuses to fine-tune it."""
    from pesc.models import load_model

    model = load_model(path, dtype)
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    method = getattr(quant, "quant_method", None) if not isinstance(quant, dict) else quant.get("quant_method")
    if getattr(model, "is_quantized", False) and str(getattr(method, "value", method)) == "gguf" \
            and all(p.is_floating_point() for p in model.parameters()):
        model.is_quantized = False
        model.hf_quantizer = None
        del model.config.quantization_config
    return model


@dataclass
class RunContext:
    cfg: RunConfig
    run_dir: Path
    data: object                 # pesc.training.pipeline.RunData
    teacher_init: str
    student_init: str
    tokenizer: object
    train_ex: list
    eval_ex: list                # validation subset for loss / KL
    eval_dialogues: list         # validation dialogues generated + scored during training
    final_dialogues: list        # validation dialogues generated + scored before / after (eval_dialogues)

    @property
    def vocab(self) -> int:
        return len(self.tokenizer)


def _resolve_initial_models(cfg: RunConfig, data, run_dir: Path) -> tuple[str, str]:
    """Initial teacher and student paths; reuses what an earlier stage of the run built."""
    from pesc.training.pipeline import prepare_models

    t_init, s_init = run_dir / "teacher-init", run_dir / "student-init"
    if cfg.teacher == "smoke" and (t_init / "config.json").exists() and (s_init / "config.json").exists():
        return str(t_init), str(s_init)
    if cfg.teacher != "smoke" and cfg.student == "from-teacher" and (s_init / "config.json").exists():
        teacher = cfg.teacher
        if teacher == "smollm2":
            from pesc.models.pretrained import materialise_smollm2

            teacher = str(materialise_smollm2(Path.home() / ".cache" / "pesc" / "smollm2-135m-instruct-f32"))
        return teacher, str(s_init)
    return prepare_models(cfg, data, run_dir)


def build_context(cfg: RunConfig, data=None) -> RunContext:
    from pesc.data.examples import build_examples
    from pesc.models import load_tokenizer
    from pesc.training.pipeline import load_run_data

    check_config(cfg)
    run_dir = Path(cfg.output_dir)
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    data = data if data is not None else load_run_data(cfg)
    with main_process_first():
        teacher_init, student_init = _resolve_initial_models(cfg, data, run_dir)
    tokenizer = load_tokenizer(student_init)
    train_ex = build_examples(data.train, tokenizer, cfg.max_length)
    held_ex = build_examples(data.heldout, tokenizer, cfg.max_length)
    if not train_ex:
        raise ConfigError("no training examples (no supporter turn after a seeker turn in the training data)")
    eval_ex = held_ex[: cfg.eval_examples] if cfg.eval_examples else []
    gold = [d for d in data.heldout if d.turns and all(t.text.strip() for t in d.turns if t.role == "supporter")]
    periodic = gold[: cfg.eval_generate_dialogues] if cfg.eval_generate_dialogues else []
    final = gold[: cfg.eval_dialogues] if cfg.eval_dialogues is not None else gold
    return RunContext(cfg, run_dir, data, teacher_init, student_init, tokenizer, train_ex, eval_ex, periodic, final)


def check_config(cfg: RunConfig) -> None:
    for name in ("batch_size", "grad_accum", "lora_r", "cache_topk", "max_length"):
        if int(getattr(cfg, name)) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {cfg.alpha}")
    if cfg.temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {cfg.temperature}")
    if cfg.eval_steps < 0 or cfg.save_steps < 0:
        raise ConfigError("eval_steps and save_steps must be >= 0")


def trained_teacher_path(ctx: RunContext) -> str:
    """The fine-tuned teacher of this run, or the initial one when the run does no teacher training."""
    p = ctx.run_dir / "teacher"
    if (p / "config.json").exists() and any(p.glob("*.safetensors")):
        return str(p)
    if ctx.cfg.teacher_steps == 0 and not ctx.cfg.teacher_epochs:
        return ctx.teacher_init
    raise ConfigError(f"no fine-tuned teacher in {p}: run `pesc train-teacher` with the same --out first, "
                      "or --set teacher_steps=0 to distil from the untuned teacher")


def base_model_id(cfg: RunConfig) -> str | None:
    """The Hub id the student's weights come from (None for models built from scratch)."""
    from pesc.data.hub import HUB_ID

    def hub(name: str) -> str | None:
        name = HUB_NAMES.get(name, name)
        return name if HUB_ID.fullmatch(name) and not Path(name).exists() else None

    if cfg.student == "from-teacher":
        return hub(cfg.teacher) if cfg.teacher != "smoke" else None
    if cfg.student == "smoke":
        return None
    return hub(cfg.student)


def dataset_names(cfg: RunConfig) -> list[str]:
    return [PESC_DATASET] + [DATASET_IDS.get(s.split(":")[0], s) for s in cfg.extra_train]


def dtype_args(cfg: RunConfig) -> dict:
    out = {}
    if torch.cuda.is_available() and cfg.dtype == "bfloat16":
        out["bf16"] = True
    if cfg.gradient_checkpointing:
        out.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    return out


def run_training(trainer, resume: str | None):
    """trainer.train(), resuming from `resume`. A checkpoint that already holds the final step is
    loaded as it is (the Trainer would otherwise take one more step past max_steps)."""
    from transformers.trainer_utils import TrainOutput

    if resume:
        from transformers import TrainerState

        state = TrainerState.load_from_json(os.path.join(resume, "trainer_state.json"))
        if state.max_steps and state.global_step >= state.max_steps:
            trainer._load_from_checkpoint(resume)
            if hasattr(trainer, "load_loss_state"):
                trainer.load_loss_state(resume)
            trainer.state = state
            losses = [r["train_loss"] for r in state.log_history if "train_loss" in r] or \
                [r["loss"] for r in state.log_history if "loss" in r]
            loss = losses[-1] if losses else float("nan")
            print(f"{resume} is the final checkpoint ({state.global_step} steps): nothing left to train")
            return TrainOutput(state.global_step, loss, {})
    return trainer.train(resume_from_checkpoint=resume)


def _write_log(trainer, stage_dir: Path, stage: str) -> None:
    with open(stage_dir / "log.jsonl", "w", encoding="utf-8") as f:
        for rec in trainer.state.log_history:
            f.write(json.dumps({"stage": stage, **rec}) + "\n")


def _args(cfg: RunConfig, stage_dir: Path, *, steps, epochs, lr, eval_on: bool):
    from pesc.training.trainer import training_args

    n_steps = steps if not epochs else 0
    logging = cfg.logging_steps or max(1, (n_steps or 60) // 6)
    return training_args(str(stage_dir / "trainer"), steps=steps, epochs=epochs, lr=lr,
                         batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, seed=cfg.seed,
                         warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay, logging_steps=logging,
                         save_steps=cfg.save_steps or None, save_total_limit=cfg.save_total_limit,
                         eval_steps=(cfg.eval_steps or None) if eval_on else None,
                         max_grad_norm=cfg.max_grad_norm, **dtype_args(cfg))


def _evaluator(ctx: RunContext, *, teacher=None, cache=None, final: bool = False):
    from pesc.training.evaluation import FINAL_METRICS, PERIODIC_METRICS, ValidationEvaluator

    cfg = ctx.cfg
    return ValidationEvaluator(
        tokenizer=ctx.tokenizer, examples=ctx.eval_ex, dialogues=ctx.final_dialogues if final else ctx.eval_dialogues,
        teacher=teacher, cache=cache,
        kl_temperature=cfg.kl_temperature, vocab_size=ctx.vocab, max_new_tokens=cfg.max_new_tokens,
        gen_batch_size=cfg.gen_batch_size, max_prompt_tokens=cfg.max_length, seed=cfg.seed,
        metrics=FINAL_METRICS if final else PERIODIC_METRICS, progress=final and is_main_process())


def _eval_summary(ctx: RunContext) -> dict:
    return {"examples": len(ctx.eval_ex), "dialogues": len(ctx.final_dialogues),
            "turns": sum(1 for d in ctx.final_dialogues for t in d.turns if t.role == "supporter"),
            "kl_temperature": ctx.cfg.kl_temperature}


def eval_key(ctx: RunContext, teacher_desc: str) -> dict:
    """What the untrained student's scores depend on: reuse them only when all of it is the same."""
    from pesc.training.teacher_cache import examples_fingerprint

    cfg = ctx.cfg
    return {"student_init": ctx.student_init, "teacher": teacher_desc, "eval_examples": examples_fingerprint(ctx.eval_ex),
            "dialogues": [d.id for d in ctx.final_dialogues], "kl_temperature": cfg.kl_temperature,
            "max_new_tokens": cfg.max_new_tokens, "max_length": cfg.max_length, "seed": cfg.seed}


def untrained_scores(ctx: RunContext, stage_dir: Path, student, evaluator, teacher_desc: str) -> dict:
    """Validation scores of the student before distillation, cached in <stage>/before.json."""
    path = stage_dir / "before.json"
    key = eval_key(ctx, teacher_desc)
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return saved["scores"]
    scores = evaluator.evaluate(student) if (ctx.eval_ex or ctx.final_dialogues) else {}
    if is_main_process():
        stage_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "scores": scores}, indent=2), encoding="utf-8")
    return scores


# --- stages ---------------------------------------------------------------------------------------

def train_teacher(cfg: RunConfig, data=None, *, callbacks=()) -> dict:
    """Fine-tune the teacher on the training dialogues (LoRA if teacher_lora); save it merged."""
    from pesc.training.lora import maybe_lora, merge_and_save
    from pesc.training.trainer import Collator, ExampleDataset, SFTTrainer

    ctx = build_context(cfg, data)
    stage_dir = ctx.run_dir / "teacher"
    resume = prepare_stage_dir(cfg, stage_dir)
    model = maybe_lora(load_trainable(ctx.teacher_init, cfg.dtype), cfg.teacher_lora, cfg).train()
    eval_on = bool(cfg.eval_steps and ctx.eval_ex)
    args = _args(cfg, stage_dir, steps=cfg.teacher_steps, epochs=cfg.teacher_epochs, lr=cfg.teacher_lr,
                 eval_on=eval_on)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ExampleDataset(ctx.train_ex),
                         eval_dataset=ExampleDataset(ctx.eval_ex, "eval") if eval_on else None,
                         data_collator=Collator(ctx.tokenizer.pad_token_id),
                         evaluator=_evaluator(ctx) if eval_on else None, callbacks=list(callbacks))
    out = run_training(trainer, resume)
    model = trainer.model.eval()
    final = _evaluator(ctx, final=True).evaluate(model) if ctx.final_dialogues else {}
    results = {"stage": "train-teacher", "teacher_init": ctx.teacher_init, "lora": cfg.teacher_lora,
               "steps": trainer.state.global_step, "epochs": trainer.state.epoch,
               "train_loss": out.training_loss, "train_examples": len(ctx.train_ex),
               "eval": {**_eval_summary(ctx), "after": final}, "data": ctx.data.description}
    if is_main_process():
        merge_and_save(model, ctx.tokenizer, stage_dir, adapter_dir=stage_dir / "adapter" if cfg.teacher_lora else None)
        (stage_dir / RESULTS).write_text(json.dumps(results, indent=2), encoding="utf-8")
        _write_log(trainer, stage_dir, "teacher")
    barrier()
    return results


def cache_teacher(cfg: RunConfig, data=None, *, out: str | None = None, overwrite: bool = False,
                  progress: bool = True) -> Path:
    """Run the run's teacher over the training and validation examples; write the top-k cache."""
    from pesc.models import load_model, require_shared_vocab
    from pesc.training.teacher_cache import build_teacher_cache

    if world_size() > 1:
        raise ConfigError("run pesc cache-teacher as one process (not under torchrun): it runs the teacher "
                          "once, without gradients; distillation from the cache can then use many processes")
    ctx = build_context(cfg, data)
    teacher_path = trained_teacher_path(ctx)
    require_shared_vocab(teacher_path, ctx.vocab, "the teacher cache")
    dest = Path(out) if out else ctx.run_dir / "teacher-cache"
    if is_main_process():
        teacher = load_model(teacher_path, cfg.dtype)
        build_teacher_cache(teacher, {"train": ctx.train_ex, "eval": ctx.eval_ex}, dest, topk=cfg.cache_topk,
                            temperature=cfg.temperature,
                            vocab_size=ctx.vocab, pad_id=ctx.tokenizer.pad_token_id,
                            batch_size=cfg.cache_batch_size, shard_positions=cfg.cache_shard_positions,
                            teacher_name=teacher_path, progress=progress, overwrite=overwrite)
    barrier()
    return dest


def distill(cfg: RunConfig, data=None, *, callbacks=()) -> dict:
    """Distil the student from the live teacher or the teacher cache; evaluate before and after."""
    from pesc.losses import build_loss
    from pesc.models import require_shared_vocab
    from pesc.training.lora import maybe_lora, merge_and_save
    from pesc.training.teacher_cache import TeacherCache
    from pesc.training.trainer import LOSS_STATE_NAME, Collator, DistillTrainer, ExampleDataset

    ctx = build_context(cfg, data)
    stage_dir = ctx.run_dir / "student"
    loss = build_loss(cfg.loss, temperature=cfg.temperature, vocab_size=ctx.vocab, **(cfg.loss_params or {}))
    teacher = cache = None
    eval_on = bool(cfg.eval_steps and ctx.eval_ex)
    if cfg.teacher_cache:
        cache = TeacherCache(cfg.teacher_cache)
        from pesc.training.trainer import check_cache_compatible

        check_cache_compatible(loss, cache)
        cache.check("train", ctx.train_ex, ctx.vocab)
        if ctx.eval_ex and "eval" in cache.split_names:
            cache.check("eval", ctx.eval_ex, ctx.vocab)
        elif eval_on:
            raise ConfigError(f"teacher cache {cache.path} has no validation split; rebuild it with "
                              "pesc cache-teacher or set eval_steps=0")
        teacher_desc = f"teacher cache {cache.path} (top-{cache.topk} of {cache.manifest.get('teacher')})"
    else:
        teacher_path = trained_teacher_path(ctx)
        require_shared_vocab(teacher_path, ctx.vocab, "distillation here")
        teacher = load_trainable(teacher_path, cfg.dtype)
        teacher_desc = teacher_path
    resume = prepare_stage_dir(cfg, stage_dir)
    student = load_trainable(ctx.student_init, cfg.dtype)

    final_eval = _evaluator(ctx, teacher=teacher, cache=cache, final=True)
    before = untrained_scores(ctx, stage_dir, student, final_eval, teacher_desc)

    student = maybe_lora(student, cfg.student_lora, cfg).train()
    args = _args(cfg, stage_dir, steps=cfg.distill_steps, epochs=cfg.epochs, lr=cfg.lr, eval_on=eval_on)
    trainer = DistillTrainer(model=student, args=args, train_dataset=ExampleDataset(ctx.train_ex),
                             eval_dataset=ExampleDataset(ctx.eval_ex, "eval") if eval_on else None,
                             data_collator=Collator(ctx.tokenizer.pad_token_id), teacher=teacher,
                             teacher_cache=cache, distill_loss=loss, alpha=cfg.alpha, vocab_size=ctx.vocab,
                             evaluator=_evaluator(ctx, teacher=teacher, cache=cache) if eval_on else None,
                             callbacks=list(callbacks))
    out = run_training(trainer, resume)
    model = trainer.model.eval()
    after = final_eval.evaluate(model) if (ctx.eval_ex or ctx.final_dialogues) else {}
    results = {
        "stage": "distill", "preset": cfg.preset, "loss": cfg.loss, "loss_params": cfg.loss_params,
        "alpha": cfg.alpha, "temperature": cfg.temperature, "teacher": teacher_desc,
        "student_init": ctx.student_init, "base_model": base_model_id(cfg), "datasets": dataset_names(cfg),
        "lora": ({"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                  "target_modules": cfg.lora_target_modules} if cfg.student_lora else None),
        "hyperparameters": {"lr": cfg.lr, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                            "processes": world_size(), "max_length": cfg.max_length,
                            "steps": trainer.state.global_step, "epochs": round(float(trainer.state.epoch or 0), 4),
                            "warmup_ratio": cfg.warmup_ratio, "weight_decay": cfg.weight_decay, "seed": cfg.seed},
        "train_loss": out.training_loss, "train_examples": len(ctx.train_ex), "data": ctx.data.description,
        "eval": {**_eval_summary(ctx), "before": before, "after": after},
    }
    if is_main_process():
        merge_and_save(model, ctx.tokenizer, stage_dir,
                       adapter_dir=stage_dir / "adapter" if cfg.student_lora else None)
        state = trainer.distill_loss.state_dict()
        if state:
            torch.save({k: v.detach().cpu() for k, v in state.items()}, stage_dir / LOSS_STATE_NAME)
        (stage_dir / RESULTS).write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
        _write_log(trainer, stage_dir, "student")
    barrier()
    return results
