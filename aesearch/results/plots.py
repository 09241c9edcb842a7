"""The report's figures: pure functions from the leaderboard (`aesearch.results.report.leaderboard`: the
finished trials with an objective, best first) to matplotlib Figures. They use matplotlib's
object API (no pyplot, no global state), and a figure
that has nothing to show says why by raising `NotApplicable`.

Finished trials are drawn as dots when they ran to the end and as crosses when ASHA stopped
them: a stopped trial's values are those of the epoch it was stopped at.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from aesearch.metrics import DIRECTIONS, lookup
from aesearch.pareto import nondominated_ranks
from aesearch.registry import Registry

FIGSIZE = (6.4, 4.0)
MARKERS = {"completed": "o", "stopped": "x"}


class NotApplicable(Exception):
    """This search has nothing for this figure (no VAEs, no denoising trials, ...)."""


def family_colours(families: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {family: palette(i % 10) for i, family in enumerate(sorted(set(families)))}


def _scatter_by_family(axes, points: pd.DataFrame, x: str, y: str, colours: dict[str, Any]) -> None:
    for family, group in points.groupby("family", sort=True):
        label = family
        for state, marker in MARKERS.items():
            part = group[group["state"] == state]
            if len(part):
                axes.scatter(part[x], part[y], s=36, marker=marker, color=colours[family], label=label)
                label = None  # one legend entry per family


def pareto_front(points: pd.DataFrame, x: str, y: str, y_mode: str = "min") -> pd.DataFrame:
    """The points no other point beats on both x (minimised) and y (in its mode), in order of x: the
    front the leaderboard ranks by (`aesearch.pareto`), on these two axes."""
    ordered = points.dropna(subset=[x, y]).sort_values([x, y], ascending=[True, DIRECTIONS[y_mode].ascending], kind="stable")
    return ordered[nondominated_ranks(ordered[[x, y]].to_numpy(), ["min", y_mode]) == 1]


def _front_line(axes, points: pd.DataFrame, x: str, y: str, y_mode: str = "min") -> None:
    front = pareto_front(points, x, y, y_mode)
    if len(front) >= 2:
        axes.step(front[x], front[y], where="post", color="black", linewidth=1, alpha=0.6, label="Pareto front")
    axes.legend(fontsize=7, loc="best")


def _yscale(metric: str, values: pd.Series) -> str:
    """Linear for a metric in a fixed range (AUROC, accuracies: the catalogue's `bounded`), else log where
    every value is positive (errors and losses span decades)."""
    known = lookup(metric)
    return "log" if not (known and known.bounded) and (values > 0).all() else "linear"


def _having(rows: pd.DataFrame, *needed: str) -> pd.DataFrame:
    """The rows that have a value in every `needed` column (none, if a column is missing)."""
    if any(column not in rows for column in needed):
        return rows.iloc[:0]
    return rows.dropna(subset=list(needed))


# --- the figures ----------------------------------------------------------------------------------


def objectives_front(board: pd.DataFrame, objectives: list[tuple[str, str]], **_) -> Figure:
    """The first two objectives of a multi-objective search: every ranked (completed) trial, the
    Pareto front (on all objectives) ringed and joined, each axis saying which way is better."""
    if len(objectives) < 2 or "pareto_rank" not in board:
        raise NotApplicable("the search has one objective")
    (x, x_mode), (y, y_mode) = objectives[:2]
    figure = Figure(figsize=FIGSIZE)
    axes = figure.subplots()
    _scatter_by_family(axes, board, x, y, family_colours(list(board["family"])))
    front = board[board["pareto_rank"] == 1].sort_values(x)
    axes.scatter(front[x], front[y], s=120, facecolors="none", edgecolors="black", linewidths=1.2, label="Pareto front")
    if len(objectives) == 2 and len(front) >= 2:  # with two objectives the front is a staircase
        axes.step(front[x], front[y], where="post" if x_mode == y_mode else "pre", color="black", linewidth=1,
                  alpha=0.6)
    axes.set(xlabel=f"{x} ({DIRECTIONS[x_mode].phrase})", ylabel=f"{y} ({DIRECTIONS[y_mode].phrase})",
             title="Pareto front" + (f" (on {len(objectives)} objectives; first two shown)" if len(objectives) > 2 else ""))
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    return figure


def search_progress(board: pd.DataFrame, metric: str, mode: str, **_) -> Figure:
    """The objective of each trial in the order they started, and the best so far."""
    if board.empty:
        raise NotApplicable("no finished trial yet")
    figure = Figure(figsize=FIGSIZE)
    axes = figure.subplots()
    for state, marker in MARKERS.items():
        part = board[board["state"] == state]
        axes.scatter(part["number"], part["objective"], s=30, marker=marker, label=state)
    ordered = board.sort_values("number")
    sign = DIRECTIONS[mode].sign
    best = (ordered["objective"] * sign).cummin() * sign
    axes.step(ordered["number"], best, where="post", color="tab:red", label="best so far")
    axes.set(xlabel="trial number", ylabel=metric, yscale=_yscale(metric, board["objective"]),
             title="Search progress")
    axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


def learning_curves(board: pd.DataFrame, curves: pd.DataFrame, metric: str, **_) -> Figure:
    """The objective per epoch of the trials whose curves were read (the top ones)."""
    if curves.empty:
        raise NotApplicable("no per-epoch values logged yet")
    figure = Figure(figsize=FIGSIZE)
    axes = figure.subplots()
    for row in board[board["run_id"].isin(curves["run_id"])].itertuples():
        curve = curves[curves["run_id"] == row.run_id].sort_values("step")
        axes.plot(curve["step"], curve["value"], marker=".", markersize=3, label=f"#{row.rank} {row.name}")
    axes.set(xlabel="epoch", ylabel=metric, yscale=_yscale(metric, curves["value"]),
             title="Learning curves of the top trials")
    axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


def latent_size_front(board: pd.DataFrame, metric: str, mode: str, **_) -> Figure:
    """The objective against code size: the smallest code for each level of it."""
    points = _having(board, "latent_dim")
    if points["latent_dim"].nunique() < 2:
        raise NotApplicable("the latent size did not vary")
    figure = Figure(figsize=FIGSIZE)
    axes = figure.subplots()
    _scatter_by_family(axes, points, "latent_dim", "objective", family_colours(list(board["family"])))
    _front_line(axes, points, "latent_dim", "objective", mode)
    axes.set(xscale="log", xlabel="latent size", ylabel=f"{metric} ({DIRECTIONS[mode].phrase})",
             title=f"Pareto front: {metric} vs latent size")
    sizes = sorted(points["latent_dim"].unique())
    axes.set_xticks(sizes, labels=[str(int(v)) for v in sizes])
    axes.minorticks_off()
    figure.tight_layout()
    return figure


def rate_distortion(board: pd.DataFrame, **_) -> Figure:
    """VAEs: KL (rate, nats) against reconstruction error (distortion), on validation data at
    each trial's last epoch; colour is beta."""
    vaes = _having(board[board["latent"] == "gaussian"], "val/kl", "val/recon_mse", "beta")
    if vaes.empty:
        raise NotApplicable("no finished VAE trials")
    figure = Figure(figsize=FIGSIZE)
    axes = figure.subplots()
    norm = LogNorm(vaes["beta"].min(), max(vaes["beta"].max(), vaes["beta"].min() * 1.01))
    for state, marker in MARKERS.items():
        part = vaes[vaes["state"] == state]
        if len(part):
            axes.scatter(part["val/kl"], part["val/recon_mse"], c=part["beta"], norm=norm, cmap="viridis", s=40,
                         marker=marker, label=state)
    figure.colorbar(axes.collections[0], ax=axes, label="beta")
    _front_line(axes, vaes, "val/kl", "val/recon_mse")
    axes.set(xlabel="rate: val/kl (nats)", ylabel="distortion: val/recon_mse", title="VAE rate / distortion")
    figure.tight_layout()
    return figure


def sparsity_front(board: pd.DataFrame, **_) -> Figure:
    """Deterministic codes: reconstruction against how many code values are active (test set)."""
    points = _having(board[board["latent"] == "deterministic"], "test/active_fraction", "test/recon_mse")
    if len(points) < 2:
        raise NotApplicable("fewer than two completed deterministic trials with sparsity statistics")
    figure = Figure(figsize=FIGSIZE)
    axes = figure.subplots()
    _scatter_by_family(axes, points, "test/active_fraction", "test/recon_mse", family_colours(list(board["family"])))
    _front_line(axes, points, "test/active_fraction", "test/recon_mse")
    axes.set(xlabel="fraction of code values active (|h| > threshold)", ylabel="test/recon_mse",
             title="Pareto front: reconstruction vs sparsity")
    figure.tight_layout()
    return figure


def beta_effect(board: pd.DataFrame, metric: str, **_) -> Figure:
    """VAEs: the objective and the KL against beta, one marker per annealing schedule."""
    vaes = _having(board[board["latent"] == "gaussian"], "beta")
    if vaes.empty:
        raise NotApplicable("no finished VAE trials")
    figure = Figure(figsize=(FIGSIZE[0] * 1.5, FIGSIZE[1]))
    left, right = figure.subplots(1, 2)
    colours = dict(zip(sorted(vaes["schedule"].dropna().unique()), ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for schedule, group in vaes.groupby("schedule"):
        for axes, column in ((left, "objective"), (right, "val/kl")):
            if column in group:
                for state, marker in MARKERS.items():
                    part = group[group["state"] == state]
                    axes.scatter(part["beta"], part[column], marker=marker, color=colours[schedule],
                                 label=f"{schedule} ({state})" if len(part) else None)
    left.set(xscale="log", xlabel="beta", ylabel=metric, title="Effect of beta and the KL schedule")
    right.set(xscale="log", xlabel="beta", ylabel="val/kl (nats)", title="KL kept by the code")
    left.legend(fontsize=7, title="schedule", title_fontsize=7)
    figure.tight_layout()
    return figure


def noise_effect(board: pd.DataFrame, metric: str, **_) -> Figure:
    """Denoising: the objective (clean inputs) by noise type and level; the dashed line is the
    best trial trained without noise."""
    noisy = _having(board[board["noise"] != "none"], "noise_level")
    if noisy.empty:
        raise NotApplicable("no finished denoising trials")
    kinds = sorted(noisy["noise"].unique())
    figure = Figure(figsize=(min(4.0 * len(kinds), 14), FIGSIZE[1]))
    panels = np.atleast_1d(figure.subplots(1, len(kinds), sharey=True))
    clean = board[board["noise"] == "none"]
    for axes, kind in zip(panels, kinds):
        group = noisy[noisy["noise"] == kind]
        for state, marker in MARKERS.items():
            part = group[group["state"] == state]
            axes.scatter(part["noise_level"], part["objective"], marker=marker, color="tab:purple",
                         label=state if len(part) else None)
        if len(clean):
            axes.axhline(clean["objective"].min(), linestyle="--", color="gray", label="best without noise")
        axes.set(xlabel=f"{kind} level", title=kind)
    panels[0].set(ylabel=metric)
    panels[0].legend(fontsize=7)
    figure.suptitle("Noise type x level")
    figure.tight_layout()
    return figure


def importance_chart(importance: pd.DataFrame, metric: str, **_) -> Figure:
    """Optuna's hyperparameter importances, fANOVA and PED-ANOVA side by side."""
    if importance.empty:
        raise NotApplicable(importance.attrs.get("why", "no importance"))
    shown = importance.head(12).iloc[::-1]
    figure = Figure(figsize=(FIGSIZE[0], 0.35 * len(shown) + 1.2))
    axes = figure.subplots()
    positions = np.arange(len(shown))
    for offset, column in ((-0.2, "fanova"), (0.2, "ped_anova")):
        if column in shown:
            axes.barh(positions + offset, shown[column].fillna(0), height=0.4, label=column)
    axes.set_yticks(positions, labels=shown["parameter"])
    axes.set(xlabel="importance (normalised)", title=f"Hyperparameter importance for {metric}")
    axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


def asha_chart(asha: dict[str, Any], **_) -> Figure:
    """Where trials ended: stopped at each rung, or ran the full budget."""
    ended = asha["stopped_at"]
    if not ended and not asha["completed"]:
        raise NotApplicable("no trial has ended yet")
    figure = Figure(figsize=FIGSIZE)
    axes = figure.subplots()
    epochs = sorted(ended)
    axes.bar([str(e) for e in epochs], [ended[e] for e in epochs], color="tab:gray", label="stopped by ASHA")
    axes.bar([str(asha["max_epochs"])], [asha["completed"]], color="tab:green", label="ran to the end")
    axes.set(xlabel="epoch the trial ended at", ylabel="trials",
             title=f"ASHA: {asha['epochs_trained']} of {asha['epochs_full_budget']} epochs trained "
                   f"({100 * asha['saved']:.0f}% saved)")
    axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


@dataclass(frozen=True)
class ReportFigure:
    caption: str
    draw: Callable[..., Figure]  # raises NotApplicable, saying why, where the search lacks its data


# By file stem, in the order the report shows them.
FIGURES: Registry[ReportFigure] = Registry("report figure")
FIGURES.add("objectives_front", ReportFigure("Pareto front of the search's objectives", objectives_front))
FIGURES.add("learning_curves", ReportFigure("Learning curves of the top trials", learning_curves))
FIGURES.add("search_progress", ReportFigure("Objective against trial number (search progress)", search_progress))
FIGURES.add("latent_size", ReportFigure("Pareto front: the objective against latent size", latent_size_front))
FIGURES.add("rate_distortion", ReportFigure("VAE rate / distortion (reconstruction against KL)", rate_distortion))
FIGURES.add("sparsity", ReportFigure("Pareto front: reconstruction against sparsity", sparsity_front))
FIGURES.add("beta", ReportFigure("Effect of beta and the KL annealing schedule", beta_effect))
FIGURES.add("noise", ReportFigure("Noise type x level for denoising", noise_effect))
FIGURES.add("importance", ReportFigure("Hyperparameter importance (Optuna)", importance_chart))
FIGURES.add("asha", ReportFigure("ASHA: where trials were stopped", asha_chart))


def all_figures(
    board: pd.DataFrame, curves: pd.DataFrame, importance: pd.DataFrame, asha: dict[str, Any], metric: str, mode: str,
    objectives: list[tuple[str, str]] | None = None,
) -> tuple[dict[str, tuple[str, Figure]], dict[str, str]]:
    """Every figure that applies ({stem: (caption, figure)}) and why the others were not drawn."""
    drawn, not_drawn = {}, {}
    for stem in FIGURES:
        caption, draw = FIGURES[stem].caption, FIGURES[stem].draw
        try:
            drawn[stem] = (caption, draw(board=board, curves=curves, importance=importance, asha=asha, metric=metric,
                                         mode=mode, objectives=objectives or [(metric, mode)]))
        except NotApplicable as why:
            not_drawn[caption] = str(why)
    return drawn, not_drawn
