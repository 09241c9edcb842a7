"""`aesearch report`: one page that says which variant won a search, by how much, on what, and why.

    reports/NAME/index.html       self-contained (figures and images embedded): opens from disk
    reports/NAME/report.md        the same in Markdown, its pictures in figures/ and images/ beside it
    reports/NAME/leaderboard.csv  every trial, ranked on the search's objective, with its command

`read_search` is the only part that talks to MLflow: it turns a search into a `SearchRecord`
(the runs as `mlflow.search_runs` gives them, as a DataFrame, plus a few curves and images).
Everything else is a pure function of that record: tables (`trial_table`, `leaderboard`,
`best_per_metric`, ...), figures (`aesearch.results.plots`), and their rendering as HTML and Markdown.
A search that is still running gives a partial report of what has been logged so far.
"""

from __future__ import annotations

import html
import io
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pandas as pd

from aesearch.metrics import DIRECTIONS, TIEBREAK, at_resolution, board_metrics, lookup, resolved
from aesearch.results.read import SearchRecord
from aesearch.results.tables import (
    asha_summary,
    best_per_family,
    best_per_metric,
    best_per_objective,
    importances,
    leaderboard,
    pareto_front_table,
    relative_gap,
    reproduce_command,
    seed_summary,
)
from aesearch.search.leaderboard import kept_loss, tie_at_the_top
from aesearch.tracking.outcomes import counted

# --- the report ---------------------------------------------------------------------------------

BOLD = re.compile(r"\*\*(.+?)\*\*")  # the headline's emphasis, as Markdown writes it


@dataclass(repr=False)
class Report:
    """Every table and figure of a search's report (pure: made from a SearchRecord). In a notebook it shows
    its headline and its top ten trials, not its figures' bytes."""

    record: SearchRecord
    trials: pd.DataFrame
    board: pd.DataFrame
    families: pd.DataFrame
    best_metrics: pd.DataFrame
    front: pd.DataFrame  # several objectives: the trials on the Pareto front (else empty)
    best_objectives: pd.DataFrame  # several objectives: the best trial on each (else empty)
    seeds: pd.DataFrame
    asha: dict[str, Any]
    importance: pd.DataFrame
    figures: dict[str, tuple[str, bytes]]  # file stem -> (caption, PNG)
    not_drawn: dict[str, str]  # caption -> why there is no such figure
    generated: str

    def __repr__(self) -> str:
        first = BOLD.sub(r"\1", headline(self)[0])
        return f"<Report of {self.record.experiment}: {status_line(self)}. {first}>"

    def _repr_html_(self) -> str:
        lines = "".join("<p>" + BOLD.sub(r"<b>\1</b>", html.escape(line)) + "</p>" for line in headline(self))
        top = board_view(self, self.board.head(10)).to_html(index=False, na_rep="-")
        return (f"<h4>{html.escape(self.record.experiment)}: {html.escape(status_line(self))}</h4>{lines}{top}"
                f"<p>{len(self.figures)} figures: <code>report.figures</code>; every table: <code>report.board</code>, "
                "<code>report.families</code>, <code>report.best_metrics</code>, ...</p>")


BOARD_COLUMNS = ["rank", "name", "family", "outcome", "epochs", "objective"]  # then the board's metrics


def board_view(report: Report, rows: pd.DataFrame, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """Leaderboard rows as shown: the objective under its own name, the reproduce command last."""
    metric, _ = report.record.objective
    shown = board_metrics([name for name, _ in report.record.objectives])
    # a detector's figures are those of its anomaly score: the board names it
    scored = ["anomaly_score"] if any(str(name).startswith(("val/anomaly_", "test/anomaly_")) for name in rows) else []
    # and a clusterer's, those of its clustering stage
    grouped = ["clustering"] if any(str(name).startswith(("val/cluster_", "test/cluster_")) for name in shown) else []
    columns = [c for c in BOARD_COLUMNS + shown + scored + grouped + list(extra) if c in rows]
    view = rows[columns].rename(columns={"objective": metric, "name": "trial"})
    view = view.loc[:, ~view.columns.duplicated()].copy()  # the objective once, under its own name
    view["reproduce"] = [reproduce_command(report.record.experiment, r, report.record.uri) for r in rows["run_id"]]
    return view


SEED_METRICS = ["objective", "test/recon_mse", "test/psnr", "test/probe_accuracy"]


def build_report(record: SearchRecord) -> Report:
    from aesearch.results import plots

    metric, mode = record.objective
    trials = record.trials
    board = leaderboard(trials, record.objectives)
    importance = importances(board, record.space, mode)
    asha = asha_summary(trials, record.search.get("params", {}))
    drawn, not_drawn = plots.all_figures(board, record.curves, importance, asha, metric, mode, record.objectives)
    figures = {stem: (caption, _png(figure)) for stem, (caption, figure) in drawn.items()}
    return Report(
        record=record, trials=trials, board=board, families=best_per_family(board),
        best_metrics=best_per_metric(trials), front=pareto_front_table(board, record.objectives),
        best_objectives=best_per_objective(board, record.objectives),
        seeds=seed_summary(trials, SEED_METRICS), asha=asha,
        importance=importance, figures=figures, not_drawn=not_drawn,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )


def headline(report: Report) -> list[str]:
    """The answer in a few sentences: who won, by how much, on what, and what mattered."""
    record, board = report.record, report.board
    metric, mode = record.objective
    if board.empty:
        return [f"No trial has finished with a finite {metric} yet."]
    winner = board.iloc[0]
    if len(record.objectives) > 1:
        goals = ", ".join(f"{m} ({DIRECTIONS[d].phrase})" for m, d in record.objectives)
        on_front = (f"1 trial is on the Pareto front of {goals}: no other trial beats it on every objective at once."
                    if len(report.front) == 1 else f"{len(report.front)} trials are on the Pareto front of {goals}: "
                    "none of them is beaten on every objective at once.")
        lines = [f"{on_front} Best on each: " + "; ".join(
                     f"{row.objective} {row.value:.4g} ({row.trial}, {row.family})"
                     for row in report.best_objectives.itertuples()) + ". Trials stopped early are left out."]
        return lines + [f"Ranked first (on the front, best on {metric}): trial {winner['name']} ({winner['family']})."]
    kept = f" (weights of epoch {winner['best/epoch']:.0f} kept)" if pd.notna(winner.get("best/epoch")) else ""
    lines = [f"**{winner['family']}** wins: trial {winner['name']} reaches {metric} = {winner['objective']:.4g} "
             f"({DIRECTIONS[mode].phrase}) after {winner['epochs']} epochs{kept}."]
    losses = dict(zip(board["run_id"], kept_loss(board)))  # what ranks trials that tie on the objective
    tie = tie_at_the_top(board, metric)
    if tie:
        lines.append(f"{tie} (lower is better): the winner's {losses[winner['run_id']]:.4g}.")
    others = report.families[report.families["family"] != winner["family"]]
    if len(others):
        runner = others.iloc[0]
        if resolved(metric, runner["objective"]) == resolved(metric, winner["objective"]):
            lines.append(f"The best other family, {runner['family']} ({runner['name']}), ties with the winner at "
                         f"{metric} = {at_resolution(metric, winner['objective'])} and is ranked below it by "
                         f"{TIEBREAK} ({losses[runner['run_id']]:.4g} against {losses[winner['run_id']]:.4g}).")
        else:
            gap = relative_gap(winner["objective"], runner["objective"])
            lines.append(f"The best other family, {runner['family']} ({runner['name']}), reaches "
                         f"{runner['objective']:.4g}, {100 * abs(gap):.1f}% {'higher' if gap > 0 else 'lower'} "
                         "than the winner.")
    on_test = [m for m in board_metrics([name for name, _ in report.record.objectives]) if m.startswith("test/")]
    tested = [f"{lookup(m).description} {winner[m]:.4g}" for m in on_test if m in winner and pd.notna(winner[m])]
    if tested:
        lines.append("On the test split: " + "; ".join(tested) + ".")
    lines.append(f"What it is: {winner['architecture']} encoder/decoder, {winner['latent']} latent of "
                 f"{winner['latent_dim']} units, objective {winner['objective_formula'] or '?'}, noise "
                 f"{winner['noise']}{'' if winner['noise'] == 'none' else ' ' + format(winner['noise_level'], 'g')}, "
                 f"lr {winner['lr']:.3g}.")
    importance = report.importance.dropna(subset=["fanova"]) if "fanova" in report.importance else pd.DataFrame()
    if len(importance):
        top = ", ".join(f"{row.parameter} ({row.fanova:.2f})" for row in importance.head(3).itertuples())
        over = report.importance.attrs.get("over")
        lines.append(f"What mattered most to {metric} (fANOVA importance{', over ' + over if over else ''}): {top}.")
    return lines


def status_line(report: Report) -> str:
    record, trials = report.record, report.trials
    status = record.search.get("status", "unknown")
    return f"{len(trials)} trials ({counted(trials['state'])}); search run {status}"


def is_partial(report: Report) -> bool:
    return report.record.search.get("status") == "RUNNING" or (report.trials["state"] == "running").any()


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()
