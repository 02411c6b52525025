"""ScoreReport: aggregate metrics, per-turn detail, notes; JSON, terminal table and CSV output."""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The organisers' weights, in the order their script sums them (METRICS.md).
WEIGHTS = {"meteor": 0.2, "bleu4": 0.2, "rougeL": 0.2, "extrema": 0.1, "gscore": 0.1,
           "distinct2": 0.1, "distinct3": 0.1}
METRIC_ORDER = ("meteor", "bleu4", "rougeL", "extrema", "distinct2", "distinct3", "gscore")
LABELS = {"meteor": "METEOR", "bleu4": "BLEU-4", "rougeL": "ROUGE-L", "extrema": "Extrema",
          "distinct2": "Distinct-2", "distinct3": "Distinct-3", "gscore": "G-Score",
          "total": "Total", "total_no_g": "Total without G"}
PER_TURN_FIELDS = ("dialogue_id", "turn", "input", "reference", "prediction",
                   "meteor", "bleu4", "rougeL", "extrema", "gscore", "gscore_error")


def weighted_total(metrics: dict[str, float], with_g: bool) -> float:
    """sum(w * m) / sum(all weights), summed in the organisers' order; G left out when `with_g` is
    False (the weights are not renormalised: a G-less total is on the same scale minus 0.1 * G)."""
    total = 0
    for key, w in WEIGHTS.items():
        if key == "gscore" and not with_g:
            continue
        total += metrics[key] * w
    return total / sum(WEIGHTS.values())


@dataclass
class ScoreReport:
    mode: str                              # "official" or "corrected"
    metrics: dict[str, float]              # raw values in [0, 1]
    per_turn: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    n_pairs: int = 0
    judge: str | None = None
    gscore_failures: int = 0
    skipped: list[str] = field(default_factory=list)    # metrics left out (missing resource)
    resources: dict[str, str] = field(default_factory=dict)
    flags: list = field(default_factory=list)            # gaming flags, when computed
    title: str = ""

    @property
    def has_gscore(self) -> bool:
        return "gscore" in self.metrics

    @property
    def total(self) -> float | None:
        """The total with G when a judge ran, otherwise None (see `total_no_g`)."""
        return self.metrics.get("total")

    def to_dict(self, include_per_turn: bool = False) -> dict:
        d = {
            "mode": self.mode,
            "n_pairs": self.n_pairs,
            "metrics": dict(self.metrics),
            "metrics_x100": {k: round(v * 100, 4) for k, v in self.metrics.items()},
            "has_gscore": self.has_gscore,
            "total_label": "total" if self.has_gscore else "total without G (no judge)",
            "judge": self.judge,
            "gscore_failures": self.gscore_failures,
            "skipped": list(self.skipped),
            "notes": list(self.notes),
            "resources": dict(self.resources),
            "flags": [asdict(f) if hasattr(f, "__dataclass_fields__") else f for f in self.flags],
        }
        if include_per_turn:
            d["per_turn"] = [dict(r) for r in self.per_turn]
        return d

    def to_table(self) -> str:
        """A readable terminal table; values x 100 like the public ranking."""
        head = self.title or "PESC score"
        judge = f"judge {self.judge}" if self.judge else "no judge"
        lines = [f"{head}: {self.mode} mode, {self.n_pairs} responses, {judge}"]
        rows = []
        for key in METRIC_ORDER:
            if key in self.metrics:
                rows.append((LABELS[key], f"{self.metrics[key] * 100:7.2f}"))
            elif key in self.skipped:
                rows.append((LABELS[key], "skipped"))
            elif key == "gscore":
                rows.append((LABELS[key], "   n/a  (no judge)"))
        if "total" in self.metrics:
            rows.append((LABELS["total"], f"{self.metrics['total'] * 100:7.2f}"))
        if "total_no_g" in self.metrics:
            label = LABELS["total_no_g"]
            suffix = "" if self.has_gscore else "  (G absent; the published totals include 0.1 x G)"
            rows.append((label, f"{self.metrics['total_no_g'] * 100:7.2f}{suffix}"))
        elif "total" not in self.metrics:
            rows.append(("Total", "   n/a  (a metric was skipped)"))
        width = max(len(r[0]) for r in rows)
        lines.append("-" * (width + 12))
        lines += [f"{name:<{width}}  {value}" for name, value in rows]
        if self.gscore_failures:
            lines.append(f"G-Score failures: {self.gscore_failures} of {self.n_pairs} (not in the mean)")
        for note in self.notes:
            lines.append(f"note: {note}")
        for f in self.flags:
            lines.append(f"flag [{f.severity}] {f.code}: {f.message}")
        return "\n".join(lines)

    def write_per_turn_csv(self, path: str | os.PathLike) -> Path:
        """One row per scored response; written atomically."""
        if not self.per_turn:
            raise ValueError("this report has no per-turn records (score(..., per_turn=True))")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fields = [f for f in PER_TURN_FIELDS if any(f in r for r in self.per_turn)]
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            for r in self.per_turn:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
        os.replace(tmp, path)
        return path
