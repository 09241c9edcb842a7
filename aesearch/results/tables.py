"""The report's tables: pure functions of a search's runs (no MLflow, no rendering)."""

from __future__ import annotations

import json
import math
import re
import warnings
from typing import Any

import numpy as np
import pandas as pd

from aesearch.metrics import DIRECTIONS, ranked_metrics
from aesearch.search.leaderboard import best_of_each_family, rank
from aesearch.tracking.outcomes import RANKED, Outcome
from aesearch.tracking.runs import TRIAL_NUMBER_TAG
from aesearch.tracking.store import resolve_tracking_uri


def parse_param(text: Any) -> Any:
    """An MLflow param (always text) back to its config value: '16' -> 16, '[256, 128]' -> [256, 128]."""
    if not isinstance(text, str):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return {"True": True, "False": False, "None": None}.get(text, text)


RUN_STATUS_STATES = {"RUNNING": "running", "SCHEDULED": "running", "KILLED": "killed", "FAILED": "errored"}


def run_outcome(run: dict[str, Any]) -> tuple[str, str, int | None]:
    """(state, words, epoch) of a trial run (a row of `mlflow.search_runs`, as a dict): its outcome
    tags, else (a run still going, or killed before the search closed it) what its MLflow status says."""
    ended = Outcome.from_tags({name[len("tags."):]: value for name, value in run.items() if name.startswith("tags.")})
    if ended is None:
        state = RUN_STATUS_STATES.get(run.get("status", ""), "unknown")
        return state, state, None
    return ended.kind, ended.words(), ended.epoch


def trial_table(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per trial run: what it was (family, shape, key parameters), how it ended, its
    objective and every metric it logged (latest values, named as logged)."""
    rows = []
    params = [name for name in runs.columns if name.startswith("params.")]
    logged = [name for name in runs.columns if name.startswith("metrics.")]
    for run in runs.to_dict("records"):  # dicts, not iterrows' Series: a tenth of the time on 10,000 runs
        config = {k[len("params."):]: parse_param(run[k]) for k in params}
        metrics = {k[len("metrics."):]: run[k] for k in logged if pd.notna(run[k])}
        state, outcome, ended_at = run_outcome(run)
        epochs = metrics.get("epoch", ended_at or 0)
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
            "anomaly_score": config.get("evaluation.anomaly_score") or "reconstruction",
            "clustering": clustering_stage(config),
            "status": run.get("status", ""), "outcome": outcome, "state": state, "epochs": int(epochs),
            "objective": value, **{k: v for k, v in metrics.items() if k != "epoch"},
            "started": run.get("start_time"), "config": config,
        })
    table = pd.DataFrame(rows)
    order = table["number"].fillna(table["started"].rank(method="first")).astype(int)
    return table.assign(number=order).sort_values("number", kind="stable").reset_index(drop=True)


def clustering_stage(config: dict[str, Any]) -> str:
    """A trial's clustering stage in a word or two: 'kmeans', 'umap_gmm + idec'."""
    refinement = config.get("clustering.refinement") or "none"
    clusterer = config.get("clustering.clusterer") or "kmeans"
    return clusterer if refinement == "none" else f"{clusterer} + {refinement}"


def _tag(run: dict[str, Any], name: str) -> str | None:
    """A run's tag, or None where it has none (pandas gives NaN)."""
    value = run.get(f"tags.{name}")
    return value if isinstance(value, str) and value else None


def _trial_number(tagged: str | None, name: str) -> float:
    if tagged is not None and tagged.isdigit():
        return float(tagged)
    found = re.search(r"#(\d+)$", name)
    return float(found.group(1)) if found else math.nan


def leaderboard(trials: pd.DataFrame, objectives: list[tuple[str, str]]) -> pd.DataFrame:
    """Finished trials with an objective, best first, ranked from 1 (`aesearch reproduce --rank K`); with
    several objectives, completed trials by Pareto rank (`pareto_rank`), then the first objective."""
    if len(objectives) == 1:  # the objective under its metric's name: ties are judged at its resolution
        (metric, mode), = objectives
        board = rank(trials.assign(**{metric: trials.get("objective", math.nan)}), [metric], [mode], tiebreak="number")
    else:
        metrics, modes = [m for m, _ in objectives], [mode for _, mode in objectives]
        having = trials.assign(**{m: trials.get(m, math.nan) for m in metrics})
        board = rank(having, metrics, modes, tiebreak="number")
    return board[board["rank"].notna()].astype({"rank": int})


def pareto_front_table(board: pd.DataFrame, objectives: list[tuple[str, str]]) -> pd.DataFrame:
    """The trials on the Pareto front of a multi-objective search (empty for one objective), in the
    order of the first objective."""
    if "pareto_rank" not in board:
        return board.iloc[:0]
    return board[board["pareto_rank"] == 1].sort_values(objectives[0][0], ascending=DIRECTIONS[objectives[0][1]].ascending,
                                                         kind="stable").reset_index(drop=True)


def best_per_objective(board: pd.DataFrame, objectives: list[tuple[str, str]]) -> pd.DataFrame:
    """For each objective of a multi-objective search, the ranked trial best on it (always a front member)."""
    if len(objectives) == 1 or board.empty:
        return board.iloc[:0]
    rows = []
    for metric, mode in objectives:
        values = board[metric]
        best = board.loc[(values * DIRECTIONS[mode].sign).idxmin()]
        rows.append({"objective": metric, "better": DIRECTIONS[mode].better, "value": best[metric],
                     "trial": best["name"], "family": best["family"], "rank": best["rank"], "run_id": best["run_id"]})
    return pd.DataFrame(rows)


def best_per_family(board: pd.DataFrame) -> pd.DataFrame:
    """The best trial of each variant family, and how far it is from the overall winner."""
    best = best_of_each_family(board).copy()
    if best.empty:
        return best
    winner = best["objective"].iloc[0]
    best["vs winner"] = [relative_gap(winner, value) for value in best["objective"]]
    return best.reset_index(drop=True)


def relative_gap(winner: float, other: float) -> float:
    """`other` against the winner, as a signed fraction of the winner's value (0.75: 75% higher)."""
    return (other - winner) / abs(winner) if winner else math.inf


def best_per_metric(trials: pd.DataFrame) -> pd.DataFrame:
    """For every evaluation metric, the best finished trial on it."""
    finished = trials[trials["state"].isin(RANKED)]
    rows = []
    for name, metric in ranked_metrics(list(finished.columns)).items():
        label, better = metric.description, metric.mode
        values = finished[name].dropna()
        if values.empty:
            continue
        best = finished.loc[(values * metric.direction.sign).idxmin()]
        rows.append({"metric": name, "what": label, "better": better, "value": best[name],
                     "trial": best["name"], "family": best["family"], "run_id": best["run_id"]})
    return pd.DataFrame(rows, columns=["metric", "what", "better", "value", "trial", "family", "run_id"])


IDENTITY_EXCLUDED = ("seed", "name", "runtime.", "evaluation.")  # fields that do not make a configuration


def seed_summary(trials: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Mean ± std over seeds, for every configuration that was trained with more than one seed."""
    finished = trials[trials["state"].isin(RANKED)]
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
        "brackets": search_params.get("budget.brackets", "1"),  # searches before brackets had one
        "stopped_at": {int(epoch): int(count) for epoch, count in stops.items()},
        "completed": int((ended["state"] == "completed").sum()),
        "diverged": int((ended["state"] == "diverged").sum()),
        "epochs_trained": trained,
        "epochs_full_budget": full,
        "saved": 1 - trained / full if full else 0.0,
    }


IMPORTANCE_TRIALS = 1000  # fANOVA's forest grows with the trials: 71 s of a report's 105 s at 2,000 here
# fANOVA's trees (Optuna's default 64): 32 over 1,000 trials take 7.5 s here against 20 s, and give the
# same importances within 0.01 (0.905 / 0.095 against 0.899 / 0.101 on the 2,000-trial search of
# benchmarks/README.md); 64 over 500 trials are as fast and 0.10 off.
FANOVA_TREES = 32


def importances(board: pd.DataFrame, space: Any, mode: str) -> pd.DataFrame:
    """Hyperparameter importance of the objective by Optuna's evaluators (fANOVA, PED-ANOVA), over
    the leaderboard's trials replayed into an Optuna study through the space's define-by-run
    function (beyond `IMPORTANCE_TRIALS`, a seeded random sample of them: `attrs["over"]` says so).
    Parameters that exist only under a condition are left out (not in every trial).
    Where there is none, the empty table says why in `attrs["why"]`: on an objective every trial
    shares (a saturated AUROC), Optuna would split the importance evenly, which reads as a finding."""
    import optuna

    from aesearch.search.space import DefineByRun, encode_point
    from aesearch.search.strategies import quiet_optuna

    none = pd.DataFrame(columns=["parameter", "fanova", "ped_anova"])
    if space is None or len(board) < 3:
        none.attrs["why"] = "fewer than three finished trials, or no search space recorded"
        return none
    if board["objective"].nunique() < 2:
        none.attrs["why"] = "the objective did not vary; no importance"
        return none
    over = f"a random {IMPORTANCE_TRIALS:,} of the {len(board):,} trials" if len(board) > IMPORTANCE_TRIALS else ""
    if over:
        board = board.sample(IMPORTANCE_TRIALS, random_state=0)
    quiet_optuna()
    study = optuna.create_study(direction=DIRECTIONS[mode].optuna,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    define = DefineByRun(space)
    for _, trial in board.iterrows():
        point = {name: trial["config"].get(parameter.path or name) for name, parameter in space.space.items()}
        study.enqueue_trial(encode_point(space, point))
        asked = study.ask()
        define(asked)
        study.tell(asked, float(trial["objective"]))
    in_every_trial = sorted(set.intersection(*(set(t.params) for t in study.trials)))
    evaluators = {"fanova": optuna.importance.FanovaImportanceEvaluator(n_trees=FANOVA_TREES, seed=0),
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
        none.attrs["why"] = "too few trials, or no parameter varied"
        return none
    table = table.sort_values("fanova" if "fanova" in table else table.columns[1], ascending=False, na_position="last")
    table.attrs["over"] = over
    return table


def reproduce_command(experiment: str, run_id: str, uri: str) -> str:
    """The command that reproduces a trial; the store is named unless it is the default here."""
    command = f"aesearch reproduce {experiment} --run-id {run_id}"
    return command if uri == resolve_tracking_uri(None) else f"{command} --tracking-uri {uri}"
