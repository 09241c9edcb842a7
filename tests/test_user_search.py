"""The user's own data end to end, through the command line: a real Ray search on each source (a CSV
table with labelled anomalies, .npy, .npz, a folder of images with classes and a flat one, all at once
on the Ray instance the tests share; Parquet through `aesearch train`); the found model applied to new
rows (`encode`, `score`) and served by MLflow; bad input refused in one line."""

import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from aesearch.cli import main
from tests.searching import TOGETHER, on_shared_ray, tracking_uri
from tests.test_bad_input import nothing_written, refused
from tests.user_data import wine_table, write_digit_images

pytestmark = pytest.mark.slow  # searches of the user's own data

WINE_SPACE = {
    "name": "wine",
    "data": {"label": "Class", "anomaly": [1]},
    "base": {"optimizer": {"batch_size": 16}, "model": {"hidden_dims": [32]},
             "evaluation": {"iwae_samples": 5, "kmeans_restarts": 1, "denoise_levels": {"swap": 0.2}}},
    "space": {
        "model.architecture": {"type": "categorical", "choices": ["dense", "attention"]},
        "model.embed_dim": {"type": "categorical", "choices": [16], "when": {"model.architecture": "attention"}},
        "model.latent": {"type": "categorical", "choices": ["deterministic", "gaussian"]},
        "objective.reconstruction": {"type": "categorical", "choices": ["mse", "mixed"]},
        "corruption.kind": {"type": "categorical", "choices": ["none", "swap"]},
        "p": {"path": "corruption.level", "type": "float", "low": 0.05, "high": 0.2, "when": {"corruption.kind": "swap"}},
    },
    "start_with": [{"model.architecture": "dense", "model.latent": "deterministic", "objective.reconstruction": "mse",
                    "corruption.kind": "none"}],
    "objective": {"metric": "val/recon_mse", "mode": "min"},
    "budget": {"num_samples": 3, "max_epochs": 12, "grace_period": 12},
    "resources": {"cpu": 1},
    "max_concurrent": 2,
    "seed": 0,
}


def write_search(folder, name, data, **changes):
    space = {**WINE_SPACE, "name": name, "data": data, **changes}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def wine_search_space(folder: Path) -> Path:
    table = folder / "wine.csv"
    wine_table().to_csv(table, index=False)
    return write_search(folder, "wine", {"path": str(table), **WINE_SPACE["data"]})


@pytest.fixture(scope="module")
def searches_at_once(together):
    """The module's searches: on wine.csv, on a folder of images with classes, on each other source. Each
    is a search of its own (its data, storage and embedded store), run with the other modules' searches
    at the same time on the Ray instance the tests share (tests.searching.TOGETHER, added at the end of
    this module): name -> (folder, finished process)."""
    return {name: together[name] for name in ("wine", "folder", *OTHER_SOURCES)}


@pytest.fixture(scope="module")
def wine_search(searches_at_once):
    """A real Ray search of 3 trials on wine.csv (anomalies labelled), logged to an embedded store."""
    folder, done = searches_at_once["wine"]
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, tracking_uri(folder / "results"), done


def test_a_search_on_a_csv_table_measures_anomaly_detection_and_records_the_dataset(wine_search):
    folder, uri, done = wine_search
    store = MlflowClient(uri)
    experiment = store.get_experiment_by_name("wine")
    runs = store.search_runs([experiment.experiment_id])
    trials = [r for r in runs if r.data.tags.get("aesearch.role") == "trial"]
    search = next(r for r in runs if r.data.tags.get("aesearch.role") == "search")
    assert len(trials) == 3
    header = next(line for line in done.stdout.splitlines() if line.lstrip().startswith("trial"))
    assert "test/anomaly_auroc" in header and "test/psnr" not in header  # the board shows what the data has
    board = pd.read_csv(folder / "results" / "wine" / "leaderboard.csv")
    assert board["test/anomaly_auroc"].notna().all()
    for trial in trials:
        metrics = trial.data.metrics
        assert 0 <= metrics["test/anomaly_auroc"] <= 1 and 0 <= metrics["test/anomaly_ap"] <= 1
        assert "test/recon_mse_original" in metrics and "test/denoise_mse_swap" in metrics
        assert "test/psnr" not in metrics  # real-valued data: no PSNR
        dataset = trial.inputs.dataset_inputs[0].dataset
        assert dataset.name == "wine.csv" and dataset.digest == trial.data.tags["dataset_fingerprint"]
        assert json.loads(dataset.source)["uri"] == str(folder / "wine.csv")
        assert "region" in [column["name"] for column in json.loads(dataset.schema)["mlflow_colspec"]]
    assert search.inputs.dataset_inputs[0].dataset.digest == trials[0].data.tags["dataset_fingerprint"]
    pictures = {f.path for f in store.list_artifacts(trials[0].info.run_id, "images")}
    assert {"images/latent.png", "images/feature_errors.png", "images/anomaly_scores.png", "images/roc.png"} <= pictures
    assert "images/reconstructions.png" not in pictures
    # the best trial separates the held-out cultivar from the normal ones
    best = max(trials, key=lambda r: r.data.metrics["test/anomaly_auroc"])
    assert best.data.metrics["test/anomaly_auroc"] > 0.8


def test_the_found_model_scores_and_encodes_new_rows(wine_search, monkeypatch, capsys):
    folder, uri, _ = wine_search
    monkeypatch.chdir(folder)
    table = wine_table()
    table.drop(columns=["Class"]).to_csv(folder / "new.csv", index=False)
    assert main(["score", "wine", "--input", "new.csv", "--out", "scores.csv", "--tracking-uri", uri]) == 0
    scores = pd.read_csv(folder / "scores.csv")
    assert len(scores) == len(table)
    assert {"score", "error_alcohol", "error_region"} <= set(scores.columns)
    # each row named by its row number (no id column, no label in new.csv); is_anomaly at the threshold
    # chosen on the trial's own validation split (re-read, its fingerprint the trial's), as stated
    assert scores["row"].tolist() == list(range(len(table))) and "Class" not in scores.columns
    stated = json.loads((folder / "scores.csv.json").read_text())
    assert stated["rule"] == "f1" and scores["is_anomaly"].tolist() == (scores["score"] > stated["threshold"]).tolist()
    numeric = [c for c in scores.columns if c.startswith("error_") and c != "error_region"]
    assert np.allclose(scores[numeric].mean(axis=1) * len(numeric) / (len(numeric) + 2), scores["score"], rtol=0.5)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(table["Class"], scores["score"]) > 0.8  # anomalous rows score higher
    assert main(["encode", "wine", "--input", "new.csv", "--out", "codes.npy", "--tracking-uri", uri]) == 0
    codes = np.load(folder / "codes.npy")
    assert codes.shape == (len(table), 16)


def test_the_registered_model_takes_raw_rows_and_is_served_over_http(wine_search, ray_env):
    """`mlflow models serve` (a real HTTP server on 127.0.0.1, in this environment) answers posted raw
    rows — original units, categories as text — with scores, codes and reconstructions: the scaler
    and the one-hot encoding travel inside the registered model."""
    import os
    import signal
    import socket
    import subprocess
    import time
    import urllib.request

    folder, uri, _ = wine_search
    rows = wine_table().drop(columns=["Class"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/wine/1", "-h", "127.0.0.1",
               "-p", str(port), "--env-manager", "local"]
    path = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"  # its uvicorn, as `uv run` gives
    server = subprocess.Popen(command, env={**ray_env, "MLFLOW_TRACKING_URI": uri, "PATH": path}, cwd=folder,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-3000:]
                assert time.time() < deadline, "mlflow models serve did not answer in 120 s"
                time.sleep(1)
        body = json.dumps({"dataframe_split": json.loads(rows.to_json(orient="split", index=False))}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            predictions = pd.DataFrame(json.loads(answer.read())["predictions"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert len(predictions) == len(rows)
    assert {"score", "z0", "error_alcohol", "recon_alcohol", "recon_region"} <= set(predictions.columns)
    assert set(predictions["recon_region"]) <= {"north", "south"}
    # reconstructions in original units: close to the rows themselves, not to their standardised values
    assert abs(predictions["recon_proline"].mean() - rows["proline"].mean()) < 0.3 * rows["proline"].std()
    # the same scores as `aesearch score` gives for the best trial
    from aesearch.api import score

    scored = score("wine", str(folder / "wine.csv"), tracking_uri=uri)
    assert np.allclose(predictions["score"], scored["score"], rtol=1e-4)


def test_new_rows_that_do_not_match_are_refused_and_nothing_is_written(wine_search, monkeypatch, capsys):
    folder, uri, _ = wine_search
    work = folder / "refusals"
    work.mkdir()
    monkeypatch.chdir(work)
    wine_table().drop(columns=["ash"]).to_csv("fewer.csv", index=False)
    line = refused(capsys, ["score", "wine", "--input", "fewer.csv", "--out", "s.csv", "--tracking-uri", uri])
    assert "fewer.csv: no column 'ash', which the data was trained with" in line
    (work / "taken.csv").write_text("mine\n")
    line = refused(capsys, ["encode", "wine", "--input", "fewer.csv", "--out", "taken.csv", "--tracking-uri", uri])
    assert "--out taken.csv: exists" in line and (work / "taken.csv").read_text() == "mine\n"
    line = refused(capsys, ["score", "wine", "--input", "fewer.csv", "--out", "s.txt", "--tracking-uri", uri])
    assert "--out s.txt: the format comes from the suffix" in line
    nothing_written(work, "fewer.csv", "taken.csv")


def test_the_report_of_a_table_search_shows_its_anomaly_scores_and_column_errors(wine_search, tmp_path, capsys):
    _, uri, _ = wine_search
    assert main(["report", "wine", "--tracking-uri", uri, "--out", str(tmp_path / "report")]) == 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "wine.csv (fingerprint" in markdown and "| test/anomaly_ap |" in markdown
    assert "## Anomaly scores of normal and anomalous test inputs" in markdown
    assert "## Reconstruction error per column" in markdown and "Reconstructions of the top" not in markdown
    assert len(list((tmp_path / "report" / "images").glob("*-anomalies.png"))) == 3


def test_a_reproduction_of_a_trial_on_user_data_matches(wine_search, capsys):
    folder, uri, _ = wine_search
    code = main(["reproduce", "wine", "--from-checkpoint", "--tracking-uri", uri])
    out = capsys.readouterr().out
    assert code == 0 and "REPRODUCED: every value within tolerance" in out, out
    assert "test/anomaly_auroc" in out and "test/recon_mse_original" in out  # the user data's own metrics, compared


def test_a_search_on_a_folder_of_images_with_classes(searches_at_once):
    folder, done = searches_at_once["folder"]
    assert done.returncode == 0, done.stderr[-3000:]
    store = MlflowClient(tracking_uri(folder / "results"))
    experiment = store.get_experiment_by_name("folder")
    trials = [r for r in store.search_runs([experiment.experiment_id]) if r.data.tags.get("aesearch.role") == "trial"]
    assert len(trials) == 2
    for trial in trials:
        assert {"test/knn_accuracy", "test/cluster_ari", "test/psnr"} <= set(trial.data.metrics)


def write_sources(folder):
    """The same kind of data in each of the other formats."""
    rng = np.random.default_rng(0)
    table = wine_table()
    table.to_parquet(folder / "wine.parquet")
    x = rng.normal(size=(120, 5)).astype(np.float32) @ rng.normal(size=(5, 12)).astype(np.float32)
    np.save(folder / "vectors.npy", x)
    np.savez(folder / "labelled.npz", x=x, y=np.repeat(["a", "b", "c"], 40))
    write_digit_images(folder / "flat", per_class=15, classes=(3, 4), flat=True)


SOURCES = [
    ({"path": "wine.parquet", "label": "Class", "anomaly": [1]}, True),
    ({"path": "vectors.npy"}, False),
    ({"path": "labelled.npz", "anomaly": ["c"]}, True),
    ({"path": "flat", "channels": 1}, False),
]


OTHER_SOURCES = dict(zip(["npy", "npz", "flat-folder"], SOURCES[1:]))


def folder_search(folder: Path) -> Path:
    """A search on a folder of images with classes (3 digits)."""
    write_digit_images(folder / "images", per_class=30, classes=(0, 1, 7))
    return write_search(folder, "folder", {"path": str(folder / "images"), "image_size": 8},
                        base={"optimizer": {"batch_size": 16}, "evaluation": {"iwae_samples": 5, "kmeans_restarts": 1}},
                        space={"model.architecture": {"type": "categorical", "choices": ["dense", "conv"]},
                               "model.latent_dim": {"type": "categorical", "choices": [4, 8]}},
                        start_with=[], budget={"num_samples": 2, "max_epochs": 2, "grace_period": 2})


def source_search(folder: Path, source: str) -> Path:
    """A search of one trial on one of the other sources."""
    write_sources(folder)
    data = {**OTHER_SOURCES[source][0], "path": str(folder / OTHER_SOURCES[source][0]["path"])}
    return write_search(folder, "source", data,
                        base={"model": {"hidden_dims": [16], "latent_dim": 4}, "optimizer": {"batch_size": 32},
                              "evaluation": {"iwae_samples": 5, "kmeans_restarts": 1}},
                        space={"optimizer.lr": {"type": "float", "low": 0.001, "high": 0.003, "log": True}},
                        start_with=[], budget={"num_samples": 1, "max_epochs": 2, "grace_period": 2})


TOGETHER["wine"] = on_shared_ray(wine_search_space)
TOGETHER["folder"] = on_shared_ray(folder_search)
TOGETHER |= {source: on_shared_ray(partial(source_search, source=source)) for source in OTHER_SOURCES}


@pytest.mark.parametrize("source", OTHER_SOURCES)
def test_a_search_on_each_other_source(source, searches_at_once):
    """(Parquet reads into the very tensors CSV does, a test of the loaders shows: `aesearch train`
    covers it below, the CSV search above covers its path through Ray.)"""
    data, labelled = OTHER_SOURCES[source]
    folder, done = searches_at_once[source]
    assert done.returncode == 0, done.stderr[-3000:]
    data = {**data, "path": str(folder / data["path"])}
    store = MlflowClient(tracking_uri(folder / "results"))
    experiment = store.get_experiment_by_name("source")
    (trial,) = [r for r in store.search_runs([experiment.experiment_id]) if r.data.tags.get("aesearch.role") == "trial"]
    metrics = trial.data.metrics
    assert "test/recon_mse" in metrics and trial.data.tags["dataset"] == data["path"].rsplit("/", 1)[-1]
    assert ("test/cluster_ari" in metrics) == labelled
    assert ("test/anomaly_auroc" in metrics) == ("anomaly" in data)
    assert trial.inputs.dataset_inputs[0].dataset.digest == trial.data.tags["dataset_fingerprint"]


def test_train_on_a_parquet_table(tmp_path, monkeypatch, capsys):
    write_sources(tmp_path)
    monkeypatch.chdir(tmp_path)
    config = {"data": SOURCES[0][0], "epochs": 2, "model": {"hidden_dims": [16], "latent_dim": 4},
              "evaluation": {"iwae_samples": 5, "kmeans_restarts": 1}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "config.yaml", "--out", "run"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dataset"] == "wine.parquet" and "test/anomaly_auroc" in summary
    assert {"latent.png", "feature_errors.png", "anomaly_scores.png", "roc.png"} <= {
        p.name for p in (tmp_path / "run").glob("*.png")}


@pytest.mark.parametrize("change, expected", [
    ({"model": {"architecture": "conv"}}, "model.architecture='conv' takes images (channels x height x width); "
                                          "wine.csv is a vector of 15 features: use 'dense' or 'attention'"),
    ({"objective": {"reconstruction": "bce"}}, "objective.reconstruction='bce' needs values in [0, 1], but wine.csv"),
    ({"corruption": {"kind": "salt_pepper", "level": 0.1}}, "corruption.kind='salt_pepper'"),
])
def test_a_config_that_does_not_fit_the_data_is_refused_before_anything_is_written(change, expected, tmp_path,
                                                                                  monkeypatch, capsys):
    wine_table().to_csv(tmp_path / "wine.csv", index=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": {"path": "wine.csv", "label": "Class"}, **change}))
    line = refused(capsys, ["train", "config.yaml", "--out", "run"])
    assert expected in line
    nothing_written(tmp_path, "wine.csv", "config.yaml")


def test_a_search_space_that_does_not_fit_the_data_is_refused_before_ray_starts(tmp_path, monkeypatch, capsys):
    wine_table().to_csv(tmp_path / "wine.csv", index=False)
    monkeypatch.chdir(tmp_path)
    space = write_search(tmp_path, "unfit", {"path": "wine.csv", "label": "Class"},
                         space={"model.architecture": {"type": "categorical", "choices": ["dense", "conv"]}}, start_with=[])
    line = refused(capsys, ["search", str(space), "--storage", "results", "--tracking-uri", "sqlite:///m.db"])
    assert "is not a valid config: model.architecture='conv' takes images" in line
    nothing_written(tmp_path, "wine.csv", "unfit.yaml")


def test_example_writes_the_files_its_search_space_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["example", "wine"]) == 0
    assert main(["example", "digits-images"]) == 0
    from aesearch.parts.data import load_data
    from aesearch.search.space import load_space

    wine = load_data(load_space("wine_anomaly").data)
    assert wine.spec.anomalies == ("1",) and (wine.test_y == 1).any() and (wine.train_y == 0).all()
    images = load_data(load_space("digits_images").data)
    assert images.spec.shape == (1, 8, 8) and len(images.spec.classes) == 10
