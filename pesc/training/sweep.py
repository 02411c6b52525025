"""Loss sweeps: the same teacher, initial student, data, seed and budget, one run per loss.

    pesc sweep --preset smoke --data ../shared/data/pesc --losses research

The teacher is fine-tuned once (or reused from --out/teacher). The untrained student is evaluated
once (teacher-student KL on held-out examples, BLEU-4 / ROUGE-L of generated replies); then every
loss distils a copy of it. The table gives, per loss, the absolute values after distillation, the
relative change from the untrained student (in %), and the difference of that change from the FKL
baseline's (in percentage points), as the research published it. Written as sweep.md, sweep.csv,
sweep.json and sweep.png (bars of the relative changes).

A loss spec is `name` or `name:key=value,key=value` (loss parameters, e.g. `sinkhorn:cost=cosine`).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

from pesc.errors import ConfigError, PescError
from pesc.training.config import RunConfig

# The rows of the research table (ids of the published comparison).
RESEARCH_SPECS = ("fkl", "l1", "w1_cdf", "sinkhorn:cost=cosine", "sinkhorn:cost=euclidean",
                  "hybrid:weight=0.5", "hybrid:weight=0.3", "layer_emd")
BASELINE = "fkl"
METRICS = (("kl", "KL"), ("bleu4", "BLEU-4"), ("rougeL", "ROUGE-L"))


@dataclass
class LossSpec:
    name: str
    params: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.params:
            return self.name
        return f"{self.name} ({', '.join(f'{k}={v}' for k, v in self.params.items())})"

    @property
    def slug(self) -> str:
        s = self.name + "".join(f"-{k}{v}" for k, v in self.params.items())
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def parse_loss_specs(text: str) -> list[LossSpec]:
    """'research', 'all', or comma-separated specs; parameters after ':' (e.g. hybrid:weight=0.3)."""
    from pesc.losses import available_losses, build_loss

    text = (text or "").strip()
    if text == "research":
        items = list(RESEARCH_SPECS)
    elif text == "all":
        items = available_losses()
    else:
        items, depth, cur = [], 0, ""
        # split on commas that separate specs: a comma followed by `key=` belongs to the previous spec
        for part in text.split(","):
            part = part.strip()
            if cur and "=" in part and ":" not in part:
                cur += "," + part
            else:
                if cur:
                    items.append(cur)
                cur = part
        if cur:
            items.append(cur)
    specs = []
    for item in items:
        name, _, rest = item.partition(":")
        params = {}
        for kv in filter(None, (p.strip() for p in rest.split(","))):
            if "=" not in kv:
                raise ConfigError(f"loss spec {item!r}: parameters are key=value, got {kv!r}")
            k, v = kv.split("=", 1)
            params[k.strip()] = v.strip()
        build_loss(name.strip(), **params)  # unknown losses / parameters fail here, before any training
        specs.append(LossSpec(name.strip(), params))
    if not specs:
        raise ConfigError("no losses to sweep")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"the same loss spec appears twice: {labels}")
    return specs


def relative_change(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or not math.isfinite(before) or not math.isfinite(after) or before == 0:
        return None
    return 100.0 * (after - before) / abs(before)


def build_table(untrained: dict, runs: list[dict]) -> dict:
    """Rows with absolute values, % change from the untrained student and pp difference from FKL."""
    base = next((r for r in runs if r["spec"] == BASELINE and not r.get("error")), None)
    rows = []
    for r in runs:
        row = {"loss": r["label"], "spec": r["spec"], "error": r.get("error")}
        for key, _ in METRICS:
            after = (r.get("after") or {}).get(key)
            row[key] = after
            row[f"{key}_change"] = relative_change(untrained.get(key), after)
            if base is not None:
                b = relative_change(untrained.get(key), (base.get("after") or {}).get(key))
                row[f"{key}_vs_fkl"] = None if b is None or row[f"{key}_change"] is None else row[f"{key}_change"] - b
            else:
                row[f"{key}_vs_fkl"] = None
        rows.append(row)
    return {"untrained": {k: untrained.get(k) for k, _ in METRICS}, "rows": rows}


def _f(v, fmt):
    return "" if v is None else format(v, fmt)


def format_table(table: dict) -> str:
    """Markdown: KL (per token) and BLEU-4/ROUGE-L x100, changes in %, differences in points."""
    head = ["loss"] + [f"{n}" for _, n in METRICS] + [f"{n} change %" for _, n in METRICS] + \
        [f"{n} vs FKL (pp)" for _, n in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    u = table["untrained"]
    scale = {"kl": 1.0, "bleu4": 100.0, "rougeL": 100.0}
    fmt = {"kl": ".4f", "bleu4": ".2f", "rougeL": ".2f"}
    lines.append("| untrained student | " + " | ".join(
        _f(None if u.get(k) is None else u[k] * scale[k], fmt[k]) for k, _ in METRICS) + " |" + " |" * 6)
    for r in table["rows"]:
        if r.get("error"):
            lines.append(f"| {r['loss']} | failed: {r['error']} |" + " |" * 8)
            continue
        cells = [_f(None if r[k] is None else r[k] * scale[k], fmt[k]) for k, _ in METRICS]
        cells += [_f(r[f"{k}_change"], "+.1f") or "n/a" for k, _ in METRICS]
        cells += [_f(r[f"{k}_vs_fkl"], "+.1f") or "n/a" for k, _ in METRICS]
        lines.append(f"| {r['loss']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(table: dict, out_dir: Path, meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = [f"# Loss sweep ({meta.get('preset')}, seed {meta.get('seed')}, {meta.get('budget')})", "",
          f"Data: {meta.get('data')}. KL: teacher-student KL per target token at tau={meta.get('kl_temperature')} "
          f"on {meta.get('eval_examples')} held-out examples; BLEU-4 / ROUGE-L (x100) of replies generated for "
          f"{meta.get('eval_turns')} held-out supporter turns (gold history). Change: relative to the untrained "
          "student; vs FKL: change minus the FKL baseline's change (percentage points); n/a where the "
          "untrained student's value is 0 (a relative change from 0 is undefined) or FKL did not run.", "",
          format_table(table), ""]
    (out_dir / "sweep.md").write_text("\n".join(md), encoding="utf-8")
    cols = ["loss", "spec", "error"] + [k for k, _ in METRICS] + [f"{k}_change" for k, _ in METRICS] + \
        [f"{k}_vs_fkl" for k, _ in METRICS]
    with open(out_dir / "sweep.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerow({"loss": "untrained student", "spec": "", **table["untrained"]})
        for r in table["rows"]:
            w.writerow({c: r.get(c) for c in cols})
    (out_dir / "sweep.json").write_text(json.dumps({"meta": meta, **table}, indent=2), encoding="utf-8")
    plot_table(table, out_dir / "sweep.png")


def plot_table(table: dict, path: Path) -> None:
    """Two panels: the % change of each metric from the untrained student (left; a change from 0 is
    left out), and the absolute BLEU-4 / ROUGE-L (x100) after distillation with the untrained
    student's values as dashed lines (right), so that the text metrics show even when the untrained
    student scores 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in table["rows"] if not r.get("error")]
    labels = [r["loss"] for r in rows]
    x = np.arange(len(rows))
    fig, (rel, ab) = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(rows) + 4), 4.6))
    width = 0.27
    colors = {"kl": "tab:blue", "bleu4": "tab:orange", "rougeL": "tab:green"}
    for i, (k, name) in enumerate(METRICS):
        vals = [r[f"{k}_change"] if r[f"{k}_change"] is not None else np.nan for r in rows]
        undefined = all(np.isnan(vals))
        rel.bar(x + (i - 1) * width, vals, width, color=colors[k],
                label=f"{name}" + (" (untrained = 0: no relative change)" if undefined else ""))
    rel.axhline(0, color="black", linewidth=0.8)
    rel.set_ylabel("change from the untrained student (%)")
    rel.set_title("Relative change (KL: lower is closer to the teacher)")
    untrained = table.get("untrained") or {}
    for i, (k, name) in enumerate(METRICS[1:]):
        vals = [100 * r[k] if r.get(k) is not None else np.nan for r in rows]
        ab.bar(x + (i - 0.5) * width, vals, width, color=colors[k], label=f"{name} after")
        if untrained.get(k) is not None:
            ab.axhline(100 * untrained[k], color=colors[k], linestyle="--", linewidth=1,
                       label=f"{name} untrained student")
    ab.set_ylabel("score (x100)")
    ab.set_title("BLEU-4 and ROUGE-L after distillation")
    for ax in (rel, ab):
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.38), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def run_sweep(cfg: RunConfig, specs: list[LossSpec], data=None, *, keep_going: bool = True) -> dict:
    """Train the teacher once, distil the same student with every loss, write the table files."""
    from pesc.training import stages

    root = Path(cfg.output_dir)
    base = replace(cfg, teacher_cache=None)
    ctx = stages.build_context(base, data)
    try:
        teacher_path = stages.trained_teacher_path(ctx)
    except ConfigError:
        stages.train_teacher(base, ctx.data)
        teacher_path = stages.trained_teacher_path(ctx)
    runs, before_file = [], None
    for spec in specs:
        print(f"\n== sweep: {spec.label}", flush=True)
        run_cfg = replace(base, output_dir=str(root / "runs" / spec.slug), loss=spec.name,
                          loss_params=dict(spec.params), teacher=teacher_path, student=ctx.student_init,
                          teacher_steps=0, teacher_epochs=None, teacher_lora=False)
        if before_file is not None and stages.is_main_process():  # the untrained student is evaluated once
            d = Path(run_cfg.output_dir) / "student"
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy2(before_file, d / "before.json")
        try:
            r = stages.distill(run_cfg, ctx.data)
        except (PescError, RuntimeError, ValueError) as e:
            if not keep_going or isinstance(e, ConfigError):
                raise
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            print(f"sweep: {spec.label} failed: {msg}")
            traceback.print_exc()
            runs.append({"spec": spec.name, "label": spec.label, "error": msg})
            continue
        before_file = Path(run_cfg.output_dir) / "student" / "before.json"
        before = r["eval"]["before"]
        runs.append({"spec": spec.name, "label": spec.label, "after": r["eval"]["after"],
                     "params": spec.params, "steps": r["hyperparameters"]["steps"]})
    table = build_table(before if before_file else {}, runs)
    ev = _first_eval(root, specs)
    budget = f"{cfg.epochs} epochs" if cfg.epochs else f"{cfg.distill_steps} steps"
    meta = {"preset": cfg.preset, "seed": cfg.seed, "budget": budget + f" x batch {cfg.batch_size}x{cfg.grad_accum}",
            "data": ctx.data.description, "kl_temperature": cfg.kl_temperature, "alpha": cfg.alpha,
            "temperature": cfg.temperature, "eval_examples": len(ctx.eval_ex),
            "eval_turns": ev, "teacher": teacher_path, "student_init": ctx.student_init}
    if stages.is_main_process():
        write_outputs(table, root, meta)
        shutil.copy2(root / "sweep.md", root / "README.md")
    return table


def _first_eval(root: Path, specs) -> int | None:
    for s in specs:
        p = root / "runs" / s.slug / "student" / "results.json"
        if p.exists():
            return json.loads(p.read_text(encoding="utf-8"))["eval"].get("turns")
    return None
