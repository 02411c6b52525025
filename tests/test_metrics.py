"""The official metrics on hand-made pairs (values derived by hand below), the corrected mode, the
pairing quirks, missing resources, and the scorer against the plain library loop."""

import json
import math
import random

import numpy as np
import pytest

from pesc.data.pesc_json import load_pesc
from pesc.errors import DataError
from pesc.metrics import ResourceError, score, score_texts
from pesc.metrics.corpus import distinct_n
from pesc.metrics.pairs import build_pairs

# (reference, prediction, METEOR, BLEU-4, ROUGE-L, Extrema official, Extrema corrected).
# Extrema uses tests/fixtures/metrics/glove_tiny.txt (3-d vectors). Derivations:
#   METEOR = (1 - 0.5 * (chunks/m)^3) * P*R / (0.9 P + 0.1 R), lower-cased exact, stem, WordNet.
#   BLEU-4 = BP * (p1 p2 p3 p4)^(1/4), a zero count -> 0.1 / n-gram count (smoothing 1),
#            0 when no unigram matches, BP = exp(1 - r/c) when c <= r.
#   ROUGE-L = F of LCS on rouge_score tokens (lower-cased, non-alphanumerics -> spaces, stemmed).
SQ = math.sqrt
HAND_PAIRS = [
    # 1 identical: m=4, one chunk; all n-gram precisions 1; cos of a vector with itself
    ("you are not alone", "you are not alone",
     1 - 0.5 * (1 / 4) ** 3, 1.0, 1.0, 1.0, 1.0),
    # 2 empty prediction: every metric 0
    ("you are not alone", "", 0.0, 0.0, 0.0, 0.0, 0.0),
    # 3 one-token prediction: P=1, R=1/4, one chunk of one -> penalty 0.5; p2..p4 = 0.1/1, BP=e^-3;
    #   ref max (2, .5, 2) vs hard (.5, -1, 2); sign-aware ref (2, -1, 2)
    ("that sounds really hard", "hard",
     0.5 * (0.25 / (0.9 + 0.025)), math.exp(-3) * 0.1 ** 0.75, 2 * 0.25 / 1.25,
     4.5 / (SQ(8.25) * SQ(5.25)), 6 / (3 * SQ(5.25))),
    # 4 non-ASCII apostrophe: it's != it’s for METEOR/BLEU (5 of 6 words, one chunk); ROUGE sees
    #   "it s" on both sides. Official: It's/It’s not in GloVe (case) -> same vectors. Corrected:
    #   lower-cased "it's" is in GloVe, "it’s" is not: (-2, 3, 1) vs (1, 1, 1)
    ("It’s okay to feel this way", "It's okay to feel this way",
     (1 - 0.5 * (1 / 5) ** 3) * 5 / 6, (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25, 1.0, 1.0, 2 / SQ(42)),
    # 5 prediction with no GloVe word and nothing in common
    ("you are not alone", "Hmm...", 0.0, 0.0, 0.0, 0.0, 0.0),
    # 6 reordered: 4 matches in 2 chunks; p = 1, 2/3, 1/2, 0.1; LCS 3 of 4
    ("you are not alone", "alone you are not",
     1 - 0.5 * (2 / 4) ** 3, (1 * 2 / 3 * 1 / 2 * 0.1) ** 0.25, 0.75, 1.0, 1.0),
    # 7 repeated word: clipped p1 = 1/3, p2 = 0.1/2, p3 = 0.1/1, p4 = 0.1/1 (too short); no GloVe words
    ("the cat sat", "the the the",
     0.5 * (1 / 3), (1 / 3 * 0.05 * 0.1 * 0.1) ** 0.25, 1 / 3, 0.0, 0.0),
    # 8 stem match feels/feeling: m=3, P=1, R=3/4, 2 chunks; BLEU p1=2/3, BP=exp(1-4/3)
    ("she was feeling lonely", "she feels lonely",
     (1 - 0.5 * (2 / 3) ** 3) * (0.75 / 0.975), math.exp(1 - 4 / 3) * (2 / 3 * 0.05 * 0.1 * 0.1) ** 0.25,
     2 * 0.75 / 1.75, 0.0, 0.0),
    # 9 WordNet synonym help ~ aid: m=3 in one chunk; BLEU p = 2/3, 1/2, 0.1, 0.1
    ("I need aid", "I need help", 1 - 0.5 / 27, (2 / 3 * 1 / 2 * 0.1 * 0.1) ** 0.25, 2 / 3, 0.0, 0.0),
    # 9b nltk quirk: the WordNet stage sees the *stemmed* leftovers, happi and glad, so these
    #   synonyms do not match: m=2, P=R=2/3, one chunk
    ("I am glad", "I am happy", (1 - 0.5 / 8) * 2 / 3, (2 / 3 * 1 / 2 * 0.1 * 0.1) ** 0.25, 2 / 3, 0.0, 0.0),
    # 10 case and attached punctuation: METEOR matches take only (lower-cased), BLEU nothing
    #   (case-sensitive, "care." != "care"), ROUGE strips both
    ("Take care.", "take care", 0.5 * 0.5, 0.0, 1.0, 0.0, 0.0),
    # 11 plain max vs sign-aware extrema: (1,1,0) vs (0,2,1); sign-aware pred (-1,2,1)
    ("you are", "not alone", 0.0, 0.0, 0.0, 2 / SQ(10), 1 / SQ(12)),
    # 12 all-zero extrema on both sides, equal -> 1; a one-word identical pair
    ("zero", "zero", 0.5, 0.1 ** 0.75, 1.0, 1.0, 1.0),
    # 13 zero vector against a non-zero one -> 0
    ("you", "zero", 0.0, 0.0, 0.0, 0.0, 0.0),
    # 14 capital letter: METEOR lower-cases (m=2, 1 chunk), BLEU does not (p1 = 1/2), ROUGE does;
    #   official GloVe lookup drops "You": are (0,1,0) vs (1,1,0); corrected finds both
    ("you are", "You are", 1 - 0.5 / 8, (0.5 * 0.1 * 0.1 * 0.1) ** 0.25, 1.0, 1 / SQ(2), 1.0),
]


@pytest.fixture(scope="module")
def glove_tiny(fixtures_dir):
    return str(fixtures_dir / "glove_tiny.txt")


@pytest.fixture(scope="module")
def fixtures_dir():
    from pathlib import Path

    return Path(__file__).resolve().parent / "fixtures" / "metrics"


_PER_PAIR_CACHE = {}


def _per_pair(mode, glove):
    if (mode, glove) not in _PER_PAIR_CACHE:
        _PER_PAIR_CACHE[(mode, glove)] = _compute_per_pair(mode, glove)
    return _PER_PAIR_CACHE[(mode, glove)]


def _compute_per_pair(mode, glove):
    refs = [p[0] for p in HAND_PAIRS]
    preds = [p[1] for p in HAND_PAIRS]
    from pesc.metrics.pairs import pairs_from_texts
    from pesc.metrics.scorer import ALL_METRICS, _compute

    ps = pairs_from_texts(preds, refs, mode=mode)
    _, per, *_ = _compute(ps, ALL_METRICS, workers=1, progress=False, glove=glove, on_missing="error")
    return per


@pytest.mark.parametrize("k", range(len(HAND_PAIRS)))
def test_hand_pairs_official(k, glove_tiny):
    per = _per_pair("official", glove_tiny)
    ref, pred, meteor, bleu, rouge, ext, _ = HAND_PAIRS[k]
    assert per["meteor"][k] == pytest.approx(meteor, abs=1e-12), (ref, pred)
    assert per["bleu4"][k] == pytest.approx(bleu, abs=1e-12), (ref, pred)
    assert per["rougeL"][k] == pytest.approx(rouge, abs=1e-12), (ref, pred)
    assert per["extrema"][k] == pytest.approx(ext, abs=1e-12), (ref, pred)


def test_hand_pairs_corrected_extrema_and_same_text_metrics(glove_tiny):
    off, cor = _per_pair("official", glove_tiny), _per_pair("corrected", glove_tiny)
    for k, (ref, pred, *_, ext_c) in enumerate(HAND_PAIRS):
        assert cor["extrema"][k] == pytest.approx(ext_c, abs=1e-12), (ref, pred)
    # the text metrics do not change between modes
    for m in ("meteor", "bleu4", "rougeL"):
        np.testing.assert_array_equal(off[m], cor[m])
    # and the two extrema definitions do differ where the hand values say so
    assert cor["extrema"][11] < off["extrema"][11] and cor["extrema"][14] > off["extrema"][14]


def test_aggregates_and_distinct_by_hand(glove_tiny):
    refs = [p[0] for p in HAND_PAIRS]
    preds = [p[1] for p in HAND_PAIRS]
    got = score_texts(preds, refs, metrics=("meteor", "bleu4", "rougeL", "extrema", "distinct2", "distinct3"),
                      glove=glove_tiny, workers=1)
    for i, m in enumerate(("meteor", "bleu4", "rougeL", "extrema")):
        assert got[m] == pytest.approx(sum(p[2 + i] for p in HAND_PAIRS) / len(HAND_PAIRS), abs=1e-12)
    w = {"meteor": .2, "bleu4": .2, "rougeL": .2, "extrema": .1, "distinct2": .1, "distinct3": .1}
    assert got["total_no_g"] == pytest.approx(sum(got[k] * v for k, v in w.items()), abs=1e-12)
    # Distinct by hand: lower-cased tokens, n-grams within each text, pooled over the corpus
    assert distinct_n(["a b c", "A b d"], 2) == 3 / 4
    assert distinct_n(["a b c", "A b d"], 3) == 2 / 2
    assert distinct_n(["one", ""], 2) == 0.0
    assert distinct_n(["a a a a"], 2) == 1 / 3


def test_real_glove_identical_and_unknown_words():
    got = score_texts(["I hear you , friend", "Zzqxv Qqwz!!"], ["I hear you , friend", "you are not alone"],
                      metrics=("extrema",))
    # pair 1 -> 1 (up to rounding), pair 2 has no GloVe word -> 0: mean 0.5
    assert got["extrema"] == pytest.approx(0.5, abs=1e-12)


def test_bleu_and_lcs_match_the_libraries_on_random_token_lists():
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_score.rouge_scorer import _lcs_table

    from pesc.metrics.pairwise import bleu4_method1, lcs_length

    rng = random.Random(7)
    vocab = ["a", "b", "c", "d", "e", "A", "b."]
    sm = SmoothingFunction().method1
    for _ in range(400):
        r = [rng.choice(vocab) for _ in range(rng.randint(0, 12))]
        h = [rng.choice(vocab) for _ in range(rng.randint(0, 12))]
        assert lcs_length(r, h) == _lcs_table(r, h)[-1][-1]
        if r:  # nltk needs a non-empty reference for its length
            assert bleu4_method1(r, h) == sentence_bleu([r], h, weights=(0.25,) * 4, smoothing_function=sm)


def test_scorer_equals_plain_library_loop(shared_pesc):
    """Pair by pair, the project's scorer gives the library calls' numbers (to 1e-12)."""
    from pesc.metrics import load_glove, load_wordnet
    from pesc.metrics.baselines import make_baseline
    from pesc.metrics.reference import glove_dict, reference_scores

    gold = load_pesc(shared_pesc / "val.json")[:25]
    rng = random.Random(3)
    dropped = [d.with_supporter_texts(" ".join(w for w in d.turns[i].text.split() if rng.random() > 0.3)
                                      for i in d.supporter_indices()) for d in gold]
    for pred in (dropped, make_baseline("echo", gold)):
        rep = score(pred, gold, workers=2, progress=False)
        preds = [r["prediction"] for r in rep.per_turn]
        refs = [r["reference"] for r in rep.per_turn]
        vec = glove_dict(load_glove(), {w for t in preds + refs for w in t.split()})
        agg, per = reference_scores(preds, refs, load_wordnet(), vec)
        for m in ("meteor", "bleu4", "rougeL", "extrema"):
            np.testing.assert_allclose([r[m] for r in rep.per_turn], per[m], rtol=0, atol=1e-12)
        for m in agg:
            assert rep.metrics[m] == pytest.approx(agg[m], abs=1e-12)


def test_val_against_itself_is_a_perfect_match(shared_pesc):
    from pesc.metrics.reference import distinct

    val = shared_pesc / "val.json"
    rep = score(val, val, progress=False)
    raw = json.loads(val.read_text(encoding="utf-8"))
    refs = [s.replace("supporter:", "") for d in raw.values() for s in d["whole_dialog"][1::2]]
    assert rep.n_pairs == 1500 and rep.mode == "official"
    # identical texts: every word matched in one chunk -> METEOR 1 - 0.5 / n^3
    expected_meteor = np.mean([1 - 0.5 / len(r.split()) ** 3 for r in refs])
    assert rep.metrics["meteor"] == pytest.approx(expected_meteor, abs=1e-12)
    assert rep.metrics["bleu4"] == 1.0 and rep.metrics["rougeL"] == 1.0
    assert rep.metrics["extrema"] == pytest.approx(1.0, abs=1e-12)
    assert rep.metrics["distinct2"] == distinct(refs, 2)
    assert rep.metrics["distinct3"] == distinct(refs, 3)
    assert "gscore" not in rep.metrics and "total" not in rep.metrics
    expected_total = 0.2 * (expected_meteor + 2) + 0.1 + 0.1 * (distinct(refs, 2) + distinct(refs, 3))
    assert rep.metrics["total_no_g"] == pytest.approx(expected_total, abs=1e-12)
    assert rep.metrics["total_no_g"] * 100 == pytest.approx(79, abs=1)  # METRICS.md: gold about 79
    assert any("without G" in n for n in rep.notes)
    assert "Total without G" in rep.to_table()


def test_parallel_and_serial_give_identical_numbers(shared_pesc):
    from pesc.metrics.baselines import make_baseline

    gold = load_pesc(shared_pesc / "val.json")[:40]
    pred = make_baseline("random", gold, seed=5)
    a = score(pred, gold, workers=1, progress=False)
    b = score(pred, gold, workers=2, progress=False)
    assert a.metrics == b.metrics
    assert [r["meteor"] for r in a.per_turn] == [r["meteor"] for r in b.per_turn]


# ---------------------------------------------------------------------------------------------
# Pairing: official quirks and corrected mode on the hand-written PESC files
# ---------------------------------------------------------------------------------------------

def test_official_removes_every_supporter_prefix_and_corrected_only_the_first(fixtures_dir):
    gold, result = fixtures_dir / "gold_small.json", fixtures_dir / "result_small.json"
    off = build_pairs(result, gold, "official")
    cor = build_pairs(result, gold, "corrected")
    assert off.predictions[4] == " As your  I know a new city can feel lonely at first."
    assert cor.predictions[4] == "supporter: As your supporter: I know a new city can feel lonely at first."
    # inputs: the seeker turn before (official keeps the space after "seeker:")
    assert off.inputs[1] == " My friends all passed on the first try though."
    assert cor.inputs[1] == "My friends all passed on the first try though."
    assert off.turns == [1, 3] * 3 and off.dialogue_ids == ["9001", "9001", "9002", "9002", "9003", "9003"]


def _reordered(src, dst):
    obj = json.loads(src.read_text(encoding="utf-8"))
    keys = list(obj)
    dst.write_text(json.dumps({k: obj[k] for k in [keys[1], keys[0], keys[2]]}, indent=4), encoding="utf-8")
    return dst


def test_official_pairs_by_position_corrected_by_id(fixtures_dir, tmp_path, glove_tiny):
    gold, result = fixtures_dir / "gold_small.json", fixtures_dir / "result_small.json"
    shuffled = _reordered(result, tmp_path / "shuffled.json")
    base_c = score(result, gold, mode="corrected", progress=False)
    shuf_c = score(shuffled, gold, mode="corrected", progress=False)
    assert shuf_c.metrics == base_c.metrics  # pairing by id: order does not matter
    shuf_o = score(shuffled, gold, mode="official", progress=False)
    base_o = score(result, gold, mode="official", progress=False)
    assert shuf_o.metrics["meteor"] < base_o.metrics["meteor"]  # misaligned by position
    assert any("pairs by position" in n and "dialogue 9002" in n for n in shuf_o.notes)
    assert shuf_o.per_turn[0]["pred_dialogue_id"] == "9002" and shuf_o.per_turn[0]["dialogue_id"] == "9001"
    assert base_o.mode == "official" and base_c.mode == "corrected"
    assert "corrected mode" in base_c.to_table()


def _edit(src, dst, fn):
    obj = json.loads(src.read_text(encoding="utf-8"))
    fn(obj)
    dst.write_text(json.dumps(obj, indent=4), encoding="utf-8")
    return dst


def test_mismatched_files_name_the_dialogue_and_turn(fixtures_dir, tmp_path):
    gold, result = fixtures_dir / "gold_small.json", fixtures_dir / "result_small.json"
    missing = _edit(result, tmp_path / "missing.json", lambda o: o.pop("9002"))
    with pytest.raises(DataError) as e:
        build_pairs(missing, gold, "official")
    assert e.value.dialogue_id in ("9002", "9003") and "responses" in str(e.value)
    with pytest.raises(DataError) as e:
        build_pairs(missing, gold, "corrected")
    assert e.value.dialogue_id == "9002" and "missing" in str(e.value)

    extra_turns = _edit(result, tmp_path / "extra.json",
                        lambda o: o["9002"]["whole_dialog"].extend(["seeker:more", "supporter:more"]))
    with pytest.raises(DataError) as e:
        build_pairs(extra_turns, gold, "corrected")
    assert e.value.dialogue_id == "9002" and e.value.turn == 4
    with pytest.raises(DataError) as e:
        build_pairs(extra_turns, gold, "official")
    assert e.value.dialogue_id == "9002" and e.value.turn == 4

    renamed = _edit(result, tmp_path / "renamed.json", lambda o: o.update({"7777": o.pop("9003")}))
    assert len(build_pairs(renamed, gold, "official")) == 6  # the organisers only compare counts
    with pytest.raises(DataError) as e:
        build_pairs(renamed, gold, "corrected")
    assert e.value.dialogue_id == "7777" and "not in the gold" in str(e.value)

    bad_type = _edit(result, tmp_path / "badtype.json", lambda o: o["9003"]["whole_dialog"].__setitem__(3, 42))
    for mode in ("official", "corrected"):
        with pytest.raises(DataError) as e:
            build_pairs(bad_type, gold, mode)
        assert (e.value.dialogue_id, e.value.turn) == ("9003", 3)

    swapped = _edit(result, tmp_path / "roles.json", lambda o: o["9001"]["whole_dialog"].__setitem__(
        1, "seeker:oops"))
    with pytest.raises(DataError) as e:
        build_pairs(swapped, gold, "corrected")
    assert (e.value.dialogue_id, e.value.turn) == ("9001", 1)
    off = build_pairs(swapped, gold, "official")  # scored as the organisers would, with a note
    assert off.predictions[0] == "seeker:oops" and any("do not start with 'supporter:'" in n for n in off.notes)


def test_blank_gold_is_refused_and_blank_predictions_noted(fixtures_dir, tmp_path):
    gold, result = fixtures_dir / "gold_small.json", fixtures_dir / "result_small.json"

    def blank(o):
        for d in o.values():
            d["whole_dialog"][1::2] = ["supporter:"] * len(d["whole_dialog"][1::2])

    blank_gold = _edit(gold, tmp_path / "test_like.json", blank)
    with pytest.raises(DataError, match="test.json"):
        build_pairs(result, blank_gold, "official")
    ps = build_pairs(blank_gold, gold, "official")
    assert any("6 of 6 predicted responses are empty" in n for n in ps.notes)


def test_missing_resources_error_or_visible_skip(fixtures_dir, tmp_path, monkeypatch):
    gold, result = fixtures_dir / "gold_small.json", fixtures_dir / "result_small.json"
    with pytest.raises(ResourceError, match="glove"):
        score(result, gold, glove=tmp_path / "nope.txt", progress=False)
    rep = score(result, gold, glove=tmp_path / "nope.txt", on_missing="skip", progress=False)
    assert "extrema" not in rep.metrics and "extrema" in rep.skipped
    assert "total_no_g" not in rep.metrics and "total" not in rep.metrics
    assert any("Vector Extrema skipped" in n for n in rep.notes)
    assert "skipped" in rep.to_table()

    import pesc.metrics.offline as offline

    monkeypatch.setattr(offline, "_WORDNET", None)
    monkeypatch.setattr(offline, "DEBIAN_WORDNET", tmp_path / "no-wordnet")
    monkeypatch.setenv("PESC_WORDNET_DIR", str(tmp_path / "also-missing"))
    monkeypatch.setattr(offline, "_wordnet_candidates", lambda: [(tmp_path / "no-wordnet", "Debian wordnet-base")])
    with pytest.raises(ResourceError, match="apt-get install wordnet-base wordnet-sense-index"):
        offline.load_wordnet()


def test_wordnet_reader_uses_shipped_lexnames():
    from pesc.metrics.offline import lexnames, load_wordnet

    rows = lexnames()
    assert len(rows) == 45 and rows[0] == ("00", "adj.all", "3") and rows[44] == ("44", "adj.ppl", "3")
    wn = load_wordnet()
    assert wn.get_version() == "3.0"
    assert wn.synset("dog.n.01").lexname() == "noun.animal"
    assert "glad" in {lemma.name() for s in wn.synsets("happy") for lemma in s.lemmas()}


def test_user_glove_text_matches_the_wheel(tmp_path):
    """A glove.6B.50d.txt written from the wheel gives the same float64 vectors and scores."""
    from pesc.metrics import load_glove

    wheel = load_glove()
    words = ["the", "you", "feel", "alone", "okay", "hard", "-"]
    idx = wheel.lookup(words)
    assert (idx >= 0).all() and wheel.lookup(["it's", "You"]).tolist() == [-1, -1]
    lines = [w + " " + " ".join(str(v) for v in np.asarray(wheel.vectors[i], dtype=np.float32))
             for w, i in zip(words, idx)]
    path = tmp_path / "glove.6B.50d.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    mine = load_glove(path)
    np.testing.assert_array_equal(mine.rows64(mine.lookup(words)), wheel.rows64(idx))
    preds, refs = ["you feel alone", "it's hard - the"], ["okay You feel", "hard"]
    assert score_texts(preds, refs, ("extrema",), glove=path) == score_texts(preds, refs, ("extrema",))


def test_float32_to_decimal64_equals_the_text_parse():
    """The exact float64 of GloVe's decimals without string conversion (checked on a sample)."""
    from pesc.metrics import load_glove
    from pesc.metrics.offline import float32_to_decimal64

    rows = np.random.default_rng(0).choice(len(load_glove()), 3000, replace=False)
    block = np.asarray(load_glove().vectors[np.sort(rows)], dtype=np.float32)
    np.testing.assert_array_equal(float32_to_decimal64(block), block.astype(str).astype(np.float64))
    odd = np.array([0.0, -0.0, 1.0, -6.3681e-05, 123456.7, 3.4e38, 1e-40], dtype=np.float32)
    np.testing.assert_array_equal(float32_to_decimal64(odd), odd.astype(str).astype(np.float64))
    assert float32_to_decimal64(np.float32([0.418]))[0] == 0.418  # not 0.41800001263618469


def test_gaming_flags_on_hand_made_submissions(fixtures_dir):
    from pesc.metrics.baselines import make_baseline
    from pesc.metrics.flags import gaming_flags

    gold = load_pesc(fixtures_dir / "gold_small.json", expected_turns=None)
    assert gaming_flags(make_baseline("gold", gold), gold) == []
    codes = {f.code: f.severity for f in gaming_flags(make_baseline("echo", gold), gold)}
    assert codes == {"copied_seeker": "severe"}
    codes = {f.code: f.severity for f in gaming_flags(make_baseline("generic", gold), gold)}
    assert codes["repeated_reply"] == "severe"
    long = [d.with_supporter_texts(" ".join(f"w{i}_{j}" for j in range(60)) for i in d.supporter_indices())
            for d in gold]
    codes = {f.code: f.severity for f in gaming_flags(long, gold)}
    assert codes["length_outlier"] == "severe" and codes["long_responses"] == "severe"
    # the hand-written gold is already nearly all-distinct: 1.0 is not "far above" it
    assert "distinct2_inflated" not in codes and "distinct3_inflated" not in codes
    blank = [d.with_supporter_texts("" for _ in d.supporter_indices()) for d in gold]
    assert {f.code for f in gaming_flags(blank, gold)} >= {"empty_responses", "length_outlier"}


def test_baselines_are_ready_submissions(fixtures_dir):
    from pesc.metrics.baselines import make_baseline

    gold = load_pesc(fixtures_dir / "gold_small.json", expected_turns=None)
    echo = make_baseline("echo", gold)
    assert echo[0].turns[1].text == gold[0].turns[0].text and echo[0].turns[3].text == gold[0].turns[2].text
    assert [t.text for t in echo[0].turns[0::2]] == [t.text for t in gold[0].turns[0::2]]
    rnd = make_baseline("random", gold, seed=1)
    gold_texts = {(d.id, t.text) for d in gold for t in d.turns if t.role == "supporter"}
    for d in rnd:
        for i in d.supporter_indices():
            assert (d.id, d.turns[i].text) not in gold_texts  # always from another dialogue
    assert sorted(t.text for d in rnd for t in d.turns if t.role == "supporter") == \
        sorted(t for _, t in gold_texts)  # each gold response used once
    assert make_baseline("random", gold, seed=1)[0].turns[1].text == rnd[0].turns[1].text  # seeded
    with pytest.raises(Exception, match="unknown baseline"):
        make_baseline("oracle", gold)


def test_score_texts_rejects_bad_input():
    with pytest.raises(DataError, match="2 predictions but 1 references"):
        score_texts(["a", "b"], ["a"])
    with pytest.raises(DataError, match="prediction 1 must be a string"):
        score_texts(["a", None], ["a", "b"])
    with pytest.raises(Exception, match="unknown metric"):
        score_texts(["a"], ["a"], metrics=("cider",))


def test_threads_share_one_wordnet_safely(shared_pesc):
    """The leaderboard scores from several threads: WordNet lookups must not interleave."""
    from concurrent.futures import ThreadPoolExecutor

    from pesc.metrics import load_wordnet
    from pesc.metrics.baselines import make_baseline
    from pesc.metrics.pairwise import PairScorer

    gold = load_pesc(shared_pesc / "val.json")[:15]
    echo = make_baseline("echo", gold)
    refs = [d.turns[i].text.split() for d in gold for i in d.supporter_indices()]
    preds = [d.turns[i].text.split() for d in echo for i in d.supporter_indices()]
    expected = [PairScorer(load_wordnet()).meteor(r, p) for r, p in zip(refs, preds)]
    shared = PairScorer(load_wordnet())  # cold memo, shared by all threads
    with ThreadPoolExecutor(4) as ex:
        parts = list(ex.map(lambda k: [shared.meteor(r, p) for r, p in zip(refs[k::4], preds[k::4])], range(4)))
    got = [None] * len(refs)
    for k, part in enumerate(parts):
        got[k::4] = part
    assert got == expected


def test_dead_worker_process_falls_back_to_this_process():
    import os
    import signal
    import time

    from pesc.metrics import pairwise

    rng = random.Random(11)
    words = ["you", "are", "not", "alone", "it", "helps", "to", "talk"]
    refs = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 9))) for _ in range(60)]
    preds = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 9))) for _ in range(60)]
    serial = pairwise.score_pairs(refs, preds, ("bleu4", "rougeL"), workers=1)
    first = pairwise.score_pairs(refs, preds, ("bleu4", "rougeL"), workers=2)
    pool = pairwise._POOL[0]
    for pid in list(pool._processes):  # the worker this test's call started
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)
    again = pairwise.score_pairs(refs, preds, ("bleu4", "rougeL"), workers=2)
    for m in ("bleu4", "rougeL"):
        np.testing.assert_array_equal(first[m], serial[m])
        np.testing.assert_array_equal(again[m], serial[m])
    pairwise.shutdown_pool()
