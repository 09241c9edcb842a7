"""How a trial ended, as data: one `Outcome` (kind + epoch + detail), written as tags, read as tags.

Words ("stopped early at epoch 5") are made from it only at the edge, for people: the MLflow UI's
`outcome` tag, the leaderboard, the progress line. Nothing parses words back.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

KINDS = ("completed", "stopped", "diverged", "errored", "invalid", "lost", "not started")
RANKED = ("completed", "stopped")  # a trial that trained to an end of its own has an objective to rank

WORDS_TAG = "outcome"  # for people: the words, shown as a column in MLflow's UI
KIND_TAG = "aesearch.outcome"
EPOCH_TAG = "aesearch.outcome_epoch"
DETAIL_TAG = "aesearch.outcome_detail"

# What a trial reports to Tune on its last report, to say how it ended (see `from_report`).
REPORTED = {"completed": "outcome/completed", "diverged": "outcome/diverged", "invalid": "outcome/invalid"}


@dataclass(frozen=True)
class Outcome:
    kind: str  # one of KINDS
    epoch: int | None = None  # the epoch it stopped or diverged at
    detail: str = ""  # what went wrong, where something did

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"outcome kind {self.kind!r}: not one of {', '.join(KINDS)}")

    @property
    def ranked(self) -> bool:
        return self.kind in RANKED

    def words(self) -> str:
        """The outcome for people: 'completed', 'stopped early at epoch 5', 'errored after 3 attempts: ...'."""
        if self.kind == "stopped":
            return f"stopped early at epoch {self.epoch}"
        if self.kind == "diverged":
            return f"diverged at epoch {self.epoch}"
        if self.kind == "invalid":
            return "invalid config"
        if self.kind in ("errored", "lost") and self.detail:
            return f"{self.kind}: {self.detail}" if self.kind == "lost" else f"errored {self.detail}"
        return self.kind

    def tags(self) -> dict[str, str]:
        tags = {WORDS_TAG: self.words(), KIND_TAG: self.kind, DETAIL_TAG: self.detail[:5000]}
        if self.epoch is not None:
            tags[EPOCH_TAG] = str(self.epoch)
        return tags

    @classmethod
    def from_tags(cls, tags: Mapping[str, Any]) -> Outcome | None:
        """The outcome a run's tags hold, or None (a run still running, or closed by an older aesearch)."""
        kind = tags.get(KIND_TAG)
        if not isinstance(kind, str) or kind not in KINDS:
            return None
        epoch = tags.get(EPOCH_TAG)
        detail = tags.get(DETAIL_TAG)
        return cls(kind, int(epoch) if isinstance(epoch, str) and epoch.isdigit() else None,
                   detail if isinstance(detail, str) else "")

    @classmethod
    def from_report(cls, last: Mapping[str, Any], error: Exception | None = None) -> Outcome:
        """How a trial ended, from its last report to Tune (and the error Tune gave up on, if any)."""
        if error is not None:
            return cls("errored")
        epoch = int(last["epoch"]) if "epoch" in last else None
        if last.get(REPORTED["invalid"]):
            return cls("invalid", detail=str(last.get("error", "")))
        if last.get(REPORTED["diverged"]):
            return cls("diverged", epoch)
        if last.get(REPORTED["completed"]):
            return cls("completed")
        if epoch is None:
            return cls("not started")
        return cls("stopped", epoch)


COUNTED = {"stopped": "stopped early"}  # a kind in a count of trials, where its words are not the kind


def counted(kinds: Iterable[str]) -> str:
    """How many trials ended each way, most first, in the outcomes' words: '7 stopped early, 3 completed'."""
    return ", ".join(f"{n} {COUNTED.get(kind, kind)}" for kind, n in Counter(kinds).most_common()) or "none"


def is_finite_number(value: Any) -> bool:
    """A real objective value: not missing, not NaN or inf (a diverged or invalid trial)."""
    return isinstance(value, int | float) and math.isfinite(value)
