"""The leaderboard: every trial, best first. `rank` is the one ranking of aesearch: the search's
leaderboard (from Tune's results), the report's (from MLflow's runs) and `reproduce --rank` use it.

With several objectives a trial's place is its Pareto rank first (`pareto_rank`, 1: on the front,
no other trial is at least as good on every objective and better on one), then the first objective.
Trials that tie on it (at its resolution: aesearch.metrics.resolved) are ranked by the val/loss of
their kept epoch, the rule that chose each trial's kept epoch among its own tied epochs.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from aesearch.metrics import (COUNT, DIRECTIONS, EXACT, TIEBREAK, at_resolution, board_metrics, lookup, resolved,
                              saturated)
from aesearch.pareto import nondominated_ranks
from aesearch.search.space import (
    SearchSpace,
    decode_params,
)
from aesearch.tracking.outcomes import RANKED, Outcome, counted, is_finite_number


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


# A trial's TIEBREAK at its kept epoch, as its last report or run has it: `best/val/loss` once it has
# ended; a trial stopped early has none, and is judged at the epoch it stopped (`val/loss`).
KEPT_LOSS = (f"best/{TIEBREAK}", TIEBREAK)


def kept_loss(trials: pd.DataFrame) -> pd.Series:
    """Each trial's val/loss at its kept epoch (NaN where it has none): what breaks ties on the objective."""
    best, last = (pd.to_numeric(trials[name], errors="coerce") if name in trials else pd.Series(math.nan, trials.index)
                  for name in KEPT_LOSS)
    return best.fillna(last)


def rank(trials: pd.DataFrame, columns: list[str], modes: list[str], tiebreak: str | None = None) -> pd.DataFrame:
    """Every trial, best first, with its `rank` (and `pareto_rank` for several objectives); the
    others follow, unranked (rank NaN), in the order given. `columns` are named as the metrics they
    hold. Ties on the first (at its resolution) are broken by the kept epoch's val/loss (`kept_loss`),
    then by `tiebreak`, then by the order given.

    One objective: the trials that trained to an end of their own (a RANKED outcome) with a finite
    value are ranked on it. Several: only the completed ones, each with every value finite; a trial
    stopped early has its state at the stop, which would put an untrained model on the front.
    """
    if trials.empty:
        return trials.assign(rank=pd.Series(dtype=float))
    multi = len(columns) > 1
    rankable = trials["state"].isin(["completed"] if multi else RANKED)
    for column in columns:
        rankable &= trials[column].map(is_finite_number)
    first = columns[0]
    ranked = trials[rankable]
    ranked = ranked.assign(_resolved=ranked[first].map(lambda value: resolved(first, float(value))),
                           _kept_loss=kept_loss(ranked))
    keys, ascending = ["_resolved", "_kept_loss"], [DIRECTIONS[modes[0]].ascending, True]
    if multi:
        points = ranked[columns].to_numpy(dtype=float)
        ranked = ranked.assign(pareto_rank=nondominated_ranks(points, modes) if len(ranked) else np.array([], int))
        keys, ascending = ["pareto_rank", *keys], [True, *ascending]
    if tiebreak:
        keys, ascending = [*keys, tiebreak], [*ascending, True]
    ranked = ranked.sort_values(keys, ascending=ascending, kind="stable", na_position="last")
    ranked = ranked.drop(columns=["_resolved", "_kept_loss"]).assign(rank=range(1, len(ranked) + 1))
    return pd.concat([ranked, trials[~rankable].assign(rank=math.nan)], ignore_index=True)


def outside_the_best(last_results: dict[str, dict], metrics: list[str], modes: list[str], keep: int) -> list[str]:
    """Of these ended trials (trial id -> its last report), those not among the best `keep` by `rank`
    (nor, with several objectives, on the front): the trials whose checkpoints a search need not keep."""
    names = list(dict.fromkeys([*metrics, *KEPT_LOSS]))
    table = pd.DataFrame([{"trial": trial, "state": Outcome.from_report(last).kind,
                           **{name: last.get(name, math.nan) for name in names}}
                          for trial, last in last_results.items()], columns=["trial", "state", *names])
    board = rank(table, metrics, modes)
    kept = board["rank"] <= keep
    if "pareto_rank" in board:
        kept |= board["pareto_rank"] == 1
    return board.loc[~kept, "trial"].tolist()


def tie_at_the_top(board: pd.DataFrame, metric: str) -> str | None:
    """'12 trials tie at val/anomaly_auroc = 1.000, the best it can be; ranked by val/loss': the
    sentence a summary gives when the leaders tie on the objective (at its resolution), else None."""
    values = board.loc[board["rank"].notna(), metric] if len(board) else pd.Series(dtype=float)
    best = values.iloc[0] if len(values) else math.nan
    tied = int((values.map(lambda value: resolved(metric, value)) == resolved(metric, best)).sum())
    if tied < 2:
        return None
    limit = ", the best it can be" if saturated(metric, best) else ""
    return (f"{tied} trials tie at {metric} = {at_resolution(metric, best)}{limit}; "
            f"ranked by {TIEBREAK} at their kept epoch")


# What each trial took, in leaderboard.csv beside the metrics (benchmarks/ read them).
TRIAL_TIMES = ["time/trial_seconds", "time/tracking_seconds"]


def leaderboard(results, space: SearchSpace) -> pd.DataFrame:
    """One row per trial, best first: outcome, objectives, test metrics and parameters."""
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
                **{metric: last.get(metric, math.nan) for metric in space.metrics},
                **{name: last.get(name, math.nan) for name in [*board_metrics(space.metrics), *TRIAL_TIMES, *KEPT_LOSS]},
                "node": last.get("node", ""),
                "mlflow_run_id": last.get("mlflow_run_id", ""),
                "params": ", ".join(f"{k}={v}" for k, v in params.items()),
            }
        )
    return rank(pd.DataFrame(rows), space.metrics, space.modes)


def best_of_each_family(board: pd.DataFrame) -> pd.DataFrame:
    """The best ranked trial of each variant family, best first (the board is ranked: `rank`)."""
    return board[board["rank"].notna()].groupby("family", sort=False).head(1)


def format_leaderboard(board: pd.DataFrame, space: SearchSpace, where: str, top: int = 10) -> str:
    metric = space.primary.metric
    if board.empty:
        return "no trials ran"
    shown = [name for name in board_metrics(space.metrics) if name in board and board[name].notna().any()]
    front = ["pareto_rank"] if "pareto_rank" in board else []
    tie = None if space.multi_objective else tie_at_the_top(board, metric)
    if tie:  # the value that ranked the tied trials, shown beside the objective
        board = board.assign(**{TIEBREAK: kept_loss(board)})
    columns = list(dict.fromkeys(["trial", "family", "outcome", "epochs", *front, *space.metrics,
                                  *([TIEBREAK] if tie else []), *shown]))
    counts = {name: "Int64" for name in columns if getattr(lookup(name), "scale", None) in (COUNT, EXACT)}
    overall = board.head(top)[columns].round(dict.fromkeys(counts, 0)).astype(counts)  # 70660, not 7.066e+04
    per_family = best_of_each_family(board)[columns].round(dict.fromkeys(counts, 0)).astype(counts)
    ranking = ", ".join(f"{o.metric} {o.mode}" for o in space.objective)
    if space.multi_objective:
        ranking = f"Pareto rank on {ranking}, then {metric}; completed trials only"
    summary = counted(board["state"])
    tie = f"{tie} (lower is better)\n" if tie else ""
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        return (
            f"\n{len(board)} trials: {summary}\n\n"
            f"best trials ({ranking}):\n{overall.to_string(index=False, na_rep='-')}\n{tie}\n"
            f"best per variant family:\n{per_family.to_string(index=False, na_rep='-')}\n\n"
            f"results: {where}\n"
        )
