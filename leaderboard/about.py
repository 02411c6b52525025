"""The About tab: what the numbers mean and the rules, filled with the server's actual limits."""

from __future__ import annotations

from leaderboard.config import LeaderboardConfig

_ACCESS_TEXT = {
    "none": "Submission pages show aggregate scores only.",
    "scores": "Submission pages show per-turn scores beside the seeker turn and your reply; the "
              "reference replies are not disclosed.",
    "full": "Submission pages show per-turn scores with the seeker turn, your reply and the "
            "reference reply (the operator has made the references public).",
}


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 1024:.0f} KB"


def about_markdown(config: LeaderboardConfig, judge: bool) -> str:
    lim = config.limits
    g_line = ("G-Score comes from the LLM judge configured on this server." if judge else
              "**This server has no judge configured: G-Score is absent and the total is reported "
              "without it** (the weights of the other six metrics are not rescaled).")
    return f"""
## Metrics (official mode)

The official mode reproduces the NLPCC 2025 PESC organisers' scorer, quirks included. Supporter
turns of the submission and of the reference file are paired **by position** (dialogue order, then
turn order); the text of a turn is the string with every `supporter:` removed.
Tokens are whitespace-separated, case kept, punctuation attached. All numbers are shown x 100.

| metric | definition |
| --- | --- |
| **METEOR** | nltk `meteor_score` (alpha 0.9, beta 3, gamma 0.5, Porter stemmer, WordNet 3.0 synonyms), mean over turns |
| **BLEU-4** | nltk sentence BLEU, uniform 4-gram weights, smoothing method 1, mean of sentence scores (not corpus BLEU) |
| **ROUGE-L** | `rouge_score` ROUGE-L F-measure with the Porter stemmer on the raw strings, mean over turns |
| **Extrema** | GloVe 6B 50-d vector extrema (element-wise plain max over the known tokens), cosine between reply and reference, mean over turns |
| **Distinct-2 / Distinct-3** | distinct n-grams / all n-grams over every reply of the submission (lowercased), corpus level |
| **G-Score** | an LLM judge's 1-5 rating of (seeker turn, reference, reply) for relevance, match and fluency, / 5 |
| **total** | 0.2 METEOR + 0.2 BLEU-4 + 0.2 ROUGE-L + 0.1 Extrema + 0.1 D-2 + 0.1 D-3 + 0.1 G |

{g_line}

**Corrected total**: the same weights with known weaknesses fixed: turns paired by dialogue id and
turn index (a mismatch is an error), sign-aware vector extrema with lowercase GloVe lookup, and only a
leading `supporter:` stripped. It is shown beside the official numbers, never mixed with them.

**KL**: when a team gives a model reference and the server has a teacher configured, the mean
per-token KL(teacher || student) over {config.kl_max_examples or "all"} reference supporter turns (teacher
forcing, temperature 1; the per-example sum is on the submission page).

**Baselines** (rows marked ◆): echo the seeker's last turn, a random reference reply from another
dialogue, one fixed generic sentence, and the references themselves. A system should beat the first
three by a clear margin; echo and random look deceptively good on n-gram metrics.

**Flags** mark submissions that look like the baselines or game a metric: replies copied from the
seeker, one reply repeated, lengths or Distinct far outside the references' range. A flag does not
remove an entry; it asks the reader to look.

**Turn score** (submission page, used to sort the worst turns first):
(0.2 METEOR + 0.2 BLEU-4 + 0.2 ROUGE-L + 0.1 Extrema) / 0.7 of that turn; Distinct and G are
corpus-level and have no per-turn value.

## Rules

- Upload a `.zip` holding exactly one `result.json`, or a bare `result.json`: the test file with
  every `supporter:` slot filled, nothing else changed. The pre-flight check lists every problem
  (dialogue id and turn) before anything is scored; a rejected upload changes nothing.
- At most **{lim.per_team_per_day}** accepted submission{"s" if lim.per_team_per_day != 1 else ""}
  per team per UTC day. Uploading a file that is already on the board does not count and does not
  create a second entry.
- Upload at most **{_size(lim.max_upload_bytes)}**; `result.json` at most
  **{_size(lim.max_json_bytes)}**, JSON nesting at most {lim.max_json_depth} levels, replies at most
  {lim.max_reply_chars} characters.
- Zips must not contain absolute paths, `..` paths, symbolic links, encrypted entries, archives
  inside the archive, more than {lim.max_zip_entries} entries, more than
  {_size(lim.max_zip_total_bytes)} unpacked, or entries that expand more than
  {lim.max_compression_ratio:.0f}x.
- {_ACCESS_TEXT[config.reference_access]}
- Organisers may hide, delete or re-score entries; every such action is logged.

## Chat

The chat tab talks to a research model and is not a counsellor. Messages that express an intent of
self-harm or suicide always get a fixed message with emergency numbers and crisis lines first.
"""
