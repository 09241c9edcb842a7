"""Reading a search from MLflow: the only part of the report that talks to the tracking store.

It turns a search into a `SearchRecord`: the runs as `mlflow.search_runs` gives them (a
DataFrame), the search run's params and tags, the space it was launched with, the objective per
epoch and the pictures of its top trials, and the reproductions of its trials.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from aesearch.errors import UserError
from aesearch.results.tables import leaderboard, trial_table
from aesearch.tracking.runs import ROLE_TAG
from aesearch.tracking.store import check_store_exists, client, fluent_api_on, misplaced_artifacts_note

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
        """The first objective (the only one, in a single-objective search): (metric, mode)."""
        return self.objectives[0]

    @property
    def objectives(self) -> list[tuple[str, str]]:
        return search_objectives(self.search)

    @cached_property
    def trials(self) -> pd.DataFrame:
        """One row per trial run (`trial_table`), made once: ~1 ms a run."""
        return trial_table(self.runs, self.objective[0])


def search_objectives(search: dict[str, Any]) -> list[tuple[str, str]]:
    """[(metric, mode)] the search ranked its trials on, from its run's params (`objectives`: 'val/recon_mse
    min, model/latent_dim min'; searches before several objectives logged `objective.metric` alone)."""
    params = search.get("params", {})
    listed = [tuple(item.split()) for item in params.get("objectives", "").split(",") if item.strip()]
    return listed or [(params.get("objective.metric", "val/recon_mse"), params.get("objective.mode", "min"))]


def read_search(uri: str, experiment: str, top: int = TOP) -> SearchRecord:
    """The search's runs (`mlflow.search_runs` as pandas) and, for its top trials, the objective
    per epoch and their pictures."""
    experiment_id, search, runs = read_trials(uri, experiment)  # first: it checks that the store exists
    store = client(uri)
    record = SearchRecord(experiment, uri, search, _launched_space(store, search), runs,
                          reproductions=runs_of(uri, experiment_id, "reproduction"))
    metric, _ = record.objective
    board = leaderboard(record.trials, record.objectives)
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
    note = misplaced_artifacts_note(found)
    if note is not None:
        print(f"aesearch: note: {note}", file=sys.stderr)
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


FIGURES = ("feature_errors.png", "anomaly_scores.png")  # a trial's final figures the report shows, where drawn


def _pictures(store, run_ids: list[str], vae_run_ids: list[str]) -> dict[str, dict[str, bytes]]:
    """Final reconstructions (else the latest drawn during training), for VAEs prior samples, and for
    tables and labelled anomalies the per-column errors and the anomaly scores (FIGURES)."""
    pictures: dict[str, dict[str, bytes]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for run_id in dict.fromkeys(run_ids + vae_run_ids):
            names = {a.path for a in store.list_artifacts(run_id, "images")}
            drawn = sorted(a.path for a in store.list_artifacts(run_id, "images/reconstructions"))
            wanted = {"reconstructions.png": "images/reconstructions.png" if "images/reconstructions.png" in names
                      else (drawn[-1] if drawn else None)}
            if run_id in vae_run_ids:
                wanted["prior_samples.png"] = "images/prior_samples.png" if "images/prior_samples.png" in names else None
            wanted |= {name: f"images/{name}" for name in FIGURES if f"images/{name}" in names}
            for name, path in wanted.items():
                if path is not None:
                    local = store.download_artifacts(run_id, path, f"{folder}/{run_id}")
                    pictures.setdefault(run_id, {})[name] = Path(local).read_bytes()
    return pictures
