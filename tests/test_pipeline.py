"""End to end: `pesc run --preset smoke` on the real task files and on the shipped samples."""

import json
import math

import pytest

from pesc.cli import main
from pesc.data.pesc_json import load_pesc
from pesc.losses import available_losses


@pytest.mark.xdist_group("pipeline")
def test_smoke_run_on_task_files(shared_pesc, tmp_path):
    out = tmp_path / "run"
    rc = main(["run", "--preset", "smoke", "--data", str(shared_pesc), "--out", str(out)])
    assert rc == 0
    test = load_pesc(shared_pesc / "test.json")
    result = load_pesc(out / "result.json")
    assert [d.id for d in result] == [d.id for d in test]
    n_filled = 0
    for r, t in zip(result, test):
        assert len(r.turns) == len(t.turns) == 20
        assert r.profile == t.profile
        for rt, tt in zip(r.turns, t.turns):
            assert rt.role == tt.role
            if tt.role == "seeker":
                assert (rt.sep, rt.text) == (tt.sep, tt.text)   # seeker turns byte-identical
            else:
                assert rt.text.strip(), f"empty reply in dialogue {r.id}"
                n_filled += 1
    assert n_filled == 1500
    # Only the supporter slots differ from test.json, raw JSON included.
    raw_test = json.loads((shared_pesc / "test.json").read_text())
    raw_res = json.loads((out / "result.json").read_text())
    for did in raw_test:
        assert raw_res[did]["character"] == raw_test[did]["character"]
        assert raw_res[did]["whole_dialog"][0::2] == raw_test[did]["whole_dialog"][0::2]
        assert all(s.startswith("supporter:") for s in raw_res[did]["whole_dialog"][1::2])

    summary = json.loads((out / "summary.json").read_text())
    assert summary["kl_after"] < summary["kl_before"]
    for who in ("teacher", "student_before", "student_after"):
        for key in ("bleu4", "rougeL"):
            assert 0.0 <= summary["scores"][who][key] <= 1.0
    assert summary["result_check_problems"] == []
    assert (out / "config.yaml").exists() and (out / "student" / "config.json").exists()
    assert (out / "teacher" / "log.jsonl").exists() and (out / "student" / "log.jsonl").exists()


@pytest.mark.xdist_group("pipeline")
def test_smoke_run_on_shipped_samples_prints_table(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "--preset", "smoke", "--out", str(out),
               "--set", "teacher_steps=10", "distill_steps=10", "max_new_tokens=6"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "teacher-student KL" in printed and "BLEU-4" in printed and "ROUGE-L" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kl_before"] > 0
    result = load_pesc(out / "result.json")
    assert all(t.text.strip() for d in result for t in d.turns)


def test_bad_data_dir_is_one_line_error(tmp_path, capsys):
    rc = main(["run", "--preset", "smoke", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "not a directory" in err and "Traceback" not in err


def test_every_subcommand_has_help(capsys):
    from pesc.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "run" in sub.choices
    for name, p in sub.choices.items():
        text = p.format_help()
        assert len(text) > 80, name


@pytest.mark.xdist_group("pipeline-losses")
@pytest.mark.parametrize("loss", available_losses())
def test_smoke_pipeline_runs_to_the_end_with_every_loss(loss, tmp_path):
    """`pesc run` accepts every registered loss by name and goes from data to a checked result.json."""
    out = tmp_path / "run"
    rc = main(["run", "--preset", "smoke", "--out", str(out), "--loss", loss,
               "--set", "teacher_steps=2", "distill_steps=3", "max_new_tokens=4", "eval_examples=8",
               "eval_dialogues=1"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loss"] == loss and summary["result_check_problems"] == []
    assert math.isfinite(summary["kl_before"]) and math.isfinite(summary["kl_after"])
    logs = [json.loads(x) for x in (out / "student" / "log.jsonl").read_text().splitlines()]
    parts = [x["distill_loss"] for x in logs if "distill_loss" in x]
    assert parts and all(math.isfinite(v) for v in parts)
    result = load_pesc(out / "result.json")
    assert result and all(t.text.strip() for d in result for t in d.turns)


def test_unknown_option_gets_the_subcommands_usage_and_a_suggestion(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--preset", "smoke", "--output", "somewhere"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: pesc run" in err and "--output somewhere" in err and "did you mean --out?" in err
