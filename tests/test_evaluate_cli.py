"""`pesc evaluate`: any model on held-out dialogues, with the teacher-student KL when a teacher is given."""

import json

import pytest

from pesc.cli import main
from pesc.data.pesc_json import load_pesc
from pesc.data.samples import sample_path
from pesc.models.smoke import build_smoke_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def smoke_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    teacher, student = build_smoke_models(load_pesc(sample_path()), root / "models", teacher_layers=2,
                                          student_layers=1, hidden=32, vocab_size=600)
    return str(teacher), str(student), root


def evaluate(*extra):
    return main(["evaluate", "--dialogues", str(sample_path()), "--max-dialogues", "2", "--max-length", "512",
                 "--max-new-tokens", "6", "--kl-examples", "5", *extra])


def test_model_against_teacher_writes_kl_and_every_metric(smoke_models, capsys):
    teacher, student, root = smoke_models
    out = root / "student.json"
    assert evaluate("--model", student, "--teacher", teacher, "--out", str(out)) == 0
    table = json.loads(out.read_text())
    assert table["n_dialogues"] == 2 and table["n_turns"] == 20 and table["kl_examples"] == 5
    s = table["scores"]
    assert s["kl"] > 0
    for key in ("meteor", "bleu4", "rougeL", "extrema", "distinct2", "distinct3"):
        assert 0.0 <= s[key] <= 1.0, key
    printed = capsys.readouterr().out
    assert "teacher-student KL" in printed and "BLEU-4" in printed and "ROUGE-L" in printed


def test_teacher_against_itself_has_zero_kl_and_no_teacher_means_no_kl(smoke_models):
    teacher, student, root = smoke_models
    assert evaluate("--model", teacher, "--teacher", teacher, "--out", str(root / "self.json")) == 0
    assert json.loads((root / "self.json").read_text())["scores"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert evaluate("--model", student, "--out", str(root / "alone.json")) == 0
    alone = json.loads((root / "alone.json").read_text())
    assert "kl" not in alone["scores"] and alone["kl_examples"] == 0 and "bleu4" in alone["scores"]


def test_a_teacher_with_another_tokenizer_and_a_bad_file_are_one_line_errors(smoke_models, tmp_path, capsys):
    teacher, student, root = smoke_models
    other, _ = build_smoke_models(load_pesc(sample_path())[:4], tmp_path / "other", teacher_layers=1,
                                  student_layers=1, hidden=32, vocab_size=400)
    assert evaluate("--model", student, "--teacher", str(other)) == 2
    err = capsys.readouterr().err
    assert "tokenizers differ" in err and "Traceback" not in err
    bad = tmp_path / "val.json"
    bad.write_text('{"1": {"whole_dialog": [')
    rc = main(["evaluate", "--model", student, "--dialogues", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "invalid JSON" in err
