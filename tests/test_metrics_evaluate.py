"""The `evaluate` metric (loaded from a local path, never the Hub) gives score_texts' numbers."""

import pytest

from pesc.metrics import score_texts

PREDS = ["I hear you, that sounds really hard.", "Maybe a short walk would help you reset.",
         "You are not alone in this.", ""]
REFS = ["That sounds hard. I hear you.", "A walk outside might help you clear your head.",
        "Many people feel this way; you are not alone.", "Take care of yourself."]


def test_local_script_load_matches_score_texts(tmp_path, monkeypatch):
    import evaluate

    import pesc.metrics.hf_evaluate as hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(hf.SCRIPT_PATH, cache_dir=str(tmp_path))
    got = metric.compute(predictions=PREDS, references=REFS)
    want = score_texts(PREDS, REFS, metrics=("meteor", "bleu4", "rougeL", "extrema", "distinct2", "distinct3"))
    assert set(got) == {"meteor", "bleu4", "rougeL", "extrema", "distinct2", "distinct3", "total_no_g"}
    assert got == want
    assert 0 < got["meteor"] < 1 and got["rougeL"] > got["bleu4"]


def test_class_config_picks_the_mode_and_subset():
    from pesc.metrics.hf_evaluate import PescScore

    corrected = PescScore(config_name="corrected").compute(predictions=PREDS, references=REFS,
                                                           metrics=["extrema", "bleu4"])
    assert corrected == score_texts(PREDS, REFS, metrics=("extrema", "bleu4"), mode="corrected")
    official = PescScore().compute(predictions=PREDS, references=REFS, metrics=["extrema"])
    assert official["extrema"] != pytest.approx(corrected["extrema"], abs=1e-9)  # sign-aware differs
