"""The search's leaderboard: one row per trial, best first, from Tune's results.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pandas as pd

from aesearch.search.space import (
    SearchSpace,
    decode_params,
)
from aesearch.tracking.outcomes import outcome, outcome_kind


class NothingRan(Exception):
    """Every trial of the search errored or never started: it found nothing, and says so."""

    def __init__(self, name: str, board: pd.DataFrame, where: str):
        self.board = board
        counts = Counter(outcome_kind(state) for state in board.get("outcome", []))
        states = ", ".join(f"{n} {state}" for state, n in counts.most_common()) or "no trial started"
        super().__init__(f"search {name!r}: no trial ran to an end ({states}); each trial's error is in its "
                         f"MLflow run (errors/tracebacks.txt) and the leaderboard, {where}")


def nothing_ran(board: pd.DataFrame) -> bool:
    """No trial trained to an outcome of its own: each errored, or none started."""
    return board.empty or bool(board["outcome"].map(outcome_kind).isin({"errored", "not started"}).all())


LEADERBOARD_METRICS = [
    "test/recon_mse", "test/psnr", "test/probe_accuracy", "test/nll", "model/parameters", "time/trial_seconds",
    "time/tracking_seconds",
]


def leaderboard(results, space: SearchSpace) -> pd.DataFrame:
    """One row per trial, best first: outcome, objective, test metrics and parameters."""
    metric, mode = space.objective.metric, space.objective.mode
    rows = []
    for result in results:
        last = result.metrics or {}
        params = decode_params(space, (result.config or {}))
        rows.append(
            {
                "trial": last.get("trial_id", Path(result.path).name),
                "family": last.get("family", "?"),
                "outcome": outcome(last, result.error),
                "epochs": int(last.get("epoch", 0)),
                metric: last.get(metric, math.nan),
                **{name: last.get(name, math.nan) for name in LEADERBOARD_METRICS},
                "node": last.get("node", ""),
                "mlflow_run_id": last.get("mlflow_run_id", ""),
                "params": ", ".join(f"{k}={v}" for k, v in params.items()),
            }
        )
    board = pd.DataFrame(rows)
    if board.empty:
        return board
    board = board.sort_values(metric, ascending=(mode == "min"), na_position="last", kind="stable")
    return board.reset_index(drop=True)


def format_leaderboard(board: pd.DataFrame, space: SearchSpace, where: str, top: int = 10) -> str:
    metric = space.objective.metric
    if board.empty:
        return "no trials ran"
    columns = ["trial", "family", "outcome", "epochs", metric, "test/recon_mse", "test/psnr", "test/probe_accuracy"]
    overall = board.head(top)[columns]
    per_family = board.dropna(subset=[metric]).groupby("family", sort=False).head(1)[columns]
    counts = Counter(outcome_kind(state) for state in board["outcome"])
    summary = ", ".join(f"{n} {state}" for state, n in counts.most_common())
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        return (
            f"\n{len(board)} trials: {summary}\n\n"
            f"best trials ({metric}, {space.objective.mode}):\n{overall.to_string(index=False, na_rep='-')}\n\n"
            f"best per variant family:\n{per_family.to_string(index=False, na_rep='-')}\n\n"
            f"results: {where}\n"
        )
