"""Injected faults: rehearse what a search does when trials fail, before a long search depends on it.

    AESEARCH_FAULTS='[{"trial": 3, "epoch": 2}, {"trial": 5, "epoch": 4, "attempts": 1}]' aesearch search ...

Trial N of the search (`#N` in its MLflow run's name) raises `InjectedFault` in epoch E, after
training it and before reporting it: in every attempt, or in its first `attempts` attempts only.
Tune retries a trial that raised up to `budget.max_failures` times from its last checkpoint, so a
fault in every attempt ends as an errored trial, and a fault in fewer attempts than that as a
trial that recovered. The driver reads the variable and hands the faults to its trials (on any
node); a trial counts its attempts in its own MLflow run (tag `aesearch.attempt`).

A fault of `"kind": "memory"` allocates memory instead, until Ray's memory monitor kills the trial's
worker (its node past `RAY_memory_usage_threshold`, 0.95 by default), as a trial that outgrows its
node would be. It stops at a hard cap (1 GiB past that threshold, or 1 GiB left available on the
node) and raises there, so a monitor that is off cannot turn a rehearsal into an exhausted machine.

tests/test_faults.py uses it; nothing else does unless the variable is set.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, PositiveInt, TypeAdapter, ValidationError

from aesearch.errors import UserError
from aesearch.registry import Registry
from aesearch.schema import Named, describe_validation_error

VARIABLE = "AESEARCH_FAULTS"
# What a fault does, given where it fires: each raises InjectedFault in the end.
FAULT_KINDS: Registry[Callable[[str], None]] = Registry("fault kind")


class InjectedFault(RuntimeError):
    """The exception an injected fault raises (its traceback is what an errored trial records)."""


class Fault(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trial: PositiveInt  # the trial's number in its search
    epoch: PositiveInt
    attempts: PositiveInt | None = None  # None: every attempt
    kind: Named(FAULT_KINDS) = "raise"  # raise InjectedFault, or allocate until Ray's monitor kills it


def read_faults(environ: dict[str, str] | None = None) -> list[Fault]:
    """The faults the environment asks for (none unless AESEARCH_FAULTS is set)."""
    text = (os.environ if environ is None else environ).get(VARIABLE, "").strip()
    if not text:
        return []
    try:
        return TypeAdapter(list[Fault]).validate_json(text)
    except ValidationError as error:
        raise UserError(f"{VARIABLE}={text[:200]!r}: {describe_validation_error(error)} (expected a JSON list "
                        'of {"trial": N, "epoch": E[, "attempts": K][, "kind": "memory"]})') from None


def fire(faults: list[Fault], trial: str, epoch: int, attempt: int) -> None:
    """Raise the fault planned for this trial, epoch and attempt, if any."""
    for fault in faults:
        if str(fault.trial) == trial and fault.epoch == epoch and (fault.attempts is None or attempt <= fault.attempts):
            FAULT_KINDS[fault.kind](f"trial #{trial}, epoch {epoch}, attempt {attempt} ({VARIABLE})")


@FAULT_KINDS.register("raise")
def raise_fault(where: str) -> None:
    raise InjectedFault(f"injected fault: {where}")


@FAULT_KINDS.register("memory")
def memory_fault(where: str) -> None:
    hog_memory()
    raise InjectedFault(f"injected memory fault reached its cap without being killed: {where}")


GIB = 1 << 30


def node_memory() -> tuple[int, int]:
    """This node's total and used memory in bytes, as Ray's memory monitor counts them (total - available)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    total, available = (int(fields[name].split()[0]) * 1024 for name in ("MemTotal", "MemAvailable"))
    return total, total - available


def hog_memory(step: int = 64 << 20, pause_s: float = 0.05) -> None:
    """Take memory a step at a time (written to, so it is really used) until this process is killed, or
    until the node is 1 GiB past Ray's kill threshold or has 1 GiB left; then give it back and return."""
    threshold = float(os.environ.get("RAY_memory_usage_threshold", "0.95"))
    held = []
    while True:
        total, used = node_memory()
        if used > threshold * total + GIB or total - used < GIB:
            return
        held.append(b"\x01" * step)
        time.sleep(pause_s)  # the monitor looks every RAY_memory_monitor_refresh_ms (250 ms by default)
