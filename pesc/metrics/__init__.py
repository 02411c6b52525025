"""The PESC scorer: official-parity metrics, a corrected mode, G-Score judges, KL, baselines.

    from pesc.metrics import score, score_texts
    report = score("result.json", "val.json")             # official mode, no judge
    print(report.to_table()); report.metrics["total_no_g"]
    score_texts(preds, refs, metrics=("bleu4", "rougeL"))  # training-time evaluation

Definitions: ../shared/docs/METRICS.md. Submodules: `pairs` (pairing), `pairwise` (METEOR, BLEU-4,
ROUGE-L), `corpus` (Extrema, Distinct), `judge` (G-Score), `kl` (teacher-student KL),
`baselines`, `flags`, `offline` (WordNet, GloVe), `hf_evaluate` (the `evaluate` metric).
"""

from pesc.metrics.offline import ResourceError, load_glove, load_wordnet  # noqa: F401
from pesc.metrics.report import WEIGHTS, ScoreReport  # noqa: F401
from pesc.metrics.scorer import ALL_METRICS, score, score_texts  # noqa: F401
from pesc.metrics.pairs import MODES  # noqa: F401
