"""Searches for a use, through the command line on a real Ray instance: a multi-objective search (the
`compression` use: reconstruction against code size) with its Pareto front in the leaderboard, the
MLflow tags, the registry and the report; a detection search ranked on a metric measured on validation
every epoch; objectives the data cannot measure refused before anything is written."""

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from aesearch.cli import main
from aesearch.pareto import nondominated_ranks
from tests.searching import TOGETHER, on_shared_ray, tracking_uri
from tests.test_bad_input import nothing_written, refused
from tests.user_data import wine_table

pytestmark = pytest.mark.slow  # searches of each use

SMALL = {"model": {"hidden_dims": [32]}, "optimizer": {"batch_size": 64},
         "evaluation": {"iwae_samples": 5, "kmeans_restarts": 1}}


def write(folder, document):
    path = folder / f"{document['name']}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def compression_space(folder):
    """`use: compression` on digits: 10 trials, two objectives, MO-ASHA stopping at epochs 1 and 2."""
    return write(folder, {
        "name": "squeeze", "data": {"name": "digits"}, "use": "compression", "base": SMALL,
        "space": {"model.latent_dim": {"type": "int", "low": 2, "high": 32, "log": True},
                  "optimizer.lr": {"type": "float", "low": 0.0003, "high": 0.01, "log": True}},
        "budget": {"num_samples": 10, "max_epochs": 4, "grace_period": 1, "reduction_factor": 2},
        "max_concurrent": 2, "seed": 0})


def detection_space(folder):
    """Anomaly detection on digits, ranked on validation AUROC, stopped trials told to Optuna as pruned."""
    return write(folder, {
        "name": "spot", "data": {"name": "digits", "anomaly": [0]}, "use": "anomaly_detection", "base": SMALL,
        "space": {"model.latent_dim": {"type": "categorical", "choices": [2, 8]},
                  "corruption.kind": {"type": "categorical", "choices": ["none", "masking"]},
                  "p": {"path": "corruption.level", "type": "float", "low": 0.1, "high": 0.3,
                        "when": {"corruption.kind": "masking"}}},
        "budget": {"num_samples": 6, "max_epochs": 3, "grace_period": 1, "reduction_factor": 2},
        "max_concurrent": 2, "stopped_trials": "pruned"})


# The module's two searches, run with the other modules' searches at the same time on the Ray instance
# the tests share (one's start overlaps the others' trials).
TOGETHER["compression"] = on_shared_ray(compression_space)
TOGETHER["detection"] = on_shared_ray(detection_space)


@pytest.fixture(scope="module")
def compression_search(together):
    folder, done = together["compression"]
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, tracking_uri(folder / "results"), done


def test_a_multi_objective_search_ranks_completed_trials_by_pareto_rank(compression_search):
    folder, _, done = compression_search
    board = pd.read_csv(folder / "results" / "squeeze" / "leaderboard.csv")
    ranked = board[board["rank"].notna()]
    assert len(ranked) >= 3 and (ranked["state"] == "completed").all()  # stopped trials never reach the front
    assert board.loc[board["state"] == "stopped", "rank"].isna().all()
    assert (board["state"] == "stopped").any(), "MO-ASHA stopped no trial: the test shows nothing about it"
    # the front is exactly the completed trials no other completed trial dominates
    points = ranked[["val/recon_mse", "model/latent_dim"]].to_numpy()
    dominated = [any((other <= point).all() and (other < point).any() for other in points) for point in points]
    assert (ranked["pareto_rank"] == 1).tolist() == [not d for d in dominated]
    assert ranked["pareto_rank"].is_monotonic_increasing and ranked["rank"].tolist() == list(range(1, len(ranked) + 1))
    front = ranked[ranked["pareto_rank"] == 1]
    assert front["val/recon_mse"].is_monotonic_increasing  # within the front: by the first objective
    assert (nondominated_ranks(points, ["min", "min"]) == ranked["pareto_rank"].to_numpy()).all()
    assert "Pareto rank on val/recon_mse min, model/latent_dim min" in done.stdout


def test_stopped_trials_are_marked_in_what_optuna_learnt(compression_search):
    folder, _, _ = compression_search
    experiment = folder / "results" / "squeeze"
    board = pd.read_csv(experiment / "leaderboard.csv")
    state = pickle.loads(next(experiment.glob("searcher-state-*.pkl")).read_bytes())
    study = state["_ot_study"]
    assert study.directions[0].name == "MINIMIZE" and len(study.directions) == 2  # MO-TPE on both objectives
    marked = sorted(t.user_attrs["stopped_at_epoch"] for t in study.trials if "stopped_at_epoch" in t.user_attrs)
    assert marked == sorted(board.loc[board["state"] == "stopped", "epochs"].astype(int).tolist())
    assert all(0 < epoch < 4 for epoch in marked)


def test_the_front_is_tagged_in_mlflow_and_the_champion_is_an_alias(compression_search):
    folder, uri, _ = compression_search
    board = pd.read_csv(folder / "results" / "squeeze" / "leaderboard.csv")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("squeeze")
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id],
                                                          filter_string="tags.`aesearch.role` = 'trial'")}
    for row in board.itertuples():
        tags = runs[row.mlflow_run_id].data.tags
        on_front = row.pareto_rank == 1
        assert tags["pareto_front"] == ("true" if on_front else "false")
        assert tags["rank"] == (str(int(row.rank)) if pd.notna(row.rank) else "unranked")
    champion = client.get_model_version_by_alias("squeeze", "champion")
    assert champion.tags["trial_id"] == board.iloc[0]["trial"] and champion.current_stage in (None, "None")
    assert set(champion.tags["pareto_front"].split(", ")) == set(board.loc[board["pareto_rank"] == 1, "trial"])


def test_the_report_shows_the_front_with_each_objectives_direction(compression_search, tmp_path, monkeypatch):
    _, uri, _ = compression_search
    monkeypatch.chdir(tmp_path)
    assert main(["report", "squeeze", "--tracking-uri", uri]) == 0
    page = (tmp_path / "reports" / "squeeze" / "report.md").read_text()
    assert "## Pareto front on val/recon_mse (lower is better), model/latent_dim (lower is better)" in page
    assert "## Best trial on each objective" in page
    assert (tmp_path / "reports" / "squeeze" / "figures" / "objectives_front.png").stat().st_size > 1000


def test_any_front_member_reproduces_by_its_run_id(compression_search, capsys):
    folder, uri, _ = compression_search
    board = pd.read_csv(folder / "results" / "squeeze" / "leaderboard.csv")
    front = board[board["pareto_rank"] == 1]
    smallest = front.loc[front["model/latent_dim"].idxmin()]  # the front's other end from the champion
    if len(front) > 1:
        assert smallest["rank"] > 1
    assert main(["reproduce", "squeeze", "--tracking-uri", uri, "--run-id", smallest["mlflow_run_id"]]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["reproduced"] and summary["run_id"] == smallest["mlflow_run_id"]
    for name in ("best/val/recon_mse", "test/recon_mse"):  # retrained to the same numbers
        recorded, reproduced = summary["metrics"][name]
        assert reproduced == pytest.approx(recorded, rel=1e-6), name
    assert summary["metrics"]["best/val/recon_mse"][0] == pytest.approx(smallest["val/recon_mse"], rel=1e-6)


def test_a_detection_search_ranks_on_auroc_measured_every_epoch(together):
    """Also: with `stopped_trials: pruned` Optuna is told the trials ASHA stopped as PRUNED, at their
    last epoch's value (which TPE ranks below every completed trial)."""
    folder, done = together["detection"]
    assert done.returncode == 0, done.stderr[-3000:]
    board = pd.read_csv(folder / "results" / "spot" / "leaderboard.csv")
    assert board["val/anomaly_auroc"].is_monotonic_decreasing and board["val/anomaly_auroc"].between(0, 1).all()
    client = MlflowClient(tracking_uri(folder / "results"))
    for row in board.itertuples():
        history = client.get_metric_history(row.mlflow_run_id, "val/anomaly_auroc")
        assert sorted(m.step for m in history) == list(range(1, row.epochs + 1))
        if row.state == "completed":  # the epoch kept: the best AUROC's
            best = client.get_run(row.mlflow_run_id).data.metrics["best/val/anomaly_auroc"]
            assert best == pytest.approx(max(m.value for m in history))
    search_run = client.search_runs([client.get_experiment_by_name("spot").experiment_id],
                                    filter_string="tags.`aesearch.role` = 'search'")[0]
    assert search_run.data.params["objectives"] == "val/anomaly_auroc max"
    experiment = folder / "results" / "spot"
    study = pickle.loads(next(experiment.glob("searcher-state-*.pkl")).read_bytes())["_ot_study"]
    stopped = board[board["state"] == "stopped"]
    assert len(stopped), "ASHA stopped no trial: nothing shows how Optuna was told"
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert sorted(t.user_attrs["stopped_at_epoch"] for t in pruned) == sorted(stopped["epochs"].astype(int))
    assert sorted(t.value for t in pruned) == pytest.approx(sorted(stopped["val/anomaly_auroc"]))
    assert all(t.state.name == "COMPLETE" for t in study.trials if t not in pruned)


def test_an_objective_the_data_cannot_measure_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    table = tmp_path / "wine.csv"
    wine_table().drop(columns=["Class"]).to_csv(table, index=False)  # no labels
    space = write(tmp_path, {"name": "blind", "data": {"path": str(table)}, "use": "clustering", "base": SMALL,
                             "budget": {"num_samples": 2, "max_epochs": 1}})
    line = refused(capsys, ["search", str(space), "--storage", str(tmp_path / "results")])
    assert line.startswith("aesearch: error: objective[0].metric='val/cluster_ari': val/cluster_ari needs class labels")
    nothing_written(tmp_path, "wine.csv", "blind.yaml")
    generation = write(tmp_path, {"name": "dreams", "data": {"name": "digits"}, "base": SMALL,
                                  "objective": [{"metric": "val/nll"}, {"metric": "val/nll", "mode": "min"}],
                                  "space": {"model.latent_dim": {"type": "categorical", "choices": [2]}}})
    line = refused(capsys, ["search", str(generation), "--storage", str(tmp_path / "results")])
    assert "objective[1].metric='val/nll': listed twice" in line
    nothing_written(tmp_path, "wine.csv", "blind.yaml", "dreams.yaml")
    np.testing.assert_equal(sorted(p.name for p in tmp_path.iterdir()), ["blind.yaml", "dreams.yaml", "wine.csv"])
