"""The leaderboard: every trial, best first. `rank` is the one ranking of aesearch: the search's
leaderboard (from Tune's results), the report's (from MLflow's runs) and `reproduce --rank` use it.
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
from aesearch.tracking.outcomes import RANKED, Outcome, is_finite_number


class NothingRan(Exception):
    """Every trial of the search errored or never started: it found nothing, and says so."""

    def __init__(self, name: str, board: pd.DataFrame, where: str):
        self.board = board
        counts = Counter(board.get("state", []))
        states = ", ".join(f"{n} {state}" for state, n in counts.most_common()) or "no trial started"
        super().__init__(f"search {name!r}: no trial ran to an end ({states}); each trial's error is in its "
                         f"MLflow run (errors/tracebacks.txt) and the leaderboard, {where}")


def nothing_ran(board: pd.DataFrame) -> bool:
    """No trial trained to an outcome of its own: each errored, or none started."""
    return board.empty or bool(board["state"].isin({"errored", "not started"}).all())


def rank(trials: pd.DataFrame, column: str, mode: str, tiebreak: str | None = None) -> pd.DataFrame:
    """Every trial, best first: those that trained to an end of their own (a RANKED outcome) with a
    finite `column` are ranked 1..n on it (ties broken by `tiebreak`, then by the order given); the
    others follow, unranked (rank NaN), in the order given."""
    if trials.empty:
        return trials.assign(rank=pd.Series(dtype=float))
    rankable = trials["state"].isin(RANKED) & trials[column].map(is_finite_number)
    keys = [column, *([tiebreak] if tiebreak else [])]
    ranked = trials[rankable].sort_values(keys, ascending=[mode == "min"] + [True] * (len(keys) - 1), kind="stable")
    ranked = ranked.assign(rank=range(1, len(ranked) + 1))
    return pd.concat([ranked, trials[~rankable].assign(rank=math.nan)], ignore_index=True)


def outside_the_best(last_results: dict[str, dict], metric: str, mode: str, keep: int) -> list[str]:
    """Of these ended trials (trial id -> its last report), those not among the best `keep` by `rank`:
    the trials whose checkpoints a search need not keep."""
    table = pd.DataFrame([{"trial": trial, "state": Outcome.from_report(last).kind, metric: last.get(metric, math.nan)}
                          for trial, last in last_results.items()], columns=["trial", "state", metric])
    board = rank(table, metric, mode)
    return board.loc[~(board["rank"] <= keep), "trial"].tolist()


LEADERBOARD_METRICS = [
    "test/recon_mse", "test/psnr", "test/probe_accuracy", "test/nll", "test/anomaly_auroc", "test/anomaly_ap",
    "model/parameters", "time/trial_seconds", "time/tracking_seconds",
]
# The test metrics the printed leaderboard shows, those the search's trials have (PSNR: data in [0, 1];
# probe accuracy: class labels; AUROC: labelled anomalies).
PRINTED_METRICS = ["test/recon_mse", "test/psnr", "test/probe_accuracy", "test/anomaly_auroc"]


def leaderboard(results, space: SearchSpace) -> pd.DataFrame:
    """One row per trial, best first: outcome, objective, test metrics and parameters."""
    metric, mode = space.objective.metric, space.objective.mode
    rows = []
    for result in results:
        last = result.metrics or {}
        params = decode_params(space, (result.config or {}))
        ended = Outcome.from_report(last, result.error)
        rows.append(
            {
                "trial": last.get("trial_id", Path(result.path).name),
                "family": last.get("family", "?"),
                "outcome": ended.words(),
                "state": ended.kind,
                "epochs": int(last.get("epoch", 0)),
                metric: last.get(metric, math.nan),
                **{name: last.get(name, math.nan) for name in LEADERBOARD_METRICS},
                "node": last.get("node", ""),
                "mlflow_run_id": last.get("mlflow_run_id", ""),
                "params": ", ".join(f"{k}={v}" for k, v in params.items()),
            }
        )
    return rank(pd.DataFrame(rows), metric, mode)


def format_leaderboard(board: pd.DataFrame, space: SearchSpace, where: str, top: int = 10) -> str:
    metric = space.objective.metric
    if board.empty:
        return "no trials ran"
    shown = [name for name in PRINTED_METRICS if name in board and board[name].notna().any()]
    columns = list(dict.fromkeys(["trial", "family", "outcome", "epochs", metric, *shown]))
    overall = board.head(top)[columns]
    per_family = board.dropna(subset=[metric]).groupby("family", sort=False).head(1)[columns]
    counts = Counter(board["state"])
    summary = ", ".join(f"{n} {state}" for state, n in counts.most_common())
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        return (
            f"\n{len(board)} trials: {summary}\n\n"
            f"best trials ({metric}, {space.objective.mode}):\n{overall.to_string(index=False, na_rep='-')}\n\n"
            f"best per variant family:\n{per_family.to_string(index=False, na_rep='-')}\n\n"
            f"results: {where}\n"
        )
