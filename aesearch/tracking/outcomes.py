"""How a trial ended: completed, stopped early, diverged, errored, invalid, not started.
"""

from __future__ import annotations

import math
from typing import Any


def is_finite_number(value: Any) -> bool:
    """A real objective value: not missing, not NaN or inf (a diverged or invalid trial)."""
    return isinstance(value, int | float) and math.isfinite(value)


def outcome_kind(outcome: str) -> str:
    """'stopped early at epoch 5' -> 'stopped early': the outcome without its epoch."""
    return outcome.split(" at epoch")[0]


def outcome(last: dict[str, Any], error: Exception | None) -> str:
    """How a trial ended, from its last report."""
    if error is not None:
        return "errored"
    if last.get("outcome/invalid"):
        return "invalid config"
    if last.get("outcome/diverged"):
        return f"diverged at epoch {int(last.get('epoch', 0))}"
    if last.get("outcome/completed"):
        return "completed"
    if "epoch" not in last:
        return "not started"
    return f"stopped early at epoch {int(last['epoch'])}"
