"""PESC task files: exact round trip, bad input, atomic writing, the shipped sample set."""

import json

import pytest

from pesc.data import PROFILE_FIELDS, dump_pesc, dumps_pesc, load_dialogues, load_pesc, parse_pesc
from pesc.data.samples import load_samples, sample_path
from pesc.errors import DataError

PROFILE = {"Name": "Rita Moreno", "Sex": "Female", "Nickname": "Ri", "Age": "33", "Occupation": "Nurse",
           "Hobby": "Swimming", "Appearance": "Tall", "Education Background": "B.Sc.",
           "emotion_type": "Sad", "problem_type": "Loneliness", "situation": "Lives alone"}


def dialog(n=20, blank=False):
    return [f"seeker:{' ' if i % 4 == 0 else ''}question {i}" if i % 2 == 0
            else ("supporter:" if blank else f"supporter:answer {i}") for i in range(n)]


def write(tmp_path, obj, name="val.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=4), encoding="utf-8")
    return p


@pytest.mark.parametrize("name", ["val.json", "test.json"])
def test_round_trip_real_files_byte_identical(shared_pesc, name):
    path = shared_pesc / name
    ds = load_pesc(path)
    assert len(ds) == 150 and all(len(d.turns) == 20 for d in ds)
    assert dumps_pesc(ds) == path.read_text(encoding="utf-8")


def test_real_val_values(shared_pesc):
    ds = {d.id: d for d in load_pesc(shared_pesc / "val.json")}
    assert sorted(ds, key=int)[0] == "1201" and sorted(ds, key=int)[-1] == "1350"
    spaced = sum(t.sep == " " for d in ds.values() for t in d.turns)
    assert spaced == 594  # the README's count of "seeker: " strings
    # a numeric Age in the file becomes a string in the profile
    assert all(isinstance(v, str) for d in ds.values() for v in d.profile.values())
    assert all(list(d.profile) == list(PROFILE_FIELDS) for d in ds.values())


def test_test_file_blanks_and_filling(shared_pesc, tmp_path):
    ds = load_pesc(shared_pesc / "test.json")
    assert all(t.text == "" for d in ds for t in d.turns if t.role == "supporter")
    filled = [d.with_supporter_texts([f"reply {i}" for i in range(10)]) for d in ds]
    out = tmp_path / "result.json"
    dump_pesc(filled, out)
    back = load_pesc(out)
    assert [t.text for t in back[0].turns[1::2]] == [f"reply {i}" for i in range(10)]
    # seeker turns and profiles unchanged
    assert [(d.id, [(t.sep, t.text) for t in d.turns[::2]], d.profile) for d in back] == \
           [(d.id, [(t.sep, t.text) for t in d.turns[::2]], d.profile) for d in ds]
    assert json.loads(out.read_text())[ds[0].id]["character"] == \
           json.loads((shared_pesc / "test.json").read_text())[ds[0].id]["character"]


def test_separator_and_numbers_kept(tmp_path):
    char = dict(PROFILE, Age=41)
    p = write(tmp_path, {"7": {"whole_dialog": dialog(), "character": char}})
    (d,) = load_pesc(p)
    assert d.profile["Age"] == "41"
    assert (d.turns[0].sep, d.turns[0].text) == (" ", "question 0")
    assert (d.turns[2].sep, d.turns[2].text) == ("", "question 2")
    assert (d.turns[1].role, d.turns[1].text) == ("supporter", "answer 1")
    assert dumps_pesc([d]) == p.read_text()
    d.profile["Age"] = "42"  # a changed value is written as the new string
    assert json.loads(dumps_pesc([d]))["7"]["character"]["Age"] == "42"


@pytest.mark.parametrize("obj, message, did, turn", [
    ({"5": {"whole_dialog": dialog()}}, "missing 'character'", "5", None),
    ({"5": {"character": PROFILE}}, "missing 'whole_dialog'", "5", None),
    ({"5": {"whole_dialog": dialog(18), "character": PROFILE}}, "expected 20 turns, found 18", "5", None),
    ({"5": {"whole_dialog": dialog()[:3] + [None] + dialog()[4:], "character": PROFILE}},
     "turn text must be a string, got NoneType", "5", 3),
    ({"5": {"whole_dialog": ["supporter:hi"] + dialog()[1:], "character": PROFILE}},
     "expected a seeker turn (roles alternate, seeker first), got supporter", "5", 0),
    ({"5": {"whole_dialog": dialog()[:5] + ["seeker:again"] + dialog()[6:], "character": PROFILE}},
     "expected a supporter turn (roles alternate, seeker first), got seeker", "5", 5),
    ({"5": {"whole_dialog": dialog()[:6] + ["helper:hi"] + dialog()[7:], "character": PROFILE}},
     "turn must start with 'seeker:' or 'supporter:', got 'helper:hi'", "5", 6),
    ({"5": {"whole_dialog": dialog(), "character": dict(PROFILE, Hobby=["a"])}},
     "character field 'Hobby' must be a string or a number, got list", "5", None),
    ({"5": {"whole_dialog": dialog(), "character": "x"}}, "'character' must be an object", "5", None),
    ([1, 2], "top level must be an object keyed by dialogue id", None, None),
    ({}, "no dialogues in file", None, None),
])
def test_bad_pesc_messages(tmp_path, obj, message, did, turn):
    good = {"4": {"whole_dialog": dialog(), "character": PROFILE}}
    if isinstance(obj, dict) and obj:
        obj = {**good, **obj}
    p = write(tmp_path, obj)
    with pytest.raises(DataError) as e:
        load_pesc(p)
    assert message in str(e.value)
    assert (e.value.path, e.value.dialogue_id, e.value.turn) == (str(p), did, turn)
    assert str(e.value).startswith(str(p))
    if did:
        assert f"dialogue {did}" in str(e.value)
    if turn is not None:
        assert f"turn {turn}" in str(e.value)


def test_invalid_json_names_line(tmp_path):
    text = json.dumps({"4": {"whole_dialog": dialog(), "character": PROFILE}}, indent=4)
    broken = text.replace('"seeker:question 2",', '"seeker:question 2"', 1)
    line = text[: text.index('"seeker:question 2"')].count("\n") + 2  # the next string's line
    p = write(tmp_path, broken)
    with pytest.raises(DataError) as e:
        load_pesc(p)
    assert e.value.line == line and f"line {line}: invalid JSON" in str(e.value)
    assert "Expecting ',' delimiter" in str(e.value)


def test_empty_missing_directory_and_bad_utf8(tmp_path):
    with pytest.raises(DataError, match=r"val\.json: empty file"):
        load_pesc(write(tmp_path, "  \n"))
    with pytest.raises(DataError, match="file not found"):
        load_pesc(tmp_path / "nope.json")
    with pytest.raises(DataError, match="is a directory"):
        load_pesc(tmp_path)
    p = tmp_path / "bad.json"
    p.write_bytes(b'{\n"a": "\xff"}')
    with pytest.raises(DataError, match=r"bad\.json, line 2: not valid UTF-8"):
        load_pesc(p)


def test_dump_is_atomic(tmp_path):
    (d,) = parse_pesc({"1": {"whole_dialog": dialog(), "character": PROFILE}})
    out = tmp_path / "result.json"
    out.write_text("previous")
    d.profile["Age"] = object()  # not serialisable: the dump fails before touching the disk
    with pytest.raises(TypeError):
        dump_pesc([d], out)
    assert out.read_text() == "previous"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["result.json"]


def test_load_dialogues_pesc_specs(tmp_path):
    obj = {"4": {"whole_dialog": dialog(), "character": PROFILE}}
    write(tmp_path, obj, "val.json")
    write(tmp_path, {"9": obj["4"]}, "test.json")
    assert [d.id for d in load_dialogues(f"pesc:{tmp_path}", "validation")] == ["4"]
    assert [d.id for d in load_dialogues(str(tmp_path), "test")] == ["9"]
    assert [d.id for d in load_dialogues(str(tmp_path / "test.json"))] == ["9"]
    assert [d.id for d in load_dialogues(f"pesc:{tmp_path / 'val.json'}", "test")] == ["4"]


def test_sample_set():
    path = sample_path()
    assert path.name == "sample_dialogues.json" and path.is_file()
    ds = load_samples()
    assert [d.id for d in ds] == [str(i) for i in range(9001, 9017)]
    assert dumps_pesc(ds) == path.read_text(encoding="utf-8")  # exactly the organisers' format
    assert len(load_dialogues(str(path))) == 16
    problems = {d.profile["problem_type"] for d in ds}
    assert len(problems) == 16
    assert sum(t.sep == " " for d in ds for t in d.turns) >= 10
    for d in ds:
        assert list(d.profile) == list(PROFILE_FIELDS) and all(v.strip() for v in d.profile.values())
        assert [t.role for t in d.turns] == ["seeker", "supporter"] * 10
        replies = [t.text for t in d.turns if t.role == "supporter"]
        assert all(25 <= len(r.split()) <= 50 for r in replies), d.id
        assert len(set(replies)) == 10
        # the replies use the profile: the seeker is addressed by nickname at least once
        assert any(d.profile["Nickname"] in r for r in replies), d.id
