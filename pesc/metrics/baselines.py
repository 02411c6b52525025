"""Sanity baselines: trivial submissions that show how much a metric rewards doing nothing.

- `echo`: each supporter turn repeats the seeker turn just before it;
- `random`: each supporter turn is a gold supporter turn of another dialogue (a seeded shuffle of
  all gold responses, each used once, none left in its own dialogue);
- `generic`: one fixed, content-free supportive sentence everywhere;
- `gold`: the references themselves (the ceiling of the metrics without G).

Each returns dialogues shaped like the gold (same ids, turns, profiles), ready to score or to write
as a result file with `pesc.data.pesc_json.dump_pesc`.
"""

from __future__ import annotations

import random
from typing import Sequence

from pesc.data.dialogue import SEEKER, Dialogue
from pesc.errors import ConfigError

GENERIC_REPLY = ("I'm sorry you're going through this. It sounds really hard, and your feelings make "
                 "sense. I'm here for you.")
BASELINES = ("gold", "echo", "random", "generic")


def _previous_seeker(d: Dialogue, i: int) -> str:
    for j in range(i - 1, -1, -1):
        if d.turns[j].role == SEEKER:
            return d.turns[j].text
    return ""


def make_baseline(name: str, gold_dialogues: Sequence[Dialogue], seed: int = 0) -> list[Dialogue]:
    """The baseline submission `name` (one of BASELINES) for `gold_dialogues`."""
    gold_dialogues = list(gold_dialogues)
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    if name == "gold":
        return [d.with_supporter_texts(d.turns[i].text for i in d.supporter_indices()) for d in gold_dialogues]
    if name == "echo":
        return [d.with_supporter_texts(_previous_seeker(d, i) for i in d.supporter_indices())
                for d in gold_dialogues]
    if name == "generic":
        return [d.with_supporter_texts(GENERIC_REPLY for _ in d.supporter_indices()) for d in gold_dialogues]
    # random: the gold responses shuffled so that none stays in its own dialogue. Each response is
    # used once, so the corpus-level Distinct-n is the gold's: only the pairing is random.
    slots = [(k, i) for k, d in enumerate(gold_dialogues) for i in d.supporter_indices()]
    owner = [k for k, _ in slots]
    texts = [gold_dialogues[k].turns[i].text for k, i in slots]
    if len(set(owner)) < 2 or max(owner.count(k) for k in set(owner)) * 2 > len(owner):
        raise ConfigError("the random baseline needs responses spread over several dialogues "
                          "(no dialogue may hold more than half of them)")
    rng = random.Random(seed)
    perm = list(range(len(slots)))
    rng.shuffle(perm)
    for _ in range(100):
        conflicts = [s for s in range(len(slots)) if owner[perm[s]] == owner[s]]
        if not conflicts:
            break
        for s in conflicts:
            t = rng.randrange(len(slots))
            if owner[perm[t]] != owner[s] and owner[perm[s]] != owner[t]:
                perm[s], perm[t] = perm[t], perm[s]
    else:  # pragma: no cover - needs a pathological layout
        raise ConfigError("could not shuffle the gold responses away from their own dialogues")
    new_texts: dict[int, list[str]] = {k: [] for k in range(len(gold_dialogues))}
    for s, (k, _) in enumerate(slots):
        new_texts[k].append(texts[perm[s]])
    return [d.with_supporter_texts(new_texts[k]) for k, d in enumerate(gold_dialogues)]
