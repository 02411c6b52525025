"""The one dialogue model every loader produces and everything downstream consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

SEEKER = "seeker"
SUPPORTER = "supporter"
ROLES = (SEEKER, SUPPORTER)

# Profile fields of the PESC `character` object, in the organisers' order.
PROFILE_FIELDS = ("Name", "Sex", "Nickname", "Age", "Occupation", "Hobby", "Appearance",
                  "Education Background", "emotion_type", "problem_type", "situation")


@dataclass
class Turn:
    role: str
    text: str
    # PESC keeps the exact separator after "seeker:" (sometimes a space); `sep` remembers it so
    # that a file is written back byte-compatible. Other sources leave it empty.
    sep: str = ""
    strategy: str | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}")


@dataclass
class Dialogue:
    id: str
    turns: list[Turn]
    profile: dict[str, str] = field(default_factory=dict)
    source: str = "pesc"
    # Original extra fields (e.g. ESConv experience_type) kept for reference only.
    meta: dict = field(default_factory=dict)

    def supporter_indices(self) -> list[int]:
        return [i for i, t in enumerate(self.turns) if t.role == SUPPORTER]

    def with_supporter_texts(self, texts: Iterable[str]) -> "Dialogue":
        """A copy with the supporter turns replaced, in order, by `texts`."""
        texts = list(texts)
        idx = self.supporter_indices()
        if len(texts) != len(idx):
            raise ValueError(f"dialogue {self.id}: {len(idx)} supporter turns, got {len(texts)} texts")
        turns = [Turn(t.role, t.text, t.sep, t.strategy) for t in self.turns]
        for i, text in zip(idx, texts):
            turns[i].text = text
        return Dialogue(self.id, turns, dict(self.profile), self.source, dict(self.meta))


def merge_consecutive(turns: list[Turn]) -> list[Turn]:
    """Merge runs of turns by the same speaker into one turn (texts joined by a space).

    Used by the ESConv and AugESC loaders: one speaker often talks several times in a row, and the
    example builder wants one target per supporter reply. The first turn's strategy is kept.
    """
    out: list[Turn] = []
    for t in turns:
        if out and out[-1].role == t.role:
            prev = out[-1]
            joined = f"{prev.text} {t.text}".strip() if prev.text and t.text else (prev.text or t.text)
            out[-1] = Turn(prev.role, joined, prev.sep, prev.strategy or t.strategy)
        else:
            out.append(Turn(t.role, t.text, t.sep, t.strategy))
    return out


def profile_block(profile: dict[str, str]) -> str:
    """The seeker's profile as the text the model sees (system message or prompt header)."""
    lines = ["You are an emotional support companion. Reply to the seeker warmly and concretely, "
             "in one short paragraph, taking their profile into account."]
    keys = [k for k in PROFILE_FIELDS if profile.get(k)] + \
        [k for k in profile if k not in PROFILE_FIELDS and profile.get(k)]
    if keys:
        lines.append("Seeker profile:")
        for k in keys:
            lines.append(f"- {k.replace('_', ' ')}: {profile[k]}")
    return "\n".join(lines)
