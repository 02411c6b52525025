"""Server configuration: one dataclass, filled by `pesc leaderboard serve` or by tests.

Everything a submitter must not control lives here (gold path, limits, what is disclosed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pesc.errors import ConfigError

ADMIN_TOKEN_ENV = "PESC_LEADERBOARD_ADMIN_TOKEN"

# What a submitter may see of the gold file on a submission page:
#   "none"   - aggregate scores only;
#   "scores" - per-turn scores, the seeker turn and the submitted reply (the seeker turns are in the
#              public test file anyway), never the reference text;
#   "full"   - also the reference reply (for a validation board whose references are public).
REFERENCE_ACCESS = ("none", "scores", "full")


@dataclass
class Limits:
    per_team_per_day: int = 5          # accepted submissions per team per UTC day
    max_upload_bytes: int = 20 * 2**20  # the uploaded file (zip or bare JSON)
    max_json_bytes: int = 8 * 2**20     # result.json once decompressed
    max_json_depth: int = 8             # PESC files need 4 (object > entry > list/object > string)
    max_zip_entries: int = 5000
    max_zip_total_bytes: int = 200 * 2**20  # sum of declared uncompressed sizes
    max_compression_ratio: float = 100.0   # per entry, uncompressed / compressed
    ratio_min_bytes: int = 1 * 2**20       # entries smaller than this are never bombs
    max_reply_chars: int = 2000            # passed to the pre-flight check
    max_name_chars: int = 64               # team and system names

    def validate(self) -> "Limits":
        for name, value in vars(self).items():
            if value <= 0:
                raise ConfigError(f"leaderboard limit {name} must be positive, got {value}")
        return self


@dataclass
class LeaderboardConfig:
    gold: Path
    db_url: str = "sqlite:///leaderboard.db"
    models: list[str] = field(default_factory=list)   # chat models (local paths or Hub ids)
    kl_teacher: str | None = None                     # teacher for KL of submitted models
    kl_model_roots: list[str] = field(default_factory=list)  # where submitted local models may be
    kl_max_examples: int | None = 300                 # gold supporter turns used for KL
    reference_access: str = "scores"
    limits: Limits = field(default_factory=Limits)
    judge: object | None = None                       # a pesc.metrics judge, when configured
    score_workers: int | None = 1                     # processes per scoring run
    submit_concurrency: int = 2                       # scoring runs at the same time
    compute_baselines: bool = True
    title: str = "PESC leaderboard"
    admin_token: str | None = None                    # default: $PESC_LEADERBOARD_ADMIN_TOKEN

    def __post_init__(self):
        self.gold = Path(self.gold)
        if self.reference_access not in REFERENCE_ACCESS:
            raise ConfigError(f"reference access must be one of {', '.join(REFERENCE_ACCESS)}, "
                              f"got {self.reference_access!r}")
        if self.admin_token is None:
            self.admin_token = os.environ.get(ADMIN_TOKEN_ENV) or None
        if self.admin_token is not None and len(self.admin_token) < 12:
            raise ConfigError(f"the admin token (${ADMIN_TOKEN_ENV}) must be at least 12 characters")
        self.limits.validate()
        if self.submit_concurrency < 1:
            raise ConfigError("submit concurrency must be at least 1")
