"""A small hand-written sample set in the exact PESC format, shipped for the quickstart.

16 dialogues (ids 9001-9016), each 20 turns alternating seeker/supporter with a full 11-field
`character`; problems range over work, exams, breakup, grief, loneliness, money, health and more.
"""

from __future__ import annotations

from pathlib import Path

SAMPLE_FILE = "sample_dialogues.json"


def sample_path() -> Path:
    """Path of `sample_dialogues.json` inside the installed package."""
    return Path(__file__).resolve().parent / SAMPLE_FILE


def load_samples():
    """The sample dialogues as `Dialogue`s (`load_pesc(sample_path())`)."""
    from pesc.data.pesc_json import load_pesc

    return load_pesc(sample_path())
