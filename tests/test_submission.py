"""submission: the pre-flight check (one test per problem kind), result writing, the zip, the CLI."""

from __future__ import annotations

import copy
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from pesc.cli import main
from pesc.data.pesc_json import dumps_pesc
from submission.check import check_result
from submission.description import write_description
from submission.package import PackageError, build_package, code_files, verify_package
from submission.taskfile import fill_result, load_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIX = Path(__file__).resolve().parent / "fixtures" / "submission"
TEST = FIX / "small_test.json"


def raw_test() -> dict:
    return json.loads(TEST.read_text(encoding="utf-8"))


def filled() -> dict:
    obj = raw_test()
    for did, entry in obj.items():
        for i in range(1, 20, 2):
            entry["whole_dialog"][i] = f"supporter:Reply {i} for {did}, which sounds fine."
    return obj


def dumped(obj) -> bytes:
    return json.dumps(obj, indent=4).encode()


def only(report, code):
    return [p for p in report.problems if p.code == code]


def assert_located(report, code, did, turn):
    """Exactly the expected problem, with the id and turn in its fields, its text and the report."""
    hits = only(report, code)
    assert [(p.dialogue_id, p.turn) for p in hits] == [(did, turn)], report.format()
    text = str(hits[0])
    assert f"dialogue {did}" in text
    if turn is not None:
        assert f"turn {turn}" in text
    assert text in report.format()
    assert not report.ok


# ------------------------------------------------------------------------------------------------
# check: passes

def test_valid_result_passes_in_every_input_form():
    obj = filled()
    for result in (obj, dumped(obj), dumped(obj).decode()):
        report = check_result(result, TEST)
        assert report.ok and report.problems == []
        assert (report.n_dialogues, report.n_supporter_turns) == (3, 30)
        assert "OK" in report.format()
    assert check_result(obj, load_task(TEST).dialogues).ok  # test given as dialogues


def test_valid_result_from_a_path(tmp_path):
    p = tmp_path / "result.json"
    p.write_bytes(dumped(filled()))
    report = check_result(p, str(TEST))
    assert report.ok and report.source == str(p)


# ------------------------------------------------------------------------------------------------
# check: one test per problem kind, each naming the dialogue and turn

def test_invalid_utf8():
    data = dumped(filled()).replace(b"Reply 7 for 9002", b"Reply 7 for \xff\xfe02")
    report = check_result(data, TEST)
    enc = only(report, "encoding")
    assert len(enc) == 1 and "not valid UTF-8" in enc[0].message and "line" in enc[0].message
    assert not report.ok


def test_byte_order_mark():
    report = check_result(b"\xef\xbb\xbf" + dumped(filled()), TEST)
    assert [p.code for p in report.problems] == ["encoding"] and "byte-order mark" in report.format()


def test_invalid_json_names_line_and_column():
    text = dumped(filled()).decode()[:-40]
    report = check_result(text, TEST)
    assert [p.code for p in report.problems] == ["json"]
    assert "line" in report.problems[0].message and "column" in report.problems[0].message


def test_wrong_top_level():
    report = check_result([1, 2], TEST)
    assert [p.code for p in report.problems] == ["structure"] and "object keyed by dialogue id" in report.format()


def test_missing_id():
    obj = filled()
    del obj["9002"]
    report = check_result(obj, TEST)
    assert_located(report, "missing_id", "9002", None)


def test_extra_id():
    obj = filled()
    obj["777"] = copy.deepcopy(obj["9001"])
    assert_located(check_result(obj, TEST), "extra_id", "777", None)


def test_duplicate_id():
    text = dumped(filled()).decode()
    entry = json.dumps(filled()["9003"], indent=4).replace("\n", "\n    ")
    dup = text[:-2] + ',\n    "9003": ' + entry + "\n}"
    report = check_result(dup, TEST)
    assert_located(report, "duplicate_id", "9003", None)


def test_id_order():
    obj = filled()
    swapped = {k: obj[k] for k in ("9001", "9003", "9002")}
    report = check_result(swapped, TEST)
    assert_located(report, "id_order", "9003", None)
    assert "expected 9002" in report.format()


def test_turn_count():
    obj = filled()
    obj["9001"]["whole_dialog"] = obj["9001"]["whole_dialog"][:18]
    report = check_result(obj, TEST)
    assert_located(report, "turn_count", "9001", None)
    assert "18 turns" in report.format()


def test_role_prefix_wrong_or_missing():
    obj = filled()
    obj["9002"]["whole_dialog"][5] = "Supporter:Capitalised role."
    obj["9002"]["whole_dialog"][4] = "supporter:" + obj["9002"]["whole_dialog"][4][len("seeker:"):]
    report = check_result(obj, TEST)
    assert [(p.dialogue_id, p.turn) for p in only(report, "role")] == [("9002", 4), ("9002", 5)]
    assert "dialogue 9002, turn 4" in report.format() and "roles alternate" in report.format()


def test_turn_not_a_string():
    obj = filled()
    obj["9003"]["whole_dialog"][7] = 42
    assert_located(check_result(obj, TEST), "role", "9003", 7)


def test_seeker_turn_changed():
    obj = filled()
    obj["9001"]["whole_dialog"][2] = obj["9001"]["whole_dialog"][2].replace("seeker: I", "seeker:I")
    report = check_result(obj, TEST)
    assert_located(report, "seeker_changed", "9001", 2)
    assert "character 7" in report.format()


def test_character_changed():
    obj = filled()
    obj["9002"]["character"]["Age"] = "19"  # the test file has the number 19
    obj["9002"]["character"]["Hobby"] = "painting"
    report = check_result(obj, TEST)
    assert_located(report, "character_changed", "9002", None)
    msg = only(report, "character_changed")[0].message
    assert "'Age' is \"19\", was 19" in msg and "'Hobby'" in msg


def test_empty_reply():
    obj = filled()
    obj["9003"]["whole_dialog"][9] = "supporter:"
    obj["9001"]["whole_dialog"][19] = "supporter:   "
    report = check_result(obj, TEST)
    assert [(p.dialogue_id, p.turn) for p in only(report, "empty_reply")] == [("9001", 19), ("9003", 9)]
    assert "dialogue 9003, turn 9" in report.format()


def test_leftover_role_tag():
    obj = filled()
    obj["9001"]["whole_dialog"][3] = "supporter:Sure thing. Seeker: and then I said"
    obj["9002"]["whole_dialog"][1] = "supporter:Fine.\nUser: next"
    report = check_result(obj, TEST)
    assert [(p.dialogue_id, p.turn) for p in only(report, "role_tag")] == [("9001", 3), ("9002", 1)]
    assert "'Seeker:'" in report.format()


def test_leftover_special_token():
    obj = filled()
    obj["9002"]["whole_dialog"][11] = "supporter:That is okay.<|im_end|>"
    obj["9003"]["whole_dialog"][13] = "supporter:Good idea <|endoftext|>"
    report = check_result(obj, TEST)
    assert [(p.dialogue_id, p.turn) for p in only(report, "special_token")] == [("9002", 11), ("9003", 13)]
    assert "'<|im_end|>'" in report.format()


def test_reply_too_long():
    obj = filled()
    obj["9001"]["whole_dialog"][15] = "supporter:" + "word " * 50
    report = check_result(obj, TEST, max_reply_chars=100)
    assert_located(report, "too_long", "9001", 15)
    assert "249 characters" in report.format() and check_result(obj, TEST).ok


def test_all_problems_are_listed_at_once():
    obj = filled()
    obj["9001"]["whole_dialog"][1] = "supporter:"
    obj["9002"]["whole_dialog"][0] = "seeker:changed"
    obj["9003"]["character"]["Name"] = "Someone"
    obj["9003"]["whole_dialog"][17] = "supporter:hi <|eot_id|>"
    report = check_result(obj, TEST)
    assert sorted(p.code for p in report.problems) == ["character_changed", "empty_reply", "seeker_changed",
                                                       "special_token"]
    assert report.format().count("\n  ") == 4


@pytest.mark.parametrize("bad", [None, 42, b"", "", "/no/such/result.json", {"1": 5},
                                 {"9001": {"whole_dialog": "abc", "character": []}}, b"\x00\x01", "{]",
                                 {"9001": {"whole_dialog": [None] * 20}}, "nul\x00path", 1.5, object()])
def test_bad_input_never_raises(bad):
    report = check_result(bad, TEST)
    assert not report.ok and report.problems
    assert report.format().startswith(report.source)


def test_unreadable_test_file_is_reported_not_raised():
    report = check_result(filled(), "/no/such/test.json")
    assert not report.ok and [p.code for p in report.problems] == ["test_file"]


# ------------------------------------------------------------------------------------------------
# result writing

def test_fill_result_changes_only_supporter_turns():
    task = load_task(TEST)
    dialogues = [d.with_supporter_texts([f"Answer {k}." for k in range(10)]) for d in task.dialogues]
    text = fill_result(task, dialogues)
    obj = json.loads(text)
    assert list(obj) == ["9001", "9002", "9003"]
    assert obj["9002"]["character"]["Age"] == 19  # a number stays a number
    for did in obj:
        src = task.raw[did]["whole_dialog"]
        assert obj[did]["whole_dialog"][0::2] == src[0::2]
        assert obj[did]["whole_dialog"][1::2] == [f"supporter:Answer {k}." for k in range(10)]
    assert check_result(text, TEST).ok
    # the same bytes as the project's writer where profiles are strings
    strs = [d for d in dialogues if d.id != "9002"]
    sub = type(task)(task.path, {k: v for k, v in task.raw.items() if k != "9002"}, [])
    assert fill_result(sub, strs) == dumps_pesc(strs)


def test_fill_result_refuses_missing_or_empty():
    from pesc.errors import DataError

    task = load_task(TEST)
    with pytest.raises(DataError, match="9003"):
        fill_result(task, task.dialogues[:2])
    with pytest.raises(DataError, match="dialogue 9001, turn 1"):
        fill_result(task, task.dialogues)


# ------------------------------------------------------------------------------------------------
# package

@pytest.fixture
def code_repo(tmp_path):
    """A small git checkout with code, data, weights and caches."""
    root = tmp_path / "proj"
    files = {"pesc/a.py": "x = 1\n", "README.md": "# p\n", "data/train.json": "{}", "models/w.safetensors": "bin",
             "pesc/__pycache__/a.cpython-311.pyc": "c", "runs/x/log.txt": "l", "tests/fixtures/f.json": "{}",
             "big.zip": "z", "notes.txt": "untracked"}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    git = lambda *a: subprocess.run(["git", "-C", str(root), *a], check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git("add", "-f", *[f for f in files if f != "notes.txt"])
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    return root


def test_code_files_are_tracked_code_only(code_repo):
    assert code_files(code_repo) == ["README.md", "pesc/a.py", "tests/fixtures/f.json"]


def test_build_package_writes_and_verifies(code_repo, tmp_path):
    result = tmp_path / "result.json"
    result.write_bytes(dumped(filled()))
    desc = {"model": "runs/smoke/student", "teacher": "runs/smoke/teacher",
            "loss": {"name": "fkl", "alpha": 0.5, "temperature": 2.0}, "hyperparameters": {"lr": 0.003, "steps": 80},
            "commands": ["pesc run --preset smoke", "pesc submission build --model m --test t"],
            "validation": {"mode": "official", "meteor": 12.5, "total_no_g": 20.25}}
    out = build_package(result, tmp_path / "sub.zip", desc, code_repo, test=TEST)
    with zipfile.ZipFile(out) as z:
        names = z.namelist()
        assert names[:2] == ["result.json", "DESCRIPTION.md"]
        assert sorted(names[2:]) == ["code/README.md", "code/pesc/a.py", "code/tests/fixtures/f.json"]
        assert z.read("result.json") == result.read_bytes()
        md = z.read("DESCRIPTION.md").decode()
    for piece in ("## Model", "runs/smoke/student", "## Teacher", "`fkl` with alpha=0.5, temperature=2",
                  "| lr | 0.003 |", "pesc run --preset smoke", "| meteor | 12.5 |", "Mode: official",
                  "## Code", "| files | 3 |"):
        assert piece in md, piece
    again = build_package(result, tmp_path / "again.zip", desc, code_repo)
    assert again.read_bytes() == out.read_bytes()  # fixed timestamps: reproducible bytes
    assert verify_package(out, test=TEST) == {"entries": 5, "code_files": 3}


def test_verify_package_catches_a_bad_zip(tmp_path, code_repo):
    result = tmp_path / "result.json"
    obj = filled()
    obj["9001"]["whole_dialog"][1] = "supporter:"
    result.write_bytes(dumped(obj))
    with pytest.raises(PackageError, match="dialogue 9001, turn 1"):
        build_package(result, tmp_path / "bad.zip", {}, code_repo, test=TEST)
    assert not (tmp_path / "bad.zip").exists() and not (tmp_path / "bad.zip.tmp").exists()
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(PackageError, match="not a valid zip"):
        verify_package(broken)
    with zipfile.ZipFile(tmp_path / "nodesc.zip", "w") as z:
        z.writestr("result.json", "{}")
    with pytest.raises(PackageError, match="DESCRIPTION.md is missing"):
        verify_package(tmp_path / "nodesc.zip")


def test_description_sections():
    md = write_description({"title": "Team X", "model": "m", "notes": ["a", "b"], "extra_field": {"k": 1},
                            "validation": {}, "commands": "pesc run"})
    assert md.startswith("# Team X\n") and "## Notes\n\n- a\n- b" in md and "## Extra field" in md
    assert "Validation" not in md and "```bash\npesc run\n```" in md


# ------------------------------------------------------------------------------------------------
# CLI

def test_cli_check_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_bytes(dumped(filled()))
    assert main(["submission", "check", str(good), "--test", str(TEST)]) == 0
    assert "OK" in capsys.readouterr().out
    obj = filled()
    obj["9002"]["whole_dialog"][3] = "supporter:"
    obj["9003"]["whole_dialog"][5] = "supporter:" + "x" * 60
    bad = tmp_path / "bad.json"
    bad.write_bytes(dumped(obj))
    assert main(["submission", "check", str(bad), "--test", str(TEST), "--max-reply-chars", "50"]) == 1
    out = capsys.readouterr().out
    assert "FAILED, 2 problem(s)" in out and "dialogue 9002, turn 3" in out and "dialogue 9003, turn 5" in out
    with zipfile.ZipFile(tmp_path / "s.zip", "w") as z:
        z.writestr("result.json", dumped(filled()))
    assert main(["submission", "check", str(tmp_path / "s.zip"), "--test", str(TEST)]) == 0
    capsys.readouterr()
    assert main(["submission", "check", str(tmp_path / "missing.json"), "--test", str(TEST)]) == 1
    assert "cannot read" in capsys.readouterr().out


def test_check_reads_a_submission_zip(tmp_path):
    import io

    buf = io.BytesIO()
    obj = filled()
    obj["9003"]["whole_dialog"][3] = "supporter:"
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("DESCRIPTION.md", "x")
        z.writestr("result.json", dumped(obj))
    report = check_result(buf.getvalue(), TEST)
    assert_located(report, "empty_reply", "9003", 3)
    (tmp_path / "s.zip").write_bytes(buf.getvalue())
    assert [p.code for p in check_result(tmp_path / "s.zip", TEST).problems] == ["empty_reply"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("sub/result.json", dumped(filled()))
    report = check_result(buf.getvalue(), TEST)
    assert [p.code for p in report.problems] == ["structure"] and "no result.json" in report.format()


@pytest.fixture(scope="module")
def real_smoke(shared_pesc_module, tmp_path_factory):
    """Tokenizer trained on the real test dialogues + an untrained tiny Llama, saved."""
    from pesc.models.smoke import tiny_model, train_tokenizer

    tok = train_tokenizer(load_task(shared_pesc_module / "test.json").dialogues, 1024)
    model = tiny_model(len(tok), 1, 32, seed=0)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    path = tmp_path_factory.mktemp("smoke-student")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fixture_smoke(tmp_path_factory):
    """Tokenizer trained on the fixture dialogues + an untrained tiny Llama, saved as a `pesc run`
    directory would hold it (run/student with run/config.yaml and run/summary.json)."""
    from pesc.models.smoke import tiny_model, train_tokenizer

    tok = train_tokenizer(load_task(FIX / "small_val.json").dialogues, 512)
    model = tiny_model(len(tok), 1, 32, seed=0)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    run = tmp_path_factory.mktemp("run")
    model.save_pretrained(run / "student")
    tok.save_pretrained(run / "student")
    (run / "config.yaml").write_text("preset: smoke\nteacher: smoke\nloss: sinkhorn\nalpha: 0.5\n"
                                     "temperature: 2.0\nlr: 0.003\nmax_length: 600\nmax_new_tokens: 5\noutput_dir: runs/x\n")
    (run / "summary.json").write_text(json.dumps({"teacher": str(run / "teacher"), "kl_temperature": 1.0,
                                                  "kl_before": 2.5, "kl_after": 1.25, "kl_relative_change": -0.5}))
    return run / "student"


@pytest.fixture(scope="module")
def shared_pesc_module():
    """Like conftest's shared_pesc, for module-scoped fixtures."""
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "pesc"
    if not (shared / "test.json").exists():
        pytest.skip("../shared/data/pesc not present")
    return shared


def test_build_on_the_real_test_file(real_smoke, shared_pesc_module, tmp_path, capsys):
    test = shared_pesc_module / "test.json"
    out = tmp_path / "submission.zip"
    rc = main(["submission", "build", "--model", str(real_smoke), "--test", str(test), "--out", str(out),
               "--max-new-tokens", "3", "--max-prompt-tokens", "512", "--no-progress", "--loss", "fkl"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "OK, no problems" in printed.out and "re-opened and verified" in printed.out
    with zipfile.ZipFile(out) as z:
        result = z.read("result.json")
        md = z.read("DESCRIPTION.md").decode()
        names = z.namelist()
    assert check_result(result, test).ok
    got, ref = json.loads(result), json.loads(test.read_bytes())
    assert list(got) == list(ref)
    for did in ref:
        assert got[did]["character"] == ref[did]["character"]
        assert got[did]["whole_dialog"][0::2] == ref[did]["whole_dialog"][0::2]
        assert all(s.startswith("supporter:") and s[len("supporter:"):].strip() for s in got[did]["whole_dialog"][1::2])
    assert "code/pesc/generation.py" in names and "code/submission/check.py" in names
    assert not any(n.startswith(("code/.venv", "code/runs/")) or "__pycache__" in n for n in names)
    assert "pesc submission build --model" in md and "| max_new_tokens | 3 |" in md and "`fkl`" in md
    assert (tmp_path / "submission-work" / "result.json").read_bytes() == result


def test_build_with_val_scores_into_the_description(fixture_smoke, code_repo, tmp_path, capsys):
    out = tmp_path / "sub.zip"
    rc = main(["submission", "build", "--model", str(fixture_smoke), "--test", str(TEST), "--val", str(FIX / "small_val.json"),
               "--out", str(out), "--max-new-tokens", "3", "--no-progress", "--code-root", str(code_repo)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "prompts limited to 600 tokens" in printed.err and "replies limited" not in printed.err
    with zipfile.ZipFile(out) as z:
        md = z.read("DESCRIPTION.md").decode()
    assert "## Validation scores" in md
    assert "| bleu4 |" in md or "validation scores unavailable" in md
    # what the run directory says about the model
    for piece in ("## Teacher", "`sinkhorn` with alpha=0.5, temperature=2", "| max_length | 600 |",
                  "| kl_after | 1.25 |", "| max_prompt_tokens | 600 |", "pesc run --config"):
        assert piece in md, piece
    assert "output_dir" not in md


def test_build_takes_decoding_limits_from_the_run(fixture_smoke, code_repo, tmp_path, capsys):
    out = tmp_path / "sub.zip"
    assert main(["submission", "build", "--model", str(fixture_smoke), "--test", str(TEST), "--out", str(out),
                 "--no-progress", "--code-root", str(code_repo)]) == 0
    assert "replies limited to 5 new tokens" in capsys.readouterr().err
    with zipfile.ZipFile(out) as z:
        md = z.read("DESCRIPTION.md").decode()
    assert "| max_new_tokens | 5 |" in md and "| max_prompt_tokens | 600 |" in md
    assert "pesc submission build --model" in md and "--max-new-tokens" not in md.split("pesc submission build")[1]


def test_build_stops_when_the_result_fails_the_check(fixture_smoke, tmp_path, monkeypatch, capsys):
    import pesc.generation as G

    real = G.generate_dialogues

    def leaky(*a, **k):
        out = real(*a, **k)
        out[1] = out[1].with_supporter_texts(["Fine. Seeker: more"] * 10)
        return out

    monkeypatch.setattr(G, "generate_dialogues", leaky)
    out = tmp_path / "sub.zip"
    rc = main(["submission", "build", "--model", str(fixture_smoke), "--test", str(TEST), "--out", str(out),
               "--max-new-tokens", "2", "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 1 and not out.exists()
    assert "dialogue 9002, turn 1" in printed.out and "no zip written" in printed.err


def test_build_user_errors_are_one_line(fixture_smoke, tmp_path, capsys):
    assert main(["submission", "build", "--model", str(fixture_smoke), "--test", str(TEST),
                 "--out", str(tmp_path / "x.tar")]) == 2
    assert "must name a .zip" in capsys.readouterr().err
    assert main(["submission", "build", "--model", str(fixture_smoke), "--test", str(TEST), "--val", str(TEST),
                 "--out", str(tmp_path / "x.zip")]) == 2
    assert "--val needs gold supporter turns" in capsys.readouterr().err
    assert main(["submission", "build", "--model", str(tmp_path / "nope"), "--test", str(TEST),
                 "--out", str(tmp_path / "x.zip")]) == 2
    assert "does not exist" in capsys.readouterr().err
