"""ESConv, AugESC and EmpatheticDialogues loaders, the `load_dialogues` dispatcher and
`split_dialogues`, on hand-written files of the exact published schemas."""

import json
import logging

import pytest

from pesc.data import (Dialogue, Turn, load_augesc, load_dialogues, load_empathetic, load_esconv,
                       load_esconv_json, read_empathetic, split_dialogues)
from pesc.data.examples import build_examples
from pesc.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A private `datasets` cache, so tests never touch the user's cache."""
    return str(tmp_path_factory.mktemp("hf-datasets-cache"))


@pytest.fixture
def data(fixtures):
    return fixtures / "data"


def roles(d: Dialogue) -> str:
    return "".join("S" if t.role == "seeker" else "P" for t in d.turns)


# --- ESConv, Hub layout -------------------------------------------------------------------------

def test_esconv_hub_layout_train_split_merges_runs(data, cache_dir):
    ds = load_esconv(data / "esconv_hub", "train", cache_dir=cache_dir)
    # the blank line 3 is not a dialogue; ids keep the row number
    assert [d.id for d in ds] == ["esconv-train-0", "esconv-train-1", "esconv-train-3"]
    d = ds[0]
    assert d.source == "esconv"
    assert d.profile == {"emotion_type": "anxiety", "problem_type": "job crisis",
                         "situation": "I might lose my job at the bakery because the owner is selling it."}
    assert d.meta == {"experience_type": "Current Experience"}
    # opens with the supporter (kept as history); two seeker turns and two supporter turns merged
    assert roles(d) == "PSPSP"
    assert d.turns[1].text == "Not great. The bakery where I work is being sold. I have worked there for six years."
    assert d.turns[2].text == "That sounds unsettling. Six years is a long time to give to one place."
    assert d.turns[2].strategy == "Reflection of feelings"  # the first strategy of the run
    assert [t.strategy for t in d.turns] == ["Question", None, "Reflection of feelings", None, "Question"]
    # the empty seeker turn is dropped, so no run is created around it
    assert roles(ds[1]) == "SPSP"
    assert ds[1].turns[2].text == "She met someone at work."


def test_esconv_keep_runs_when_merge_is_off(data, cache_dir):
    d = load_esconv(data / "esconv_hub", "train", merge=False, cache_dir=cache_dir)[0]
    assert roles(d) == "PSSPPSP"
    assert d.turns[4].text == "Six years is a long time to give to one place."  # whitespace cleaned
    assert [t.strategy for t in d.turns][3:5] == ["Reflection of feelings", "Restatement or Paraphrasing"]


def test_esconv_split_aliases_pick_the_right_file(data, cache_dir):
    val = load_esconv(data / "esconv_hub", "val", cache_dir=cache_dir)
    assert [d.id for d in val] == ["esconv-validation-0"]
    assert val[0].profile["problem_type"] == "ongoing depression"
    test = load_dialogues(f"esconv:{data / 'esconv_hub'}", "test", cache_dir=cache_dir)
    assert [d.turns[0].text for d in test] == ["My friend owes me two hundred dollars.",
                                               "I failed my statistics class."]


def test_esconv_jsonl_file_and_parquet_go_through_the_same_code(data, cache_dir, tmp_path):
    ds = load_esconv(data / "esconv_rows.jsonl", "train", cache_dir=cache_dir)
    assert [d.profile["emotion_type"] for d in ds] == ["nervousness", "guilt"]
    assert ds[1].turns[1].text == "It happens, and you can still call her today."
    import pandas as pd

    rows = (data / "esconv_hub" / "test.txt").read_text().splitlines()
    pd.DataFrame({"text": rows}).to_parquet(tmp_path / "test.parquet")
    pq = load_esconv(tmp_path / "test.parquet", "test", cache_dir=cache_dir)
    assert [(roles(d), d.turns[1].text) for d in pq] == [
        ("SP", "That can strain a friendship."),
        ("SP", "Many people have to retake a class at some point.")]


def test_esconv_supporter_opening_gets_no_example(data, cache_dir):
    from pesc.models.smoke import train_tokenizer

    ds = load_esconv(data / "esconv_hub", "train", cache_dir=cache_dir)
    tok = train_tokenizer(ds, vocab_size=300)
    exs = build_examples(ds[:1], tok, max_length=512)
    assert [e.turn for e in exs] == [2, 4]  # turn 0 (supporter greeting) has no seeker before it
    prompt = tok.decode(exs[0].input_ids[: exs[0].labels.count(-100)])
    assert "Hi there, how are you feeling today?" in prompt  # kept as history


# --- ESConv, original ESConv.json ---------------------------------------------------------------

def test_esconv_original_json(data):
    ds = load_esconv_json(data / "ESConv.json")
    assert [d.id for d in ds] == ["esconv-0", "esconv-1"]
    d = ds[0]
    assert roles(d) == "PSPSP"
    assert d.turns[0].text == "Hello! What would you like to talk about?"
    assert d.turns[1].text == "My contract ends in June and they will not renew it. I am really worried."
    assert d.turns[1].strategy is None  # seeker feedback is not a strategy
    assert d.turns[4].text == "Could you ask your manager for a reference now? Starting the search early often helps."
    assert d.turns[4].strategy == "Providing Suggestions"
    assert d.profile == {"emotion_type": "anxiety", "problem_type": "job crisis",
                         "situation": "I was told my contract will not be renewed."}
    assert d.meta == {"experience_type": "Previous Experience"}
    unmerged = load_esconv_json(data / "ESConv.json", merge=False)[0]
    assert roles(unmerged) == "PSSPSPP"
    # esconv:<array .json> is recognised as the original format
    again = load_dialogues(f"esconv:{data / 'ESConv.json'}")
    assert [(x.id, [t.text for t in x.turns]) for x in again] == [(x.id, [t.text for t in x.turns]) for x in ds]
    assert [x.id for x in load_dialogues(f"esconv-json:{data / 'ESConv.json'}", "test")] == ["esconv-0", "esconv-1"]


# --- AugESC ---------------------------------------------------------------------------------------

def test_augesc_file(data, cache_dir):
    ds = load_dialogues(f"augesc:{data / 'augesc.txt'}", cache_dir=cache_dir)
    assert [d.id for d in ds] == ["augesc-0", "augesc-1", "augesc-2"]
    assert all(d.profile == {} and d.source == "augesc" for d in ds)
    assert roles(ds[0]) == "SPSP"
    assert ds[0].turns[2].text == "My rent went up again. And my hours were cut."
    assert ds[0].turns[3].text == "That is a lot of pressure at once. Have you looked at any local support programmes?"
    assert roles(ds[1]) == "PSP"
    assert roles(load_augesc(data / "augesc.txt", merge=False, cache_dir=cache_dir)[0]) == "SPSSPP"


def test_augesc_has_only_train(data, cache_dir):
    with pytest.raises(ConfigError, match="only a train split"):
        load_augesc(data / "augesc.txt", "validation", cache_dir=cache_dir)


# --- EmpatheticDialogues --------------------------------------------------------------------------

def test_empathetic_csv(data):
    ds, report = read_empathetic(data / "empathetic", "train")
    assert [d.id for d in ds] == ["hit:0_conv:1", "hit:1_conv:2", "hit:2_conv:3"]
    d = ds[0]
    assert d.source == "empathetic"
    assert roles(d) == "SPSP"
    assert d.profile == {"emotion_type": "sentimental",
                         "situation": "I remember going to the fireworks with my best friend, years ago."}
    assert d.turns[0].text == "I remember going to see the fireworks with my best friend, a long time ago."
    assert d.turns[1].text == "Was this a friend you were in love with, or just a best friend?"
    assert roles(ds[1]) == "SPS"
    assert ds[1].turns[1].text == "Oh no! What was it?"  # extra fields dropped, first eight kept
    assert ds[1].turns[2].text == "Just the cat knocking over a vase, thankfully."
    assert (report.rows, report.dialogues, report.extra_field_rows, report.extra_field_lines) == (9, 3, 2, [7, 10])
    assert "2 row(s) had more than 8 fields" in report.warning()


def test_empathetic_warning_is_logged_and_valid_split(data, caplog):
    with caplog.at_level(logging.WARNING, logger="pesc.data"):
        ds = load_dialogues(f"empathetic:{data / 'empathetic' / 'train.csv'}")
    assert len(ds) == 3
    assert any("2 row(s) had more than 8 fields" in r.getMessage() and "lines 7, 10" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pesc.data"):
        val = load_empathetic(data / "empathetic", "validation")
    assert not caplog.records  # no extra fields, no warning
    assert [(d.id, roles(d), d.profile["emotion_type"]) for d in val] == [("hit:9_conv:18", "SP", "grateful")]


# --- dispatcher and split -----------------------------------------------------------------------

def test_dispatcher_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown data source"):
        load_dialogues("wikipedia:foo")
    with pytest.raises(ConfigError, match="needs a path"):
        load_dialogues("empathetic")
    with pytest.raises(ConfigError, match="unknown split"):
        load_dialogues("esconv", "holdout")
    with pytest.raises(DataError, match="file not found"):
        load_dialogues(str(tmp_path / "missing.json"))
    with pytest.raises(DataError, match=r"no file for split 'test'.*test\.json"):
        load_dialogues(f"pesc:{tmp_path}", "test")
    with pytest.raises(DataError, match="not a Hub dataset id"):
        load_dialogues(f"esconv:{tmp_path / 'nope.txt'}")


def _dialogues(n):
    return [Dialogue(f"d{i}", [Turn("seeker", "hi"), Turn("supporter", "hello")]) for i in range(n)]


def test_split_dialogues_is_deterministic_by_id():
    ds = _dialogues(50)
    train, held = split_dialogues(ds, 0.2, seed=3)
    assert len(held) == 10 and len(train) == 40
    assert {d.id for d in train}.isdisjoint(d.id for d in held)
    assert [d.id for d in train] == sorted((d.id for d in train), key=lambda s: int(s[1:]))  # input order
    # the side of a dialogue depends on its id only, not on the input order
    _, held_rev = split_dialogues(ds[::-1], 0.2, seed=3)
    assert {d.id for d in held_rev} == {d.id for d in held}
    # a larger hold-out contains the smaller one; another seed gives another split
    _, held15 = split_dialogues(ds, 15, seed=3)
    assert {d.id for d in held} < {d.id for d in held15}
    assert {d.id for d in split_dialogues(ds, 0.2, seed=4)[1]} != {d.id for d in held}
    assert len(split_dialogues(ds[:3], 0.1)[1]) == 1  # a fraction holds out at least one
    assert split_dialogues(ds, 0) == (ds, [])
    with pytest.raises(ConfigError):
        split_dialogues(ds, 1.5)
    with pytest.raises(ConfigError):
        split_dialogues(ds, 51)


# --- bad input: message names file, dialogue, turn (and line) -------------------------------------

def _hub_line(dialog, **extra):
    return json.dumps({"emotion_type": "anxiety", "problem_type": "job crisis", "situation": "s",
                       "dialog": dialog, **extra})


GOOD_TURNS = [{"text": "hello", "speaker": "usr"}, {"text": "hi", "speaker": "sys", "strategy": "Question"}]


@pytest.mark.parametrize("bad_line, message, turn", [
    (_hub_line(GOOD_TURNS + [{"text": "x", "speaker": "bot"}]), "unknown speaker 'bot'", 2),
    (_hub_line([{"text": 7, "speaker": "usr"}] + GOOD_TURNS), "turn text must be a string, got int", 0),
    (_hub_line([{"speaker": "usr"}]), "missing 'text'", 0),
    (_hub_line([{"text": "only me", "speaker": "usr"}]), "at least one non-empty seeker turn", None),
    (_hub_line(GOOD_TURNS, situation=["list"]), "'situation' must be a string", None),
    (json.dumps({"emotion_type": "x"}), "missing 'dialog'", None),
    ('{"dialog": [', "'text' is not valid JSON", None),
])
def test_esconv_bad_rows(tmp_path, cache_dir, bad_line, message, turn):
    f = tmp_path / "train.txt"
    f.write_text("\n".join([_hub_line(GOOD_TURNS), bad_line, _hub_line(GOOD_TURNS)]) + "\n")
    with pytest.raises(DataError) as e:
        load_esconv(tmp_path, "train", cache_dir=cache_dir)
    assert e.value.path == str(f) and e.value.dialogue_id == "esconv-train-1"
    assert e.value.line == 2 and e.value.turn == turn
    assert message in str(e.value) and str(f) in str(e.value) and "line 2" in str(e.value)
    assert "dialogue esconv-train-1" in str(e.value)
    assert (f"turn {turn}" in str(e.value)) == (turn is not None)


def test_esconv_bad_files(tmp_path, cache_dir):
    jl = tmp_path / "rows.jsonl"
    jl.write_text('{"text": "{}"}\n\n{"text": "{}",}\n')
    with pytest.raises(DataError, match=r"rows\.jsonl, line 3: invalid JSON"):
        load_esconv(jl, cache_dir=cache_dir)
    jl.write_text('{"txt": "{}"}\n')
    with pytest.raises(DataError, match=r"line 1: each line must be a JSON object with a 'text' field"):
        load_esconv(jl, cache_dir=cache_dir)
    empty = tmp_path / "train.txt"
    empty.write_text("")
    with pytest.raises(DataError, match=r"train\.txt: empty file"):
        load_esconv(tmp_path, "train", cache_dir=cache_dir)
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"train\.txt: no dialogues"):
        load_esconv(tmp_path, "train", cache_dir=cache_dir)
    with pytest.raises(DataError, match="no file for split 'validation'.*valid.txt"):
        load_esconv(tmp_path, "validation", cache_dir=cache_dir)


def test_esconv_json_bad(tmp_path):
    f = tmp_path / "ESConv.json"
    f.write_text('[\n  {"dialog": [\n    {"speaker": "seeker", "content": "hi"},\n  ]}\n]\n')
    with pytest.raises(DataError, match=r"ESConv\.json, line 4: invalid JSON"):
        load_esconv_json(f)
    good = {"dialog": [{"speaker": "seeker", "content": "hi", "annotation": {}},
                       {"speaker": "supporter", "content": "hello", "annotation": {"strategy": "Question"}}]}
    bad = {"dialog": good["dialog"] + [{"speaker": "listener", "content": "?", "annotation": {}}]}
    f.write_text(json.dumps([good, bad]))
    with pytest.raises(DataError) as e:
        load_esconv_json(f)
    assert str(e.value) == (f"{f}, dialogue esconv-1, turn 2: unknown speaker 'listener' "
                            "(expected 'seeker' or 'supporter')")
    f.write_text(json.dumps({"dialog": []}))
    with pytest.raises(DataError, match="must be a JSON array"):
        load_esconv_json(f)


def test_augesc_bad(tmp_path, cache_dir):
    f = tmp_path / "augesc.txt"
    f.write_text('[["usr", "hi"], ["sys", "hello"]]\n[["usr", "hi"], ["sys"]]\n')
    with pytest.raises(DataError) as e:
        load_augesc(f, cache_dir=cache_dir)
    assert (e.value.path, e.value.line, e.value.dialogue_id, e.value.turn) == (str(f), 2, "augesc-1", 1)
    assert "[speaker, utterance] pair" in str(e.value)
    f.write_text('[["usr", "hi"], ["assistant", "hello"]]\n')
    with pytest.raises(DataError, match=r"line 1, dialogue augesc-0, turn 1: unknown speaker 'assistant'"):
        load_augesc(f, cache_dir=cache_dir)
    f.write_text('{"usr": "hi"}\n')
    with pytest.raises(DataError, match="must be a JSON list"):
        load_augesc(f, cache_dir=cache_dir)


HEADER = "conv_id,utterance_idx,context,prompt,speaker_idx,utterance,selfeval,tags\n"


@pytest.mark.parametrize("body, message, line, did, turn", [
    ("c1,1,sad,p,1,hello,,\nc1,two,sad,p,2,hi,,\n", "utterance_idx must be an integer, got 'two'", 3, "c1", None),
    ("c1,1,sad,p,1,hello,,\nc1,2,sad,p\n", "expected 8 comma-separated fields, found 4", 3, None, None),
    ("c1,1,sad,p,1,hello,,\nc1,2,sad,p,2,hi,,\nc1,2,sad,p,1,again,,\n", "utterance_idx 2 appears twice", 4, "c1", 2),
    ("c1,1,sad,p,1,hello,,\n", "no conversation has both", None, None, None),
])
def test_empathetic_bad_rows(tmp_path, body, message, line, did, turn):
    f = tmp_path / "train.csv"
    f.write_text(HEADER + body)
    with pytest.raises(DataError) as e:
        load_empathetic(f)
    assert message in str(e.value) and str(f) in str(e.value)
    assert (e.value.line, e.value.dialogue_id, e.value.turn) == (line, did, turn)


def test_empathetic_bad_files(tmp_path):
    f = tmp_path / "train.csv"
    f.write_text("")
    with pytest.raises(DataError, match=r"train\.csv: empty file"):
        load_empathetic(tmp_path)
    f.write_text("id,text\n1,hello\n")
    with pytest.raises(DataError, match=r"train\.csv, line 1: not an EmpatheticDialogues CSV"):
        load_empathetic(f)
    f.write_text(HEADER)
    with pytest.raises(DataError, match="no rows after the header"):
        load_empathetic(f)
    with pytest.raises(DataError, match="file not found"):
        load_empathetic(tmp_path / "test.csv")


def test_hub_unreachable_is_a_data_error(cache_dir):
    # tests run offline (conftest): the Hub path must fail with one readable message
    with pytest.raises(DataError) as e:
        load_dialogues("augesc", cache_dir=cache_dir)
    assert e.value.path == "thu-coai/augesc" and "cannot load the Hub dataset" in str(e.value)
