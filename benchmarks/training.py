"""Training speed, printed as ratios (one run):

1. distillation steps per second with a live teacher vs from the teacher cache (`pesc cache-teacher`),
   at the smoke and quickstart sizes (quickstart: SmolLM2-135M teacher, 10-layer student cut from
   it), for a fully fine-tuned student and for a LoRA student (the research setting). Same student,
   data, batch, loss (fkl, which runs from either) and optimizer; the first steps are warm-up and
   not timed. The cache build is a one-off cost, reported separately.

   What bounds the ratio: a step from the cache saves the teacher's forward pass, so
   cache/live = (S + T) / S with S the student's step (forward + backward + update) and T the
   teacher's forward. A full fine-tuning backward costs about twice a forward, so a teacher of
   twice (smoke) or three times (quickstart) the student's depth gives about 1.5-1.7x; a LoRA
   student skips the weight gradients of its frozen layers, S shrinks, and the ratio grows.
2. two processes (`torchrun --nproc_per_node=2`, gloo) vs one on the same global batch (smoke).

    python benchmarks/training.py [--data ../shared/data/pesc] [--steps 8] [--sizes smoke,quickstart]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class StepClock(TrainerCallback):
    """Wall time between consecutive optimizer steps (data, teacher, forward, backward, update)."""

    def __init__(self):
        self.stamps: list[float] = []

    def on_step_end(self, args, state, control, **kw):
        self.stamps.append(time.perf_counter())

    def on_step_begin(self, args, state, control, **kw):
        if not self.stamps:
            self.stamps.append(time.perf_counter())

    def steps_per_second(self, warmup: int) -> float:
        """1 / median step time after the warm-up steps (robust to other jobs on a shared machine)."""
        import statistics

        s = self.stamps[warmup:]
        return 1.0 / statistics.median(b - a for a, b in zip(s, s[1:]))


def time_distill(ctx, *, teacher=None, cache=None, steps: int, warmup: int, out: Path, lora: bool = False) -> float:
    from pesc.losses import build_loss
    from pesc.training.lora import apply_lora
    from pesc.training.stages import load_trainable
    from pesc.training.trainer import Collator, DistillTrainer, ExampleDataset, training_args

    cfg = ctx.cfg
    clock = StepClock()
    args = training_args(str(out), steps=warmup + steps + 1, lr=cfg.lr, batch_size=cfg.batch_size,
                         seed=cfg.seed, logging_steps=10_000, disable_tqdm=True)
    student = load_trainable(ctx.student_init, cfg.dtype)
    if lora:
        student = apply_lora(student, r=16, alpha=32, dropout=0.05)
    trainer = DistillTrainer(model=student.train(), args=args,
                             train_dataset=ExampleDataset(ctx.train_ex), data_collator=Collator(ctx.tokenizer.pad_token_id),
                             teacher=teacher, teacher_cache=cache, vocab_size=ctx.vocab, alpha=cfg.alpha,
                             distill_loss=build_loss("fkl", temperature=cfg.temperature, vocab_size=ctx.vocab),
                             callbacks=[clock])
    trainer.train()
    return clock.steps_per_second(warmup)


def live_vs_cache(preset: str, data_dir: str | None, steps: int, warmup: int, work: Path,
                  extra: dict | None = None, rounds: int = 2) -> dict:
    from pesc.models import load_model
    from pesc.training import stages
    from pesc.training.config import load_config
    from pesc.training.teacher_cache import TeacherCache

    over = {"output_dir": str(work / preset), "teacher_steps": 0, "eval_examples": 0, "eval_dialogues": 0,
            "eval_generate_dialogues": 0}
    if data_dir:
        over["data"] = data_dir
    if preset == "smoke":
        over["max_train_dialogues"] = 20
    else:
        over["max_train_dialogues"] = 6
    cfg = load_config(preset, None, {**over, **(extra or {})})
    ctx = stages.build_context(cfg)
    # a shuffled run touches examples of every length; keep the set the same for both paths
    teacher = load_model(ctx.teacher_init, cfg.dtype)
    t0 = time.perf_counter()
    cache_dir = stages.cache_teacher(replace(cfg, cache_topk=64), ctx.data, progress=False)
    build_s = time.perf_counter() - t0
    cache = TeacherCache(cache_dir)
    variants = {}
    for name, lora in (("full fine-tuning", False), ("LoRA r=16 student", True)):
        live, cached = 0.0, 0.0
        for _ in range(rounds):  # alternate, keep the best median of each: the machine may be shared
            live = max(live, time_distill(ctx, teacher=teacher, steps=steps, warmup=warmup, lora=lora,
                                          out=work / f"{preset}-live"))
            cached = max(cached, time_distill(ctx, cache=cache, steps=steps, warmup=warmup, lora=lora,
                                              out=work / f"{preset}-cache"))
        variants[name] = (live, cached)
    t_cfg = load_model(ctx.teacher_init).config
    s_cfg = load_model(ctx.student_init).config
    return {"preset": preset, "teacher_layers": t_cfg.num_hidden_layers, "student_layers": s_cfg.num_hidden_layers,
            "hidden": t_cfg.hidden_size, "vocab": ctx.vocab, "batch": cfg.batch_size, "max_length": cfg.max_length,
            "train_examples": len(ctx.train_ex), "variants": variants, "cache_build_s": build_s}


def two_vs_one(data_dir: str | None, steps: int, work: Path) -> dict:
    """Time `pesc distill` on one process (batch 8) and under torchrun with two (batch 4 each)."""
    settings = ["teacher_steps=0", f"distill_steps={steps}", "eval_examples=0", "eval_dialogues=0",
                "eval_generate_dialogues=0", "max_train_dialogues=20", "logging_steps=1000"]
    base = ["--preset", "smoke"] + (["--data", data_dir] if data_dir else [])
    one, two = work / "dp-one", work / "dp-two"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, "-m", "pesc", "distill", *base, "--out", str(one), "--set", "batch_size=8",
                    *settings], check=True, env=env, capture_output=True)
    two.mkdir(parents=True, exist_ok=True)
    for name in ("teacher-init", "student-init"):
        shutil.copytree(one / name, two / name, dirs_exist_ok=True)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "pesc", "distill", *base, "--out", str(two),
                    "--set", "batch_size=4", *settings], check=True, env={**env, "OMP_NUM_THREADS": "1"},
                   capture_output=True)

    def runtime(d):
        for line in (d / "student" / "log.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if "train_runtime" in rec:
                return rec["train_runtime"]
        raise RuntimeError(f"no train_runtime in {d}")

    from safetensors.torch import load_file

    a = load_file(str(one / "student" / "model.safetensors"))
    b = load_file(str(two / "student" / "model.safetensors"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    r1, r2 = runtime(one), runtime(two)
    return {"steps": steps, "global_batch": 8, "one_process_s": r1, "two_processes_s": r2,
            "speedup": r1 / r2, "max_weight_diff": diff}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = REPO.parent / "shared" / "data" / "pesc"
    p.add_argument("--data", default=str(default_data) if (default_data / "val.json").exists() else None)
    p.add_argument("--sizes", default="smoke,quickstart")
    p.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="alternating live/cache measurements (best kept)")
    p.add_argument("--skip-dp", action="store_true", help="skip the two-process measurement")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every size")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, data: {args.data or 'shipped samples'}")
    with tempfile.TemporaryDirectory(prefix="pesc-bench-") as tmp:
        work = Path(tmp)
        for preset in [s for s in args.sizes.split(",") if s]:
            extra = dict(kv.split("=", 1) for kv in args.set)
            r = live_vs_cache(preset, args.data, args.steps, args.warmup, work, extra, args.rounds)
            print(f"[{preset}] teacher {r['teacher_layers']}L / student {r['student_layers']}L, hidden {r['hidden']}, "
                  f"vocab {r['vocab']}, batch {r['batch']}, max_length {r['max_length']}; cache built once in "
                  f"{r['cache_build_s']:.1f} s for {r['train_examples']} examples")
            for name, (live, cached) in r["variants"].items():
                print(f"  {name:18}: live teacher {live:.3f} steps/s, teacher cache {cached:.3f} steps/s "
                      f"-> cache/live = {cached / live:.2f}x")
        if not args.skip_dp:
            r = two_vs_one(args.data, max(args.steps, 6), work)
            print(f"[data parallel, smoke] {r['steps']} steps, global batch {r['global_batch']}: one process "
                  f"{r['one_process_s']:.2f} s, torchrun 2 processes {r['two_processes_s']:.2f} s -> "
                  f"2proc/1proc speed = {r['speedup']:.2f}x; max weight difference {r['max_weight_diff']:.2e}")


if __name__ == "__main__":
    main()
