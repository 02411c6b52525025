"""Training speed, printed as ratios (one run):

1. distillation steps per second with a live teacher vs from the teacher cache (`pesc cache-teacher`),
   at the smoke and quickstart sizes (quickstart: SmolLM2-135M teacher, 26-layer student cut from
   it), for a fully fine-tuned student and for a LoRA student (the research setting). Same student,
   data, batch order, loss (fkl, which runs from either) and optimizer; the two paths take their
   steps in turn (so other jobs on a shared machine slow both alike) and the median step time is
   reported; the first steps are warm-up. The cache build is a one-off cost, reported separately.

   What bounds the ratio: a step from the cache saves the teacher's forward pass, so
   cache/live = (S + T) / S with S the student's step (forward + backward + update) and T the
   teacher's forward; T is timed alone on the same batches and the ceiling is printed beside the
   measured ratio (a ratio at its ceiling means the cache path adds no overhead of its own). A full
   fine-tuning backward costs about twice a forward, so the ratio stays well under 2x unless the
   teacher is over three times the student's cost; a LoRA student skips the weight gradients of its
   frozen layers, S shrinks, and the ratio grows.
2. two processes (`torchrun --nproc_per_node=2`, gloo) vs one on the same global batch
   (`--dp-sizes`, smoke by default).

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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_trainer(ctx, *, teacher=None, cache=None, lora: bool = False, out: Path):
    """A DistillTrainer with its optimizer, scheduler and training dataloader ready."""
    from pesc.losses import build_loss
    from pesc.training.lora import apply_lora
    from pesc.training.stages import load_trainable
    from pesc.training.trainer import Collator, DistillTrainer, ExampleDataset, training_args

    cfg = ctx.cfg
    args = training_args(str(out), steps=1000, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                         logging_steps=10_000, disable_tqdm=True)
    student = load_trainable(ctx.student_init, cfg.dtype)
    if lora:
        student = apply_lora(student, r=16, alpha=32, dropout=0.05)
    trainer = DistillTrainer(model=student.train(), args=args, train_dataset=ExampleDataset(ctx.train_ex),
                             data_collator=Collator(ctx.tokenizer.pad_token_id), teacher=teacher,
                             teacher_cache=cache, vocab_size=ctx.vocab, alpha=cfg.alpha,
                             distill_loss=build_loss("fkl", temperature=cfg.temperature, vocab_size=ctx.vocab))
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    loader = trainer.get_train_dataloader()
    return trainer, iter(loader)


def timed_step(trainer, batches) -> float:
    """One optimizer step as the Trainer takes it (teacher signal, forward, backward, clip, update);
    the collated batch is fetched before the clock starts, the same for both paths."""
    batch = trainer._prepare_inputs(next(batches))
    n = (batch["labels"][:, 1:] != -100).sum()
    t0 = time.perf_counter()
    trainer.training_step(trainer.model, batch, n)
    trainer._clip_grad_norm(trainer.model)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    trainer.model.zero_grad()
    return time.perf_counter() - t0


def timed_teacher_forward(trainer, batches) -> float:
    """The teacher's part of a live step alone (its forward at the target positions): what a step
    from the cache saves."""
    from pesc.training.trainer import target_positions

    batch = trainer._prepare_inputs(next(batches))
    positions = target_positions(batch["labels"])
    t0 = time.perf_counter()
    trainer.teacher_signal(batch, positions, need_hidden=False)
    return time.perf_counter() - t0


def interleaved(pairs: dict, steps: int, warmup: int) -> dict[str, float]:
    """Steps of the variants taken in turn (order alternating), so load from other jobs on a shared
    machine falls on all of them alike; returns 1 / median step time of each."""
    import statistics

    names = list(pairs)
    times = {n: [] for n in names}
    for i in range(warmup + steps):
        for n in (names if i % 2 == 0 else names[::-1]):
            trainer, batches, timer = pairs[n]
            dt = timer(trainer, batches)
            if i >= warmup:
                times[n].append(dt)
    return {n: 1.0 / statistics.median(t) for n, t in times.items()}


def live_vs_cache(preset: str, data_dir: str | None, steps: int, warmup: int, work: Path,
                  extra: dict | None = None) -> dict:
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
        live, live_batches = make_trainer(ctx, teacher=teacher, lora=lora, out=work / f"{preset}-live")
        pairs = {"live": (live, live_batches, timed_step),
                 "cache": (*make_trainer(ctx, cache=cache, lora=lora, out=work / f"{preset}-cache"), timed_step),
                 # the live trainer's teacher on a fresh pass over the same (seeded) batch order
                 "teacher": (live, iter(live.get_train_dataloader()), timed_teacher_forward)}
        speed = interleaved(pairs, steps, warmup)
        ceiling = 1 + speed["cache"] / speed["teacher"]   # (S + T) / S with S = 1/cache, T = 1/teacher
        variants[name] = (speed["live"], speed["cache"], ceiling)
        del pairs
    t_cfg = load_model(ctx.teacher_init).config
    s_cfg = load_model(ctx.student_init).config
    return {"preset": preset, "teacher_layers": t_cfg.num_hidden_layers, "student_layers": s_cfg.num_hidden_layers,
            "hidden": t_cfg.hidden_size, "vocab": ctx.vocab, "batch": cfg.batch_size, "max_length": cfg.max_length,
            "train_examples": len(ctx.train_ex), "variants": variants, "cache_build_s": build_s}


def two_vs_one(data_dir: str | None, steps: int, work: Path, preset: str = "smoke") -> dict:
    """Time `pesc distill` on one process (batch 8) and under torchrun with two (batch 4 each)."""
    settings = ["teacher_steps=0", f"distill_steps={steps}", "eval_examples=0", "eval_dialogues=0",
                "eval_generate_dialogues=0", "max_train_dialogues=20", "logging_steps=1000"]
    base = ["--preset", preset] + (["--data", data_dir] if data_dir else [])
    one, two = work / f"dp-one-{preset}", work / f"dp-two-{preset}"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, "-m", "pesc", "distill", *base, "--out", str(one), "--set", "batch_size=8",
                    *settings], check=True, env=env, capture_output=True)
    two.mkdir(parents=True, exist_ok=True)
    for name in ("teacher-init", "student-init"):       # the same initial models (smoke builds both)
        if (one / name).is_dir():
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
    p.add_argument("--skip-dp", action="store_true", help="skip the two-process measurement")
    p.add_argument("--dp-sizes", default="smoke", help="presets for the two-process measurement "
                   "(e.g. smoke,quickstart; quickstart takes several minutes)")
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
            r = live_vs_cache(preset, args.data, args.steps, args.warmup, work, extra)
            print(f"[{preset}] teacher {r['teacher_layers']}L / student {r['student_layers']}L, hidden {r['hidden']}, "
                  f"vocab {r['vocab']}, batch {r['batch']}, max_length {r['max_length']}; cache built once in "
                  f"{r['cache_build_s']:.1f} s for {r['train_examples']} examples")
            for name, (live, cached, ceiling) in r["variants"].items():
                print(f"  {name:18}: live teacher {live:.3f} steps/s, teacher cache {cached:.3f} steps/s "
                      f"-> cache/live = {cached / live:.2f}x (ceiling (S+T)/S = {ceiling:.2f}x: student "
                      f"step S, teacher forward T)")
        for preset in ([] if args.skip_dp else [s for s in args.dp_sizes.split(",") if s]):
            r = two_vs_one(args.data, max(args.steps, 6) if preset == "smoke" else args.steps, work, preset)
            print(f"[data parallel, {preset}] {r['steps']} steps, global batch {r['global_batch']}: one process "
                  f"{r['one_process_s']:.2f} s, torchrun 2 processes {r['two_processes_s']:.2f} s -> "
                  f"2proc/1proc speed = {r['speedup']:.2f}x; max weight difference {r['max_weight_diff']:.2e}")


if __name__ == "__main__":
    main()
