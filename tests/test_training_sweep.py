"""`pesc sweep`: one teacher, one initial student, one budget; the comparison table and its files."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from pesc.errors import ConfigError

from test_training import FIXTURE, cfg_for


def test_parse_loss_specs():
    from pesc.training.sweep import parse_loss_specs

    specs = parse_loss_specs("fkl, sinkhorn:cost=euclidean,topk=20, hybrid:weight=0.3, jsd:beta=0.2")
    assert [(s.name, s.params) for s in specs] == [
        ("fkl", {}), ("sinkhorn", {"cost": "euclidean", "topk": "20"}), ("hybrid", {"weight": "0.3"}),
        ("jsd", {"beta": "0.2"})]
    assert specs[1].label == "sinkhorn (cost=euclidean, topk=20)" and specs[1].slug == "sinkhorn-costeuclidean-topk20"
    with pytest.raises(ConfigError, match="unknown loss 'nope'"):
        parse_loss_specs("fkl,nope")
    with pytest.raises(ConfigError, match="has no parameter 'colour'"):
        parse_loss_specs("sinkhorn:colour=red")
    with pytest.raises(ConfigError, match="twice"):
        parse_loss_specs("l1,l1")


def test_table_arithmetic():
    from pesc.training.sweep import build_table, format_table

    untrained = {"kl": 2.0, "bleu4": 0.010, "rougeL": 0.100}
    runs = [{"spec": "fkl", "label": "fkl", "after": {"kl": 1.0, "bleu4": 0.012, "rougeL": 0.110}},
            {"spec": "l1", "label": "l1", "after": {"kl": 1.5, "bleu4": 0.015, "rougeL": 0.090}},
            {"spec": "sinkhorn", "label": "sinkhorn", "error": "boom"}]
    t = build_table(untrained, runs)
    fkl, l1, bad = t["rows"]
    assert fkl["kl_change"] == pytest.approx(-50.0) and fkl["kl_vs_fkl"] == 0.0
    assert l1["kl_change"] == pytest.approx(-25.0) and l1["kl_vs_fkl"] == pytest.approx(25.0)
    assert l1["bleu4_change"] == pytest.approx(50.0) and l1["bleu4_vs_fkl"] == pytest.approx(30.0)
    assert l1["rougeL_change"] == pytest.approx(-10.0) and l1["rougeL_vs_fkl"] == pytest.approx(-20.0)
    assert bad["error"] == "boom" and bad["kl"] is None
    md = format_table(t)
    assert "| l1 | 1.5000 | 1.50 | 9.00 | -25.0 | +50.0 | -10.0 | +25.0 | +30.0 | -20.0 |" in md
    assert "| sinkhorn | failed: boom |" in md


def test_sweep_runs_each_loss_from_the_same_student(tmp_path):
    from pesc.cli import main
    from pesc.data.pesc_json import load_pesc
    from pesc.models.smoke import build_smoke_models
    from pesc.training.pipeline import RunData
    from pesc.training.sweep import parse_loss_specs, run_sweep

    ds = load_pesc(FIXTURE, expected_turns=None)
    data = RunData(ds[:6], ds[6:], ds[6:], "fixture")
    out = tmp_path / "sweep"
    build_smoke_models(data.train, out, teacher_layers=2, student_layers=1, hidden=32, vocab_size=512)
    cfg = cfg_for(out, teacher_steps=2, teacher_lr=1e-2, distill_steps=3, alpha=0.8, eval_examples=4,
                  eval_dialogues=1, max_new_tokens=6, gen_batch_size=8)
    table = run_sweep(cfg, parse_loss_specs("fkl,l1,jsd:beta=0.3"), data)
    assert (out / "teacher" / "model.safetensors").exists()        # the teacher was fine-tuned once
    rows = {r["spec"] + str(r["loss"]): r for r in table["rows"]}
    assert [r["loss"] for r in table["rows"]] == ["fkl", "l1", "jsd (beta=0.3)"]
    before = None
    for r in table["rows"]:
        res = json.loads((out / "runs" / r["loss"].replace(" (beta=0.3)", "-beta0.3") / "student" /
                          "results.json").read_text())
        assert res["teacher"] == str(out / "teacher") and res["student_init"] == str(out / "student-init")
        before = before or res["eval"]["before"]
        assert res["eval"]["before"] == before                       # one untrained student for all
        for k in ("kl", "bleu4", "rougeL"):
            assert r[k] == res["eval"]["after"][k]
        assert r["kl_change"] == pytest.approx(100 * (r["kl"] - before["kl"]) / before["kl"])
    assert rows["fkl" + "fkl"]["kl_vs_fkl"] == 0.0
    assert rows["l1l1"]["kl_vs_fkl"] == pytest.approx(rows["l1l1"]["kl_change"] - rows["fklfkl"]["kl_change"])
    assert table["untrained"]["kl"] == before["kl"]
    with open(out / "sweep.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["loss"] for r in csv_rows] == ["untrained student", "fkl", "l1", "jsd (beta=0.3)"]
    assert float(csv_rows[2]["kl_change"]) == pytest.approx(rows["l1l1"]["kl_change"])
    md = (out / "sweep.md").read_text()
    assert "| untrained student |" in md and "vs FKL (pp)" in md and "| jsd (beta=0.3) |" in md
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the CLI refuses an unknown loss before training anything
    shutil.rmtree(out / "runs")
    assert main(["sweep", "--out", str(out), "--losses", "fkl,zzz"]) == 2
    assert not (out / "runs").exists()
