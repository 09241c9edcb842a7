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

import base64
import html
import io
import json
import math
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aesearch.errors import UserError
from aesearch.tracking.runs import REPRODUCES_TAG, ROLE_TAG, TRIAL_NUMBER_TAG
from aesearch.tracking.store import check_store_exists, client, fluent_api_on, resolve_tracking_uri

# Evaluation metrics the report ranks trials on: name -> (what it is, which way is better).
# Denoising PSNRs (one per corruption kind, `test/denoise_psnr_<kind>`) are added as found.
RANKED_METRICS = {
    "test/recon_mse": ("reconstruction MSE (clean test images)", "min"),
    "test/psnr": ("PSNR, dB", "max"),
    "test/nll": ("NLL, nats (VAEs, IWAE bound)", "min"),
    "test/probe_accuracy": ("linear-probe accuracy of the codes", "max"),
    "test/knn_accuracy": ("kNN accuracy of the codes", "max"),
    "test/kmeans_ari": ("KMeans ARI of the codes", "max"),
    "test/kmeans_nmi": ("KMeans NMI of the codes", "max"),
    "test/anomaly_auroc": ("anomaly AUROC (held-out class)", "max"),
    "test/active_units": ("active latent units (VAEs)", "max"),
    "model/parameters": ("parameters", "min"),
    "time/train_seconds": ("training time, s", "min"),
}
DENOISE_PREFIX = "test/denoise_psnr_"
# How a trial ended, from its outcome tag; only finished trials are ranked.
RANKED_STATES = ("completed", "stopped")
TOP = 5  # trials whose curves and pictures the report shows


@dataclass
class SearchRecord:
    """A search as logged in MLflow: everything the report is made from."""

    experiment: str
    uri: str
    search: dict[str, Any]  # the search run: status, params, tags (empty if there is none)
    space: Any  # the SearchSpace it was launched with, or None
    runs: pd.DataFrame  # trial runs, as mlflow.search_runs returns them
    curves: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["run_id", "step", "value"]))
    images: dict[str, dict[str, bytes]] = field(default_factory=dict)  # run id -> {name: PNG bytes}
    reproductions: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def objective(self) -> tuple[str, str]:
        return search_objective(self.search)


def search_objective(search: dict[str, Any]) -> tuple[str, str]:
    """(metric, mode) the search ranked its trials on, from its run's params."""
    params = search.get("params", {})
    return params.get("objective.metric", "val/recon_mse"), params.get("objective.mode", "min")


# --- reading a search from MLflow ---------------------------------------------------------------


def read_search(uri: str, experiment: str, top: int = TOP) -> SearchRecord:
    """The search's runs (`mlflow.search_runs` as pandas) and, for its top trials, the objective
    per epoch and their pictures."""
    experiment_id, search, runs = read_trials(uri, experiment)  # first: it checks that the store exists
    store = client(uri)
    record = SearchRecord(experiment, uri, search, _launched_space(store, search), runs,
                          reproductions=runs_of(uri, experiment_id, "reproduction"))
    metric, mode = record.objective
    board = leaderboard(trial_table(runs, metric), mode)
    shown = list(board["run_id"][:top])
    record.curves = pd.DataFrame(
        [{"run_id": run_id, "step": m.step, "value": m.value}
         for run_id in shown for m in store.get_metric_history(run_id, metric)],
        columns=["run_id", "step", "value"],
    )
    vaes = board[board["latent"] == "gaussian"]["run_id"][:top]
    record.images = _pictures(store, shown, list(vaes))
    return record


def read_trials(uri: str, experiment: str) -> tuple[str, dict[str, Any], pd.DataFrame]:
    """(experiment id, the search run's summary, its trial runs as pandas); one line if missing."""
    check_store_exists(uri)
    found = client(uri).get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client(uri).search_experiments() if e.name != "Default")
        known = f"; it holds: {', '.join(names[:20])}" if names else "; it holds no searches yet"
        raise UserError(f"experiment {experiment!r}: no such experiment in the tracking store {uri}{known}")
    runs = runs_of(uri, found.experiment_id, "trial")
    if runs.empty:
        raise UserError(f"experiment {experiment!r} in {uri} has no trial runs yet (has its search started?)")
    parents = runs_of(uri, found.experiment_id, "search")
    return found.experiment_id, ({} if parents.empty else _run_summary(parents.iloc[0])), runs


def runs_of(uri: str, experiment_id: str, role: str) -> pd.DataFrame:
    """The experiment's runs of one role (search, trial, reproduction), as `mlflow.search_runs` gives them."""
    import mlflow

    with fluent_api_on(uri):
        return mlflow.search_runs([experiment_id], filter_string=f"tags.`{ROLE_TAG}` = '{role}'",
                                  output_format="pandas")


def _run_summary(row: pd.Series) -> dict[str, Any]:
    return {
        "run_id": row["run_id"], "status": row["status"],
        "params": {k[len("params."):]: v for k, v in row.items() if k.startswith("params.") and isinstance(v, str)},
        "tags": {k[len("tags."):]: v for k, v in row.items() if k.startswith("tags.") and isinstance(v, str)},
    }


def _launched_space(store, search: dict[str, Any]):
    """The search space as launched (its `space.yaml`), or None if it cannot be read."""
    import yaml

    from aesearch.search.space import SearchSpace

    if not search:
        return None
    with tempfile.TemporaryDirectory() as folder:
        try:
            text = Path(store.download_artifacts(search["run_id"], "space.yaml", folder)).read_text(encoding="utf-8")
            return SearchSpace.model_validate(yaml.safe_load(text))
        except Exception:  # noqa: BLE001 - missing or from another version: the report goes on without it
            return None


def _pictures(store, run_ids: list[str], vae_run_ids: list[str]) -> dict[str, dict[str, bytes]]:
    """Final reconstructions (else the latest drawn during training) and, for VAEs, prior samples."""
    pictures: dict[str, dict[str, bytes]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for run_id in dict.fromkeys(run_ids + vae_run_ids):
            names = {a.path for a in store.list_artifacts(run_id, "images")}
            drawn = sorted(a.path for a in store.list_artifacts(run_id, "images/reconstructions"))
            wanted = {"reconstructions.png": "images/reconstructions.png" if "images/reconstructions.png" in names
                      else (drawn[-1] if drawn else None)}
            if run_id in vae_run_ids:
                wanted["prior_samples.png"] = "images/prior_samples.png" if "images/prior_samples.png" in names else None
            for name, path in wanted.items():
                if path is not None:
                    local = store.download_artifacts(run_id, path, f"{folder}/{run_id}")
                    pictures.setdefault(run_id, {})[name] = Path(local).read_bytes()
    return pictures


# --- tables: pure functions of the runs ---------------------------------------------------------


def parse_param(text: Any) -> Any:
    """An MLflow param (always text) back to its config value: '16' -> 16, '[256, 128]' -> [256, 128]."""
    if not isinstance(text, str):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return {"True": True, "False": False, "None": None}.get(text, text)


def state_of(outcome: str, status: str) -> str:
    """completed / stopped / diverged / errored / invalid / running / killed, from the outcome tag
    (else from the run's status)."""
    if outcome:
        for prefix, state in (("completed", "completed"), ("stopped early", "stopped"), ("diverged", "diverged"),
                              ("errored", "errored"), ("invalid", "invalid"), ("lost", "lost")):
            if outcome.startswith(prefix):
                return state
    return {"RUNNING": "running", "SCHEDULED": "running", "KILLED": "killed", "FAILED": "errored"}.get(status, "unknown")


def trial_table(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per trial run: what it was (family, shape, key parameters), how it ended, its
    objective and every metric it logged (latest values, named as logged)."""
    rows = []
    for _, run in runs.iterrows():
        config = {k[len("params."):]: parse_param(v) for k, v in run.items() if k.startswith("params.")}
        metrics = {k[len("metrics."):]: v for k, v in run.items() if k.startswith("metrics.") and pd.notna(v)}
        outcome = _tag(run, "outcome") or ""
        state = state_of(outcome, run.get("status", ""))
        stopped_at = re.search(r"at epoch (\d+)", outcome)
        epochs = metrics.get("epoch", int(stopped_at.group(1)) if stopped_at else 0)
        value = metrics.get(metric, math.nan)
        if state in ("diverged", "errored", "invalid") or not np.isfinite(value):
            value = math.nan  # a trial that broke has no objective worth ranking
        name = _tag(run, "mlflow.runName") or run["run_id"][:8]
        rows.append({
            "run_id": run["run_id"], "name": name, "number": _trial_number(_tag(run, TRIAL_NUMBER_TAG), name),
            "family": _tag(run, "family") or "?",
            "architecture": _tag(run, "architecture") or config.get("model.architecture"),
            "latent": _tag(run, "latent") or config.get("model.latent"), "objective_formula": _tag(run, "objective") or "",
            "latent_dim": config.get("model.latent_dim"), "beta": config.get("objective.kl.beta"),
            "schedule": config.get("objective.kl.schedule"), "noise": config.get("corruption.kind") or "none",
            "noise_level": config.get("corruption.level"), "sparsity": config.get("objective.sparsity.kind"),
            "lr": config.get("optimizer.lr"), "seed": config.get("seed"),
            "status": run.get("status", ""), "outcome": outcome or state, "state": state, "epochs": int(epochs),
            "objective": value, **{k: v for k, v in metrics.items() if k != "epoch"},
            "started": run.get("start_time"), "config": config,
        })
    table = pd.DataFrame(rows)
    order = table["number"].fillna(table["started"].rank(method="first")).astype(int)
    return table.assign(number=order).sort_values("number", kind="stable").reset_index(drop=True)


def _tag(run: pd.Series, name: str) -> str | None:
    """A run's tag, or None where it has none (pandas gives NaN)."""
    value = run.get(f"tags.{name}")
    return value if isinstance(value, str) and value else None


def _trial_number(tagged: str | None, name: str) -> float:
    if tagged is not None and tagged.isdigit():
        return float(tagged)
    found = re.search(r"#(\d+)$", name)
    return float(found.group(1)) if found else math.nan


def leaderboard(trials: pd.DataFrame, mode: str) -> pd.DataFrame:
    """Finished trials with an objective, best first, ranked from 1 (`aesearch reproduce --rank K`)."""
    ranked = trials[trials["state"].isin(RANKED_STATES) & trials["objective"].notna()]
    ranked = ranked.sort_values(["objective", "number"], ascending=[mode == "min", True], kind="stable")
    return ranked.reset_index(drop=True).assign(rank=lambda t: t.index + 1)


def best_per_family(board: pd.DataFrame) -> pd.DataFrame:
    """The best trial of each variant family, and how far it is from the overall winner."""
    best = board.groupby("family", sort=False).head(1).copy()
    if best.empty:
        return best
    winner = best["objective"].iloc[0]
    best["vs winner"] = [relative_gap(winner, value) for value in best["objective"]]
    return best.reset_index(drop=True)


def relative_gap(winner: float, other: float) -> float:
    """`other` against the winner, as a signed fraction of the winner's value (0.75: 75% higher)."""
    return (other - winner) / abs(winner) if winner else math.inf


def ranked_metrics(trials: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """The evaluation metrics present in these trials, with their labels and directions."""
    found = {name: how for name, how in RANKED_METRICS.items() if name in trials}
    for name in sorted(c for c in trials.columns if c.startswith(DENOISE_PREFIX)):
        found[name] = (f"denoising PSNR, dB ({name[len(DENOISE_PREFIX):]} noise at the standard level)", "max")
    return found


def best_per_metric(trials: pd.DataFrame) -> pd.DataFrame:
    """For every evaluation metric, the best finished trial on it."""
    finished = trials[trials["state"].isin(RANKED_STATES)]
    rows = []
    for name, (label, better) in ranked_metrics(finished).items():
        values = finished[name].dropna()
        if values.empty:
            continue
        best = finished.loc[values.idxmin() if better == "min" else values.idxmax()]
        rows.append({"metric": name, "what": label, "better": better, "value": best[name],
                     "trial": best["name"], "family": best["family"], "run_id": best["run_id"]})
    return pd.DataFrame(rows, columns=["metric", "what", "better", "value", "trial", "family", "run_id"])


IDENTITY_EXCLUDED = ("seed", "name", "runtime.", "evaluation.")  # fields that do not make a configuration


def seed_summary(trials: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Mean ± std over seeds, for every configuration that was trained with more than one seed."""
    finished = trials[trials["state"].isin(RANKED_STATES)]
    keys = finished["config"].map(
        lambda config: json.dumps({k: v for k, v in config.items() if not k.startswith(IDENTITY_EXCLUDED)}, sort_keys=True)
    )
    rows = []
    for _, group in finished.groupby(keys, sort=False):
        if group["seed"].nunique() < 2:
            continue
        row = {"configuration": group["name"].iloc[0], "family": group["family"].iloc[0],
               "seeds": ", ".join(str(s) for s in sorted(group["seed"].unique())), "trials": len(group)}
        for name in metrics:
            values = group[name].dropna() if name in group else pd.Series(dtype=float)
            row[name] = f"{values.mean():.4g} ± {values.std(ddof=1):.2g}" if len(values) >= 2 else "-"
        rows.append(row)
    return pd.DataFrame(rows)


def asha_summary(trials: pd.DataFrame, search_params: dict[str, str]) -> dict[str, Any]:
    """How early stopping spent the budget: trials stopped at each rung, and the epochs trained
    against training every trial to the full budget."""
    max_epochs = int(float(search_params.get("budget.max_epochs", trials["epochs"].max() or 1)))
    ended = trials[trials["state"].isin(("completed", "stopped", "diverged"))]
    stops = ended[ended["state"] == "stopped"]["epochs"].value_counts().sort_index()
    trained = int(trials["epochs"].sum())
    full = len(trials) * max_epochs
    return {
        "max_epochs": max_epochs,
        "grace_period": search_params.get("budget.grace_period", "?"),
        "reduction_factor": search_params.get("budget.reduction_factor", "?"),
        "stopped_at": {int(epoch): int(count) for epoch, count in stops.items()},
        "completed": int((ended["state"] == "completed").sum()),
        "diverged": int((ended["state"] == "diverged").sum()),
        "epochs_trained": trained,
        "epochs_full_budget": full,
        "saved": 1 - trained / full if full else 0.0,
    }


def importances(board: pd.DataFrame, space: Any, mode: str) -> pd.DataFrame:
    """Hyperparameter importance of the objective by Optuna's evaluators (fANOVA, PED-ANOVA), over
    the leaderboard's trials replayed into an Optuna study through the space's define-by-run
    function. Parameters that exist only under a condition are left out (not in every trial)."""
    import optuna

    from aesearch.search.space import DefineByRun, encode_point

    if space is None or len(board) < 3:
        return pd.DataFrame(columns=["parameter", "fanova", "ped_anova"])
    study = optuna.create_study(direction="minimize" if mode == "min" else "maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    define = DefineByRun(space)
    for _, trial in board.iterrows():
        point = {name: trial["config"].get(parameter.path or name) for name, parameter in space.space.items()}
        study.enqueue_trial(encode_point(space, point))
        asked = study.ask()
        define(asked)
        study.tell(asked, float(trial["objective"]))
    in_every_trial = sorted(set.intersection(*(set(t.params) for t in study.trials)))
    evaluators = {"fanova": optuna.importance.FanovaImportanceEvaluator(seed=0),
                  "ped_anova": optuna.importance.PedAnovaImportanceEvaluator()}
    columns: dict[str, dict[str, float]] = {}
    for label, evaluator in evaluators.items():
        try:
            with warnings.catch_warnings():  # PED-ANOVA warns of thin regions on small searches
                warnings.simplefilter("ignore")
                columns[label] = optuna.importance.get_param_importances(study, evaluator=evaluator, params=in_every_trial)
        except (RuntimeError, ValueError):  # too few trials, or no parameter varies
            columns[label] = {}
    table = pd.DataFrame(columns).rename_axis("parameter").reset_index()
    if table.empty:
        return pd.DataFrame(columns=["parameter", "fanova", "ped_anova"])
    return table.sort_values("fanova" if "fanova" in table else table.columns[1], ascending=False, na_position="last")


def reproduce_command(experiment: str, run_id: str, uri: str) -> str:
    """The command that reproduces a trial; the store is named unless it is the default here."""
    command = f"aesearch reproduce {experiment} --run-id {run_id}"
    return command if uri == resolve_tracking_uri(None) else f"{command} --tracking-uri {uri}"


# --- the report ---------------------------------------------------------------------------------


@dataclass
class Report:
    """Every table and figure of a search's report (pure: made from a SearchRecord)."""

    record: SearchRecord
    trials: pd.DataFrame
    board: pd.DataFrame
    families: pd.DataFrame
    best_metrics: pd.DataFrame
    seeds: pd.DataFrame
    asha: dict[str, Any]
    importance: pd.DataFrame
    figures: dict[str, tuple[str, bytes]]  # file stem -> (caption, PNG)
    not_drawn: dict[str, str]  # caption -> why there is no such figure
    generated: str


SEED_METRICS = ["objective", "test/recon_mse", "test/psnr", "test/probe_accuracy"]


def build_report(record: SearchRecord) -> Report:
    from aesearch import plots

    metric, mode = record.objective
    trials = trial_table(record.runs, metric)
    board = leaderboard(trials, mode)
    importance = importances(board, record.space, mode)
    asha = asha_summary(trials, record.search.get("params", {}))
    drawn, not_drawn = plots.all_figures(board, record.curves, importance, asha, metric, mode)
    figures = {stem: (caption, _png(figure)) for stem, (caption, figure) in drawn.items()}
    return Report(
        record=record, trials=trials, board=board, families=best_per_family(board),
        best_metrics=best_per_metric(trials), seeds=seed_summary(trials, SEED_METRICS), asha=asha,
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
    lines = [f"**{winner['family']}** wins: trial {winner['name']} reaches {metric} = {winner['objective']:.4g} "
             f"({'lower' if mode == 'min' else 'higher'} is better) after {winner['epochs']} epochs."]
    others = report.families[report.families["family"] != winner["family"]]
    if len(others):
        runner = others.iloc[0]
        gap = relative_gap(winner["objective"], runner["objective"])
        lines.append(f"The best other family, {runner['family']} ({runner['name']}), reaches {runner['objective']:.4g}, "
                     f"{100 * abs(gap):.1f}% {'higher' if gap > 0 else 'lower'} than the winner.")
    tested = [f"{RANKED_METRICS[m][0]} {winner[m]:.4g}" for m in ("test/recon_mse", "test/psnr", "test/probe_accuracy",
                                                                  "test/nll") if m in winner and pd.notna(winner[m])]
    if tested:
        lines.append("On the test split: " + "; ".join(tested) + ".")
    lines.append(f"What it is: {winner['architecture']} encoder/decoder, {winner['latent']} latent of "
                 f"{winner['latent_dim']} units, objective {winner['objective_formula'] or '?'}, noise "
                 f"{winner['noise']}{'' if winner['noise'] == 'none' else ' ' + format(winner['noise_level'], 'g')}, "
                 f"lr {winner['lr']:.3g}.")
    importance = report.importance.dropna(subset=["fanova"]) if "fanova" in report.importance else pd.DataFrame()
    if len(importance):
        top = ", ".join(f"{row.parameter} ({row.fanova:.2f})" for row in importance.head(3).itertuples())
        lines.append(f"What mattered most to {metric} (fANOVA importance): {top}.")
    return lines


def status_line(report: Report) -> str:
    record, trials = report.record, report.trials
    states = trials["state"].value_counts()
    counts = ", ".join(f"{n} {state}" for state, n in states.items())
    status = record.search.get("status", "unknown")
    return f"{len(trials)} trials ({counts}); search run {status}"


def is_partial(report: Report) -> bool:
    return report.record.search.get("status") == "RUNNING" or (report.trials["state"] == "running").any()


# --- rendering ------------------------------------------------------------------------------------

BOARD_COLUMNS = ["rank", "name", "family", "outcome", "epochs", "objective", "test/recon_mse", "test/psnr",
                 "test/probe_accuracy", "test/nll", "model/parameters"]


def board_view(report: Report, rows: pd.DataFrame, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """Leaderboard rows as shown: the objective under its own name, the reproduce command last."""
    metric, _ = report.record.objective
    columns = [c for c in BOARD_COLUMNS + list(extra) if c in rows]
    view = rows[columns].rename(columns={"objective": metric, "name": "trial"}).copy()
    view["reproduce"] = [reproduce_command(report.record.experiment, r, report.record.uri) for r in rows["run_id"]]
    return view


def leaderboard_csv(report: Report) -> str:
    """Every trial, ranked ones first: identity, outcome, objective, every metric, the command."""
    metric, _ = report.record.objective
    ranks = dict(zip(report.board["run_id"], report.board["rank"]))
    table = report.trials.drop(columns=["config", "started"]).assign(rank=report.trials["run_id"].map(ranks))
    table = table.sort_values(["rank", "number"], na_position="last", kind="stable")
    table["reproduce"] = [reproduce_command(report.record.experiment, r, report.record.uri) for r in table["run_id"]]
    first = ["rank", "name", "family", "state", "outcome", "epochs", "objective"]
    table = table[first + [c for c in table.columns if c not in first and c != metric]]  # the metric once
    return table.rename(columns={"objective": metric}).to_csv(index=False)


def _format(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "-"
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 1000 else f"{value:.4g}"
    if value is None:
        return "-"
    return str(value)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


def _tables(report: Report) -> list[tuple[str, str, pd.DataFrame]]:
    """(anchor, title, table) in the order the report shows them."""
    metric, mode = report.record.objective
    families = board_view(report, report.families, ("vs winner",))
    if "vs winner" in families:
        families["vs winner"] = [("winner" if i == 0 else f"{100 * g:+.1f}%") for i, g in enumerate(families["vs winner"])]
    best = report.best_metrics.copy()
    best["reproduce"] = [reproduce_command(report.record.experiment, r, report.record.uri) for r in best["run_id"]]
    broken = report.trials[~report.trials["state"].isin(RANKED_STATES)][["name", "family", "state", "outcome", "epochs",
                                                                          "run_id"]]
    tables = [
        ("families", f"Best trial per variant family (on {metric}, {mode})", families),
        ("overall", f"Top {min(10, len(report.board))} trials overall", board_view(report, report.board.head(10))),
        ("metrics", "Best trial on each evaluation metric", best.drop(columns=["run_id"])),
    ]
    if len(report.seeds):
        tables.append(("seeds", "Mean ± std over seeds (configurations trained with several seeds)", report.seeds))
    if len(broken):
        tables.append(("unranked", "Trials not ranked (running, diverged, errored, invalid)", broken))
    if len(report.importance):
        tables.append(("importance", f"Hyperparameter importance for {metric} (Optuna)", report.importance))
    reproductions = reproduction_table(report)
    if len(reproductions):
        tables.append(("reproductions", "Reproductions of trials (aesearch reproduce)", reproductions))
    return tables


def reproduction_table(report: Report) -> pd.DataFrame:
    runs = report.record.reproductions
    if runs.empty:
        return pd.DataFrame()
    names = dict(zip(report.trials["run_id"], report.trials["name"]))
    tag = lambda name: runs.get(f"tags.{name}", pd.Series([""] * len(runs)))  # noqa: E731
    return pd.DataFrame({
        "of trial": [names.get(r, r) for r in tag(REPRODUCES_TAG)],
        "how": tag("mode"), "device": tag("device"), "verdict": tag("verdict"),
        "largest difference": tag("largest_difference"), "run_id": runs["run_id"],
    })


def asha_text(asha: dict[str, Any]) -> str:
    stops = ", ".join(f"{n} at epoch {e}" for e, n in asha["stopped_at"].items()) or "none"
    return (f"ASHA (grace period {asha['grace_period']}, reduction factor {asha['reduction_factor']}, "
            f"at most {asha['max_epochs']} epochs) stopped trials early: {stops}; {asha['completed']} ran to the "
            f"end, {asha['diverged']} diverged. Epochs trained: {asha['epochs_trained']} of "
            f"{asha['epochs_full_budget']} for training every trial fully ({100 * asha['saved']:.0f}% saved).")


def _picture_rows(report: Report) -> list[tuple[str, str, list[tuple[str, bytes]]]]:
    """(kind, title, [(caption, PNG)]) for reconstructions of the top trials and VAE prior samples."""
    images, board = report.record.images, report.board
    recon = [(f"#{r.rank} {r.name}", images[r.run_id]["reconstructions.png"])
             for r in board.head(TOP).itertuples() if "reconstructions.png" in images.get(r.run_id, {})]
    prior = [(f"#{r.rank} {r.name}", images[r.run_id]["prior_samples.png"])
             for r in board.itertuples() if "prior_samples.png" in images.get(r.run_id, {})][:TOP]
    rows = [("reconstructions", "Reconstructions of the top trials (rows: original, model input, reconstruction)", recon)]
    if prior:
        rows.append(("prior", "VAE prior samples: decodes of z ~ N(0, I)", prior))
    return rows


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1400px;color:#1b1b1b;
padding:0 1rem}h1{margin-bottom:.2rem}.meta{color:#555;font-size:.9rem}.banner{background:#fff3cd;border:1px solid
#e0c36c;padding:.6rem 1rem;border-radius:6px}.headline{background:#eef5ff;border-left:4px solid #3b6fd8;padding:.6rem
1rem}table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0 1.5rem}th,td{border:1px solid #ccc;padding:.25rem
.5rem;text-align:left;vertical-align:top;white-space:nowrap}th{background:#f3f3f3}td code{font-size:.75rem;white-space:nowrap}
.scroll{overflow-x:auto}.figures{display:grid;
grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:1rem}figure{margin:0}figure img{max-width:100%;
border:1px solid #ddd}.pictures{display:flex;flex-wrap:wrap;gap:1rem}.pictures img{image-rendering:pixelated;
width:260px;border:1px solid #ddd}
""".replace("\n", "")


def render_html(report: Report) -> str:
    """The report as one self-contained page: figures and pictures embedded as data URIs."""
    record = report.record
    esc = html.escape

    def data_uri(png: bytes) -> str:
        return "data:image/png;base64," + base64.b64encode(png).decode("ascii")

    def table(frame: pd.DataFrame) -> str:
        head = "".join(f"<th>{esc(str(c))}</th>" for c in frame.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{_cell(c, v)}</td>" for c, v in row.items()) + "</tr>" for _, row in frame.iterrows()
        )
        return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"

    def _cell(column: str, value: Any) -> str:
        text = esc(_format(value))
        return f"<code>{text}</code>" if column in ("reproduce", "run_id") else text

    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>aesearch report: {esc(record.experiment)}"
             f"</title><style>{STYLE}</style></head><body>",
             f"<h1>Search <code>{esc(record.experiment)}</code></h1>",
             f"<p class='meta'>{esc(_meta(report))}</p>"]
    if is_partial(report):
        parts.append(f"<p class='banner'>Partial report: the search is still running ({esc(status_line(report))}). "
                     "Run <code>aesearch report</code> again for the rest (if its driver was killed, "
                     "<code>aesearch search ... --resume</code> finishes it).</p>")
    parts.append("<div class='headline'>" + "".join(f"<p>{_bold(esc(line))}</p>" for line in headline(report)) + "</div>")
    if len(report.board):
        command = reproduce_command(record.experiment, report.board.iloc[0]["run_id"], record.uri)
        parts.append(f"<p>Reproduce the winner on this machine: <code>{esc(command)}</code></p>")
    for anchor, title, frame in _tables(report):
        parts.append(f"<h2 id='{anchor}'>{esc(title)}</h2>{table(frame)}")
    parts.append(f"<h2 id='asha'>Early stopping</h2><p>{esc(asha_text(report.asha))}</p>")
    parts.append("<h2 id='figures'>Figures</h2><div class='figures'>")
    for stem, (caption, png) in report.figures.items():
        parts.append(f"<figure id='fig-{stem}'><img alt='{esc(caption)}' src='{data_uri(png)}'>"
                     f"<figcaption>{esc(caption)}</figcaption></figure>")
    parts.append("</div>")
    if report.not_drawn:
        parts.append("<p class='meta'>Not drawn: " + "; ".join(f"{esc(c)} ({esc(w)})" for c, w in report.not_drawn.items())
                     + "</p>")
    for _, title, pictures in _picture_rows(report):
        parts.append(f"<h2>{esc(title)}</h2><div class='pictures'>")
        parts += [f"<figure><img alt='{esc(c)}' src='{data_uri(png)}'><figcaption>{esc(c)}</figcaption></figure>"
                  for c, png in pictures]
        parts.append("</div>")
    parts.append(f"<p class='meta'>Generated by aesearch report on {esc(report.generated)}.</p></body></html>")
    return "\n".join(parts)


def _bold(escaped: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)


def _meta(report: Report) -> str:
    record = report.record
    params, tags = record.search.get("params", {}), record.search.get("tags", {})
    dataset = params.get("dataset", "?")
    return (f"{dataset} (fingerprint {params.get('dataset_fingerprint', '?')}) · {status_line(report)} · objective "
            f"{record.objective[0]} ({record.objective[1]}) · code {tags.get('git_commit', '?')[:12]} · tracking "
            f"{record.uri}")


def render_markdown(report: Report, pictures: dict[Any, str]) -> str:
    """The report in Markdown; `pictures` maps each figure stem, and each (kind, caption) of a
    picture, to its file."""
    record = report.record

    def table(frame: pd.DataFrame) -> str:
        def cell(column: str, value: Any) -> str:
            text = _format(value).replace("|", "\\|")
            return f"`{text}`" if column in ("reproduce", "run_id") else text

        lines = ["| " + " | ".join(str(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
        lines += ["| " + " | ".join(cell(c, v) for c, v in row.items()) + " |" for _, row in frame.iterrows()]
        return "\n".join(lines)

    out = [f"# Search `{record.experiment}`", "", _meta(report), ""]
    if is_partial(report):
        out += [f"> **Partial report**: the search is still running ({status_line(report)}).", ""]
    out += [line + "\n" for line in headline(report)]
    if len(report.board):
        out += [f"Reproduce the winner: `{reproduce_command(record.experiment, report.board.iloc[0]['run_id'], record.uri)}`",
                ""]
    for _, title, frame in _tables(report):
        out += [f"## {title}", "", table(frame), ""]
    out += ["## Early stopping", "", asha_text(report.asha), "", "## Figures", ""]
    for stem, (caption, _) in report.figures.items():
        out += [f"![{caption}]({pictures[stem]})", "", f"*{caption}*", ""]
    if report.not_drawn:
        out += ["Not drawn: " + "; ".join(f"{c} ({w})" for c, w in report.not_drawn.items()), ""]
    for kind, title, shown in _picture_rows(report):
        out += [f"## {title}", "", " ".join(f"![{c}]({pictures[kind, c]})" for c, _ in shown), "",
                " · ".join(c for c, _ in shown), ""]
    return "\n".join(out)


def write_report(report: Report, out: Path) -> Path:
    """Write index.html, report.md, leaderboard.csv, figures/ and images/ into `out`, replacing an
    earlier report there. Written beside it first and swapped in, so a failure leaves the old one."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "index.html").is_file())):
        raise UserError(f"--out {out}: exists and is not an aesearch report folder; choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)
    try:
        pictures: dict[Any, str] = {}
        (staging / "figures").mkdir()
        for stem, (_, png) in report.figures.items():
            (staging / "figures" / f"{stem}.png").write_bytes(png)
            pictures[stem] = f"figures/{stem}.png"
        (staging / "images").mkdir()
        for kind, _, shown in _picture_rows(report):
            for caption, png in shown:
                name = f"images/{_slug(caption)}-{kind}.png"
                (staging / name).write_bytes(png)
                pictures[kind, caption] = name
        (staging / "index.html").write_text(render_html(report), encoding="utf-8")
        (staging / "report.md").write_text(render_markdown(report, pictures), encoding="utf-8")
        (staging / "leaderboard.csv").write_text(leaderboard_csv(report), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def make_report(experiment: str, uri: str, out: Path) -> Report:
    """Read the search from MLflow and write its report into `out`."""
    report = build_report(read_search(uri, experiment))
    write_report(report, out)
    return report

