"""Injected faults: rehearse what a search does when trials fail, before a long search depends on it.

    AESEARCH_FAULTS='[{"trial": 3, "epoch": 2}, {"trial": 5, "epoch": 4, "attempts": 1}]' aesearch search ...

Trial N of the search (`#N` in its MLflow run's name) raises `InjectedFault` in epoch E, after
training it and before reporting it: in every attempt, or in its first `attempts` attempts only.
Tune retries a trial that raised up to `budget.max_failures` times from its last checkpoint, so a
fault in every attempt ends as an errored trial, and a fault in fewer attempts than that as a
trial that recovered. The driver reads the variable and hands the faults to its trials (on any
node); a trial counts its attempts in its own MLflow run (tag `aesearch.attempt`).

tests/test_faults.py uses it; nothing else does unless the variable is set.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, PositiveInt, TypeAdapter, ValidationError

from aesearch.errors import UserError
from aesearch.schema import describe_validation_error

VARIABLE = "AESEARCH_FAULTS"


class InjectedFault(RuntimeError):
    """The exception an injected fault raises (its traceback is what an errored trial records)."""


class Fault(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trial: PositiveInt  # the trial's number in its search
    epoch: PositiveInt
    attempts: PositiveInt | None = None  # None: every attempt


def read_faults(environ: dict[str, str] | None = None) -> list[Fault]:
    """The faults the environment asks for (none unless AESEARCH_FAULTS is set)."""
    text = (os.environ if environ is None else environ).get(VARIABLE, "").strip()
    if not text:
        return []
    try:
        return TypeAdapter(list[Fault]).validate_json(text)
    except ValidationError as error:
        raise UserError(f"{VARIABLE}={text[:200]!r}: {describe_validation_error(error)} "
                        '(expected a JSON list of {"trial": N, "epoch": E[, "attempts": K]})') from None


def fire(faults: list[Fault], trial: str, epoch: int, attempt: int) -> None:
    """Raise the fault planned for this trial, epoch and attempt, if any."""
    for fault in faults:
        if str(fault.trial) == trial and fault.epoch == epoch and (fault.attempts is None or attempt <= fault.attempts):
            raise InjectedFault(f"injected fault: trial #{trial}, epoch {epoch}, attempt {attempt} ({VARIABLE})")
