"""Crisis detection for the chat: messages that express intent of self-harm or suicide.

A research model must never be the first (or only) answer to someone in danger. When a message
matches, the chat shows CRISIS_REPLY, a fixed and caring text that points to professional help and
emergency services, before anything the model says.

The detector is deliberately broad (a false alarm costs one kind paragraph; a miss can cost more):
phrase patterns over a normalised message (lowercase, curly apostrophes straightened, repeated
spaces collapsed), including common misspellings and indirect phrasings.
"""

from __future__ import annotations

import re
import unicodedata

CRISIS_REPLY = (
    "I'm really sorry you're feeling this much pain, and I'm glad you said it. You deserve support "
    "from a real person right now.\n\n"
    "**If you are in immediate danger or might act on these thoughts, please call your local "
    "emergency number now** (for example 112 in Europe, 911 in the US and Canada, 999 in the UK, "
    "000 in Australia, 110/120 in China).\n\n"
    "You can also talk to a trained crisis counsellor, free and confidential: call or text **988** "
    "in the US, call **116 123** (Samaritans) in the UK and Ireland, or find a helpline in your "
    "country at **https://findahelpline.com**. A doctor, a therapist or someone you trust can help "
    "too; please reach out to one of them today.\n\n"
    "_This chat is a research demo run by a computer program. It is not a counsellor and cannot "
    "help in an emergency._"
)

_SELF = r"(?:my\s*self|myself|my\s+own\s+self)"
_PATTERNS = [
    # suicide, explicitly
    r"\bsuicid\w*", r"\bsuicide\b", r"\bsucide\b", r"\bsuiside\b", r"\bkms\b",
    r"\bunalive\s+" + _SELF,
    # killing / ending oneself or one's life
    r"\b(?:kill|killing|killed|hang|hanging|hanged|shoot|shooting|drown|drowning|poison|poisoning)\s+"
    + _SELF,
    r"\b(?:end|ending|take|taking|finish|finishing)\s+(?:my|my\s+own)\s+(?:life|lives)\b",
    r"\bend\s+it\s+all\b", r"\bending\s+it\s+all\b", r"\bend\s+everything\b",
    r"\bwant(?:s|ed)?\s+to\s+die\b", r"\bwanna\s+die\b", r"\bwish\s+i\s+(?:was|were)\s+dead\b",
    r"\bwish\s+i\s+(?:had\s+never\s+been|wasn'?t|weren'?t)\s+born\b",
    r"\b(?:better|best)\s+off\s+dead\b", r"\bbetter\s+off\s+without\s+me\b",
    r"\b(?:don'?t|do\s+not|no\s+longer)\s+want\s+to\s+(?:live|be\s+alive|exist|wake\s+up)\b",
    r"\b(?:no|not\s+any)\s+(?:reason|point)\s+(?:to|in)\s+(?:live|living|going\s+on)\b",
    r"\bcan'?t\s+go\s+on\s+(?:living|anymore|any\s+more)\b",
    r"\bnot\s+(?:want|wanting)\s+to\s+wake\s+up\b", r"\bnever\s+wake\s+up\s+again\b",
    # self-harm
    r"\bself[-\s]?harm\w*", r"\bself[-\s]?injur\w*",
    r"\b(?:hurt|hurting|harm|harming|cut|cutting|burn|burning|starve|starving)\s+" + _SELF + r"\b",
    r"\bslit\s+my\s+wrists?\b", r"\bcut\s+my\s+wrists?\b",
    r"\boverdos\w*", r"\btake\s+(?:all|a\s+bunch\s+of|a\s+lot\s+of)\s+(?:my\s+)?(?:pills|tablets)\b",
    r"\bjump\s+(?:off|from)\s+(?:a|the)\s+(?:bridge|roof|building|balcony|cliff)\b",
]
_RE = re.compile("|".join(f"(?:{p})" for p in _PATTERNS))
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\uff07": "'"})


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).lower()
    return " ".join(text.split())


def crisis_match(text: str) -> str | None:
    """The matched phrase when `text` expresses self-harm or suicidal intent, else None."""
    if not text:
        return None
    m = _RE.search(normalise(text))
    return m.group(0) if m else None


def is_crisis(text: str) -> bool:
    return crisis_match(text) is not None
