"""Reproducing trials: the comparison rules, then real reproductions of the shared search's trials
(retrained and from their checkpoints), and a search on MNIST that is reported while it runs
and whose best trial is refused against changed data files."""

import gzip
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import ViewType

from aesearch.cli import main
from aesearch.locations import sqlite_uri
from aesearch.results.reproduce import OTHER_DEVICE_TYPE, SAME_DEVICE_TYPE, compare
from tests.searching import search_command, wait_until

# --- the comparison -------------------------------------------------------------------------------


def test_equal_values_reproduce_and_each_kind_of_metric_has_its_own_tolerance():
    recorded = {"test/recon_mse": 0.0100, "val/recon_mse (epoch 3)": 0.02, "test/probe_accuracy": 0.900,
                "model/parameters": 5000.0, "best/epoch": 7.0, "time/train_seconds": 3.0, "test/nll": math.nan}
    assert compare(recorded, dict(recorded), SAME_DEVICE_TYPE)["ok"].all()
    moved = {**recorded, "test/recon_mse": 0.0102, "val/recon_mse (epoch 3)": 0.02001, "test/probe_accuracy": 0.905,
             "best/epoch": 8.0, "time/train_seconds": 300.0}
    table = compare(recorded, moved, SAME_DEVICE_TYPE).set_index("metric")
    assert not table.loc["test/recon_mse", "ok"]  # 2% relative > 0.1%
    assert table.loc["test/recon_mse", "difference"] == pytest.approx(0.0002 / 0.0102)
    assert table.loc["val/recon_mse (epoch 3)", "ok"]  # 0.05% relative
    assert table.loc["test/probe_accuracy", "ok"]  # a score: 0.005 absolute <= 0.01
    assert table.loc["best/epoch", "ok"]  # a count: one epoch apart
    assert "time/train_seconds" not in table.index  # wall-clock time is not a result
    assert table.loc["test/nll", "ok"]  # NaN on both sides
    assert compare(recorded, moved, OTHER_DEVICE_TYPE)["ok"].all()  # across device types: 5%
    assert not compare(recorded, {**recorded, "model/parameters": 5001.0}, OTHER_DEVICE_TYPE).set_index("metric").loc[
        "model/parameters", "ok"]
    assert not compare(recorded, {**recorded, "test/probe_accuracy": 0.93}, SAME_DEVICE_TYPE)["ok"].all()
    assert not compare({"test/psnr": 20.0}, {"test/psnr": math.nan}, OTHER_DEVICE_TYPE)["ok"].any()


# --- the shared small search ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(small_search):
    experiment, _ = small_search
    return sqlite_uri(experiment.parent.parent / "mlflow.db")


def reproduce_command(store: str, *extra: str, experiment: str = "small") -> list[str]:
    return [sys.executable, "-m", "aesearch.cli", "reproduce", experiment, "--tracking-uri", store, *extra]


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def trial_runs(store: str, experiment: str = "small"):
    client = MlflowClient(store)
    found = client.get_experiment_by_name(experiment)
    return client, client.search_runs([found.experiment_id], filter_string="tags.`aesearch.role` = 'trial'",
                                      run_view_type=ViewType.ALL)


@pytest.mark.usefixtures("mnist_search")  # started here: its start overlaps the reproductions up to the MNIST tests
def test_the_best_trial_retrains_to_the_same_numbers_and_the_reproduction_is_logged(small_search, store, tmp_path):
    board = pd.read_csv(small_search[0] / "leaderboard.csv", dtype={"trial": str})
    done = subprocess.run(reproduce_command(store, "--out", str(tmp_path / "again")), capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = last_json(done.stdout)
    assert summary["reproduced"] and "REPRODUCED" in done.stdout
    assert summary["run_id"] == board.loc[0, "mlflow_run_id"]  # --rank 1 by default: the search's best
    assert summary["compared"] > 20 and "test/recon_mse" in summary["metrics"]
    for name, (recorded, reproduced) in summary["metrics"].items():  # same machine, same threads: equal
        assert reproduced == pytest.approx(recorded, rel=1e-6, abs=1e-9), name
    assert {"best.pt", "result.json", "config.yaml", "metrics.jsonl"} <= {p.name for p in (tmp_path / "again").iterdir()}

    client = MlflowClient(store)
    run = client.get_run(summary["reproduction_run_id"])
    assert run.data.tags["aesearch.role"] == "reproduction"
    assert run.data.tags["aesearch.reproduces"] == run.data.tags["mlflow.parentRunId"] == summary["run_id"]
    assert run.data.tags["verdict"] == "reproduced" and run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"comparison.csv", "config.yaml", "checkpoints", "images"} <= artifacts
    original = client.get_run(summary["run_id"])
    assert run.data.params == original.data.params | {"runtime.device": "cpu"}
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/recon_mse")] == [1, 2, 3]


def reproduce_here(capsys, store: str, *extra: str, experiment: str = "small") -> tuple[int, str, str]:
    """`aesearch reproduce` in this process (its imports are warm): (exit status, stdout, stderr)."""
    threads = torch.get_num_threads()
    code = main(["reproduce", experiment, "--tracking-uri", store, *extra])
    assert torch.get_num_threads() == threads  # the trial's thread count was set for the reproduction only
    out, err = capsys.readouterr()
    return code, out, err


def test_a_stored_checkpoint_evaluates_to_what_its_trial_logged(store, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = reproduce_here(capsys, store, "--from-checkpoint")
    assert code == 0, out[-2000:] + err[-2000:]
    summary = last_json(out)
    assert summary["mode"].startswith("evaluated the best checkpoint")
    assert {"test/recon_mse", "test/psnr", "test/denoise_psnr_gaussian"} <= set(summary["metrics"])
    for name, (recorded, reproduced) in summary["metrics"].items():
        assert reproduced == pytest.approx(recorded, rel=1e-6, abs=1e-9), name
    assert list(tmp_path.iterdir()) == []  # evaluating writes no run folder


def test_a_stopped_trial_retrains_as_far_as_it_went(store, tmp_path, capsys):
    _, runs = trial_runs(store)
    stopped = next(r for r in runs if r.data.tags["outcome"].startswith("stopped early"))
    epochs = int(stopped.data.metrics["epoch"])
    code, out, err = reproduce_here(capsys, store, "--run-id", stopped.info.run_id, "--out", str(tmp_path / "s"))
    assert code == 0, out[-2000:] + err[-2000:]
    summary = last_json(out)
    assert summary["mode"] == f"retrained {epochs} epochs"
    lines = (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == epochs


def test_what_cannot_be_reproduced_is_refused_in_one_line(store, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, runs = trial_runs(store)
    diverged = next(r for r in runs if r.data.tags["outcome"].startswith("diverged"))
    cases = [
        (["--rank", "99"], "--rank 99: experiment 'small' has"),
        (["--run-id", "0" * 32], "not a trial run of experiment 'small'"),
        (["--run-id", diverged.info.run_id], "ended as 'diverged at epoch"),
        (["--epochs", "0"], "--epochs 0: trial"),
        (["--rank", "1", "--run-id", diverged.info.run_id], "not allowed with argument"),
    ]
    for extra, message in cases:
        assert main(["reproduce", "small", "--tracking-uri", store, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err
    assert main(["reproduce", "small", "--tracking-uri", sqlite_uri(tmp_path / "none.db")]) == 2
    assert list(tmp_path.iterdir()) == []


# --- a search on MNIST: a partial report while it runs, a changed dataset afterwards ---------------------

MNIST_SPACE = """
name: mnist-small
data: {name: mnist, max_train_samples: 512}
base:
  model: {hidden_dims: [64]}
  optimizer: {batch_size: 64}
  evaluation: {kmeans_restarts: 1, probe_max_samples: 512}
space:
  model.latent_dim: {type: categorical, choices: [8, 16]}
  optimizer.lr: {type: float, low: 0.0003, high: 0.003, log: true}
objective: {metric: val/recon_mse, mode: min}
budget: {num_samples: 3, max_epochs: 4, grace_period: 4, reduction_factor: 2}
resources: {cpu: 1}
max_concurrent: 1
seed: 0
"""


@pytest.fixture(scope="module")
def mnist_search(tmp_path_factory, ray_env, ray_address, mnist_dir):
    """A search on MNIST started in the background: (process, store, folder)."""
    folder = tmp_path_factory.mktemp("mnist-search")
    space = folder / "mnist.yaml"
    space.write_text(MNIST_SPACE)
    command = search_command(space, folder / "results", "--data-dir", str(mnist_dir), "--address", ray_address)
    with open(folder / "search.log", "w") as log:
        process = subprocess.Popen(command, env=ray_env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    yield process, sqlite_uri(folder / "mlflow.db"), folder
    try:
        process.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


FINISHED_TRIALS = """
    SELECT count(*) FROM runs JOIN experiments USING (experiment_id) JOIN tags ON tags.run_uuid = runs.run_uuid
    WHERE experiments.name = ? AND runs.status = 'FINISHED' AND tags.key = 'aesearch.role' AND tags.value = 'trial'
"""


def test_a_report_of_a_search_that_is_still_running_is_partial(mnist_search, tmp_path, capsys):
    process, store, folder = mnist_search

    def first_trial_done():
        # Read-only SQL, not an MlflowClient: a client opened while the search is still creating the store
        # would run MLflow's migrations concurrently with the search's own and break them.
        database = folder / "mlflow.db"
        if not database.exists():
            return False
        try:
            with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
                return connection.execute(FINISHED_TRIALS, ("mnist-small",)).fetchone()[0] > 0
        except sqlite3.OperationalError:  # the tables are not there yet, or the file is locked for a write
            return False

    wait_until(first_trial_done, "a first finished trial", process)
    assert process.poll() is None, "the search ended before the report could be made while it runs"
    assert main(["report", "mnist-small", "--tracking-uri", store, "--out", str(tmp_path / "partial")]) == 0
    assert "partial: the search is still running" in capsys.readouterr().err
    page = (tmp_path / "partial" / "index.html").read_text()
    assert "Partial report" in page
    board = pd.read_csv(tmp_path / "partial" / "leaderboard.csv")
    assert 1 <= board["rank"].notna().sum() < 3


def changed_copy(mnist_dir: Path, into: Path) -> Path:
    """The MNIST files uncompressed (as torchvision reads them), one test pixel altered."""
    raw = into / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for archive in (mnist_dir / "MNIST" / "raw").glob("*.gz"):
        content = bytearray(gzip.decompress(archive.read_bytes()))
        if archive.name.startswith("t10k-images"):
            content[16 + 5000] ^= 0xFF  # past the 16-byte header: one pixel of the test set
        (raw / archive.name.removesuffix(".gz")).write_bytes(bytes(content))
    return into


def test_a_changed_dataset_is_refused_and_the_same_one_reproduces(mnist_search, mnist_dir, tmp_path, capsys):
    process, store, folder = mnist_search
    assert process.wait(timeout=300) == 0, (folder / "search.log").read_text()[-3000:]
    client, before = trial_runs(store, "mnist-small")
    every_run = lambda: client.search_runs([before[0].info.experiment_id], run_view_type=ViewType.ALL)  # noqa: E731
    count = len(every_run())
    changed = changed_copy(mnist_dir, tmp_path / "changed")
    code, out, err = reproduce_here(capsys, store, "--data-dir", str(changed), "--out", str(tmp_path / "r"),
                                    experiment="mnist-small")
    assert code == 2, out + err
    assert len(err.strip().splitlines()) == 1
    assert "fingerprint" in err and "changed" in err
    assert not (tmp_path / "r").exists() and len(every_run()) == count  # nothing written, nothing logged

    code, out, err = reproduce_here(capsys, store, "--data-dir", str(mnist_dir), "--out", str(tmp_path / "r"),
                                    experiment="mnist-small")
    assert code == 0, out[-2000:] + err[-2000:]
    assert last_json(out)["reproduced"] and len(every_run()) == count + 1
