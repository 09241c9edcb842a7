"""MLflow tracking against real stores: the embedded SQLite store of the shared small search, and
MLflow's UI in headless Chromium. (A real `mlflow server` over HTTP, artifacts proxied and basic auth
on, is tests/test_cluster.py's.)

Servers bind to 127.0.0.1 and are stopped through their own process group.
"""

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from aesearch.errors import UserError
from aesearch.locations import sqlite_uri
from aesearch.schema import flatten
from aesearch.tracking.runs import TrialRun, image_epochs, run_name
from aesearch.tracking.store import fluent_api_on, resolve_tracking_uri
from tests.browser import open_page
from tests.conftest import KEPT_CHECKPOINTS, make_config
from tests.searching import search_command, trial_reports, write_space

# --- where, and names ---------------------------------------------------------------------------


def test_epochs_wait_for_their_batch_and_a_restored_trial_logs_what_its_checkpoint_holds_and_the_run_lacks(
        tmp_path, digits):
    """budget.tracking_batch_s: a trial's epochs go to MLflow several in one request; whatever waits is
    sent when the trial ends, and epochs a dead process never sent come from the restored checkpoint."""
    client = MlflowClient(sqlite_uri(tmp_path / "mlflow.db"))
    run_id = client.create_run(client.create_experiment("batched")).info.run_id
    config = make_config(epochs=9)
    requests = []
    original = client.log_batch
    client.log_batch = lambda *args, **kwargs: requests.append(kwargs["metrics"]) or original(*args, **kwargs)
    history = [{"val/recon_mse": 1.0 / epoch, "epoch": float(epoch)} for epoch in range(1, 10)]

    def steps() -> list[int]:
        return [m.step for m in client.get_metric_history(run_id, "val/recon_mse")]

    batched = TrialRun(client, run_id, config, digits, batch_s=3600)
    for epoch, metrics in enumerate(history[:5], 1):
        batched.log_metrics(metrics, epoch)
    assert steps() == [] and requests == []  # all five wait for their batch
    assert batched.wait_for_server() == ""  # the trial ends (completed, stopped, diverged): all is sent
    assert steps() == [1, 2, 3, 4, 5] and len(requests) == 1 and len(requests[0]) == 10
    # the process died with epochs 6-7 unsent; the restored trial's checkpoint holds 7 epochs
    restored = TrialRun(client, run_id, config, digits, logged_through=5, attempt=2)
    restored.catch_up(history[:7])
    assert restored.wait_for_server() == "" and steps() == [1, 2, 3, 4, 5, 6, 7]
    at_once = len(requests)
    restored.log_metrics(history[7], 8)  # batch_s 0: each epoch at once
    assert steps() == [1, 2, 3, 4, 5, 6, 7, 8] and len(requests) == at_once + 1


def test_a_trial_run_is_closed_with_its_gaps_read_from_the_store_only_where_the_trial_could_not_say(tmp_path):
    """close_trial: a trial that said every record arrived ('') is closed without reading its epochs back
    (one read less per trial, at thousands of trials); one that could not say (stopped by ASHA, errored)
    has its epochs read, and the missing ones named; a run found by its trial id when none is given."""
    from mlflow.entities import Metric

    from aesearch.tracking.outcomes import Outcome
    from aesearch.tracking.runs import TRIAL_ID_TAG
    from aesearch.tracking.search_run import SearchRun
    from aesearch.tracking.store import Tracking

    uri = sqlite_uri(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    experiment = client.create_experiment("closing")
    parent = client.create_run(experiment).info.run_id
    runs = SearchRun(uri, "closing", Tracking(uri, experiment, parent, patience_s=0))

    def trial_run(trial_id: str, epochs: int) -> str:
        run_id = client.create_run(experiment, tags={"mlflow.parentRunId": parent, TRIAL_ID_TAG: trial_id}).info.run_id
        client.log_batch(run_id, metrics=[Metric("epoch", e, 0, e) for e in range(1, epochs + 1)])
        return run_id

    reads = []
    original = runs.client.get_metric_history
    runs.client.get_metric_history = lambda *args: reads.append(args) or original(*args)
    said, stopped, errored = trial_run("a", 2), trial_run("b", 2), trial_run("c", 1)
    runs.close_trial("a", Outcome("completed"), said, epochs=3, undelivered="")  # the trial: all arrived
    runs.close_trial("b", Outcome("stopped", 3), stopped, epochs=3)  # ASHA stopped it: it could not say
    runs.close_trial("c", Outcome("errored"), None)  # errored before its first report: found by its trial id
    assert reads == [(stopped, "epoch"), (errored, "epoch")]
    tags = {run_id: client.get_run(run_id).data.tags for run_id in (said, stopped, errored)}
    assert "tracking" not in tags[said] and tags[stopped]["tracking"] == "incomplete: no metrics for epoch(s) 3"
    assert [client.get_run(r).info.status for r in (said, stopped, errored)] == ["FINISHED", "FINISHED", "FAILED"]
    assert tags[errored]["aesearch.outcome"] == "errored" and "tracking" not in tags[errored]


def test_a_trial_closes_its_own_run_once_all_arrived_and_the_driver_removes_checkpoints_without_reading(
        tmp_path, digits):
    """The driver does two requests less for each trial that completes or diverges (the trial closes its
    own run, only once every record arrived), and removes a trial's checkpoints where the trial said its
    artifacts are, reading nothing first (at thousands of trials, these were most of the driver's requests)."""
    from aesearch.tracking.outcomes import Outcome
    from aesearch.tracking.search_run import SearchRun
    from aesearch.tracking.store import Tracking

    uri = sqlite_uri(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    experiment = client.create_experiment("own")
    tracking = Tracking(uri, experiment, client.create_run(experiment).info.run_id, patience_s=0)
    run = TrialRun.for_trial(tracking, "t1", "1", make_config(epochs=2), digits, "node")
    assert run.artifact_uri == client.get_run(run.run_id).info.artifact_uri
    assert not run.close(Outcome("completed"), undelivered="metrics of step 2")  # left to the driver
    assert client.get_run(run.run_id).info.status == "RUNNING"
    assert run.close(Outcome("diverged", 2), undelivered="")
    closed = client.get_run(run.run_id)
    assert closed.info.status == "FINISHED" and "tracking" not in closed.data.tags
    assert Outcome.from_tags(closed.data.tags) == Outcome("diverged", 2)

    (tmp_path / "best.pt").write_bytes(b"weights")
    client.log_artifact(run.run_id, str(tmp_path / "best.pt"), "checkpoints")
    runs = SearchRun(uri, "own", tracking)
    reads = []
    for name in ("get_run", "list_artifacts"):
        original = getattr(runs.client, name)
        setattr(runs.client, name, lambda *args, original=original, name=name: reads.append(name) or original(*args))
    runs.remove_checkpoints(run.run_id, run.artifact_uri)
    runs.remove_checkpoints(run.run_id, run.artifact_uri)  # once more: nothing there, nothing raised
    assert reads == [] and client.list_artifacts(run.run_id, "checkpoints") == []
    assert client.get_run(run.run_id).data.tags["checkpoints"].startswith("removed: not among the search's best")


def test_the_store_is_the_flag_else_the_environment_else_sqlite_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5999"
    assert resolve_tracking_uri("sqlite:///elsewhere.db") == f"sqlite:///{tmp_path / 'elsewhere.db'}"  # absolute


def test_credentials_in_the_uri_are_refused_without_repeating_them(tmp_path, capsys):
    from aesearch.cli import main

    space = write_space(tmp_path, "creds", trials=1, epochs=1, grace=1)
    code = main(["search", str(space), "--storage", str(tmp_path / "results"),
                 "--tracking-uri", "http://alice:s3cret@127.0.0.1:5000"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--tracking-uri" in err and "MLFLOW_TRACKING_PASSWORD" in err and "s3cret" not in err
    assert not (tmp_path / "results").exists()
    with pytest.raises(UserError, match="unsupported scheme"):
        resolve_tracking_uri("ftp://127.0.0.1/store")


def test_a_tracking_server_that_does_not_answer_fails_in_seconds_with_one_line(tmp_path, capsys):
    from aesearch.cli import main

    space = write_space(tmp_path, "nobody", trials=1, epochs=1, grace=1)
    started = time.monotonic()
    code = main(["search", str(space), "--storage", str(tmp_path / "results"),
                 "--tracking-uri", f"http://127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no MLflow tracking server answers" in err
    assert time.monotonic() - started < 30 and not (tmp_path / "results").exists()


def test_run_names_say_what_the_variant_is():
    vae = make_config(model={"latent": "gaussian", "latent_dim": 16}, objective={"kl": {"beta": 2.0}})
    denoising = make_config(model={"architecture": "conv", "latent_dim": 8},
                            corruption={"kind": "gaussian", "level": 0.3})
    assert run_name(vae, "17") == "beta_vae-dense-z16-b2-#17"
    odd_beta = make_config(model={"latent": "gaussian", "latent_dim": 4}, objective={"kl": {"beta": 1.0559412}})
    assert run_name(odd_beta, "8") == "beta_vae-dense-z4-b1.06-#8"
    assert run_name(denoising, "4") == "denoising-conv-z8-gaussian0.3-#4"
    assert run_name(make_config(model={"architecture": "conv", "latent_dim": 8}), "1") == "conv-z8-#1"


def test_reconstructions_are_drawn_at_a_few_epochs_only():
    assert image_epochs(1) == set()
    assert image_epochs(8) == {1, 2, 4, 6}
    assert len(image_epochs(1000)) == 4


# --- the embedded store, after the shared small search -------------------------------------------


def child_runs(client: MlflowClient, experiment_id: str) -> list:
    return client.search_runs([experiment_id], filter_string="tags.`aesearch.role` = 'trial'", max_results=1000)


@pytest.fixture(scope="module")
def tracked(small_search):
    experiment, _ = small_search
    client = MlflowClient(sqlite_uri(experiment.parent.parent / "mlflow.db"))
    found = client.get_experiment_by_name("small")
    assert found is not None, "the search made no experiment named after it"
    board = pd.read_csv(experiment / "leaderboard.csv", dtype={"trial": str})
    return client, found, child_runs(client, found.experiment_id), board


def test_every_tune_trial_has_exactly_one_run_with_its_outcome_and_a_terminal_status(tracked, small_search):
    client, experiment, runs, board = tracked
    assert "mlflow:  experiment 'small' in sqlite:///" in small_search[1].stdout  # where to look, said at the end
    by_trial = {run.data.tags["aesearch.trial_id"]: run for run in runs}
    assert len(runs) == len(by_trial) == len(board) == 8
    assert set(by_trial) == set(board["trial"])
    for _, row in board.iterrows():
        run = by_trial[row["trial"]]
        assert run.info.status == "FINISHED", (row["trial"], run.info.status)
        assert run.data.tags["outcome"] == row["outcome"]
    assert len({run.info.run_name for run in runs}) == 8  # readable and unique
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def search_run(client: MlflowClient, trial_run):
    return client.get_run(trial_run.data.tags["mlflow.parentRunId"])


def test_runs_hold_the_resolved_config_under_the_same_param_names(tracked, tmp_path):
    client, _, runs, _ = tracked
    names = {frozenset(run.data.params) for run in runs}
    assert len(names) == 1, "param names differ between variants"
    for run in runs[:3]:
        config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text())
        assert run.data.params == {k: "null" if v is None else str(v) for k, v in flatten(config).items()}
        for tag in ("family", "architecture", "latent", "noise", "objective", "node", "device"):
            assert run.data.tags[tag]
        # what a reproduction must match: the data, and how the arithmetic ran
        assert run.data.tags["dataset_fingerprint"] == search_run(client, run).data.params["dataset_fingerprint"]
        assert run.data.tags["device"].startswith("cpu:") and run.data.tags["torch_threads"] == "1"  # 1 CPU a trial
        assert run.info.run_name.endswith(f"-#{run.data.tags['aesearch.trial_number']}")
        assert run.data.tags["latent"] == config["model"]["latent"]


def test_each_epoch_is_logged_once_with_the_epoch_as_step(tracked, small_search):
    client, _, runs, _ = tracked
    reports = trial_reports(small_search[0])
    for run in runs:
        trial = run.data.tags["aesearch.trial_id"]
        tune_values = {int(r["epoch"]): r["val/recon_mse"] for r in reports[trial] if "train/loss" in r}
        history = client.get_metric_history(run.info.run_id, "val/recon_mse")
        assert sorted(m.step for m in history) == sorted(tune_values)
        for metric in history:
            assert metric.value == pytest.approx(tune_values[metric.step], rel=1e-6)
    completed = [run for run in runs if run.data.tags["outcome"] == "completed"]
    assert completed and all("test/recon_mse" in run.data.metrics and "time/epoch_seconds" in run.data.metrics
                             for run in completed)
    vaes = [run for run in completed if run.data.tags["latent"] == "gaussian"]
    assert all("beta" in run.data.metrics for run in vaes)


def png_shape(path: str) -> tuple:
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path).shape


def test_images_are_real_pngs(tracked):
    client, _, runs, _ = tracked
    completed = [run for run in runs if run.data.tags["outcome"] == "completed"]
    for run in completed:
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
        assert {"images/reconstructions.png", "images/latent.png", "images/reconstructions"} <= artifacts
        if run.data.tags["latent"] == "gaussian":
            assert "images/prior_samples.png" in artifacts
        grid = png_shape(client.download_artifacts(run.info.run_id, "images/reconstructions.png"))
        assert grid[0] > grid[1] / 8  # three rows of 8x8 digits: original | corrupted | reconstruction
        epochs = client.list_artifacts(run.info.run_id, "images/reconstructions")
        assert [a.path.rsplit("/", 1)[1] for a in epochs] == ["epoch_0001.png", "epoch_0002.png"]
        png_shape(client.download_artifacts(run.info.run_id, "images/latent.png"))


def test_the_best_checkpoint_reloads_and_reproduces_its_logged_test_metric(tracked, tmp_path):
    client, _, runs, board = tracked
    best = next(run for run in runs if run.data.tags["aesearch.trial_id"] == board.loc[0, "trial"])
    path = client.download_artifacts(best.info.run_id, "checkpoints/best.pt", str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "aesearch.cli", "evaluate", path],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout)
    assert measured["test/recon_mse"] == pytest.approx(best.data.metrics["test/recon_mse"], rel=1e-5)
    finite = board[board["val/recon_mse"].map(math.isfinite)]
    best = set(finite["trial"][:KEPT_CHECKPOINTS])
    removed = 0
    for run in runs:  # the best trials' checkpoints, and only theirs, stay (budget.keep_checkpoints)
        kept = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
        if run.data.tags["aesearch.trial_id"] in best:
            assert kept == ["checkpoints/best.pt"]  # a trial ASHA stopped between epochs too
        else:
            assert kept == [] and run.data.tags["checkpoints"].startswith("removed")
            removed += run.data.tags["aesearch.trial_id"] in set(finite["trial"])
    assert removed == len(finite) - KEPT_CHECKPOINTS > 0


def test_the_search_run_describes_the_search_and_registers_the_best_model(tracked, digits):
    import mlflow

    client, experiment, runs, board = tracked
    parent = client.search_runs([experiment.experiment_id], filter_string="tags.`aesearch.role` = 'search'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    search = parent[0]
    assert all(run.data.tags["mlflow.parentRunId"] == search.info.run_id for run in runs)
    assert search.data.params["seed"] == "0" and search.data.params["dataset"] == "digits"
    assert search.data.params["data.binarize"] == "none"  # the protocol the likelihoods were trained under
    assert len(search.data.params["dataset_fingerprint"]) >= 8
    assert search.data.tags["cluster.nodes"] == "1" and search.data.tags["version.torch"]
    assert search.data.tags["git_commit"] != ""
    artifacts = {a.path for a in client.list_artifacts(search.info.run_id)}
    assert {"space.yaml", "leaderboard.csv"} <= artifacts
    assert search.data.metrics["best/test/recon_mse"] == pytest.approx(board.loc[0, "test/recon_mse"], rel=1e-4)

    versions = client.search_model_versions("name='small'")
    assert len(versions) == 1
    with fluent_api_on(client._tracking_client.tracking_uri):
        model = mlflow.pyfunc.load_model(f"models:/small/{versions[0].version}")
    images = digits.test_x[:5].numpy()
    served = model.predict(images)  # raw images in: scores, codes, reconstructions out
    reconstructions = served["reconstruction"]
    assert reconstructions.shape == images.shape and served["score"].shape == (5,)
    assert served["score"] == pytest.approx(((reconstructions - images) ** 2).reshape(5, -1).mean(1), rel=1e-4)
    assert ((reconstructions >= 0) & (reconstructions <= 1)).all()
    assert float(((reconstructions - images) ** 2).mean()) == pytest.approx(board.loc[0, "test/recon_mse"], abs=0.05)


def test_a_second_search_of_the_same_name_in_one_store_is_refused_before_anything_starts(small_search, tmp_path):
    experiment, _ = small_search
    space = write_space(tmp_path, "small", trials=1, epochs=1, grace=1)
    command = search_command(space, tmp_path / "elsewhere")
    command[command.index("--tracking-uri") + 1] = sqlite_uri(experiment.parent.parent / "mlflow.db")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--name small" in done.stderr and "already holds an experiment" in done.stderr
    assert not (tmp_path / "elsewhere").exists()


def test_the_ui_refuses_a_store_that_does_not_exist(tmp_path, capsys):
    from aesearch.cli import main

    assert main(["ui", "--tracking-uri", sqlite_uri(tmp_path / "none.db")]) == 2
    assert "no such store yet" in capsys.readouterr().err and not (tmp_path / "none.db").exists()
    assert main(["ui", "--port", "70000"]) == 2


def test_the_ui_refuses_a_port_in_use_in_one_line(tmp_path, capsys):
    """MLflow's server on a busy port prints uvicorn's error and exits 0."""
    from aesearch.cli import main

    store = sqlite_uri(tmp_path / "mlflow.db")
    MlflowClient(store).create_experiment("shown")
    capsys.readouterr()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--tracking-uri", store, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"--port {port}" in err and "in use" in err, err


# --- a real tracking server over HTTP ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited with status {process.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout} s")


def serve(command: list[str], port: int, log: Path):
    """Start a server in a process group of its own; stop the group afterwards."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as output:
        process = subprocess.Popen(command, env=env, cwd=log.parent, start_new_session=True,
                                   stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", process)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# --- `aesearch ui`, the process -----------------------------------------------------------------------


def running() -> dict[int, int]:
    """Every process that runs here (zombies, which their parent has yet to reap, do not): pid -> parent."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            state, parent = stat.read_text().rpartition(")")[2].split()[:2]
            if state != "Z":
                table[int(stat.parent.name)] = int(parent)
    return table


def descendants(pid: int) -> set[int]:
    table, below, frontier = running(), set(), {pid}
    while frontier:
        frontier = {child for child, parent in table.items() if parent in frontier} - below
        below |= frontier
    return below


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a listener refuses it; TIME_WAIT does not
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.slow  # starts MLflow's server
def test_the_ui_stopped_by_its_pid_leaves_no_process_and_no_port_behind(tmp_path):
    """Ctrl-C or `kill PID` of `aesearch ui` stops MLflow's server and its uvicorn worker with it, and
    the ui's output has none of MLflow's hints for flags `aesearch ui` does not have. One UI per signal,
    started at the same time (each takes seconds to come up)."""
    uis, servers = {}, {}
    for stop in (signal.SIGTERM, signal.SIGINT):
        folder = tmp_path / stop.name
        folder.mkdir()
        store = sqlite_uri(folder / "mlflow.db")
        MlflowClient(store).create_experiment("shown")
        port, log = free_port(), folder / "ui.log"
        command = [sys.executable, "-m", "aesearch.cli", "ui", "--tracking-uri", store, "--port", str(port)]
        with open(log, "w") as output:
            uis[stop] = (subprocess.Popen(command, cwd=folder, stdout=output, stderr=subprocess.STDOUT), port, log)
    try:
        for stop, (ui, port, _) in uis.items():
            wait_for(f"http://127.0.0.1:{port}/health", ui)
            servers[stop] = descendants(ui.pid)
            assert len(servers[stop]) >= 2, "mlflow server and its uvicorn worker"
        for stop, (ui, port, log) in uis.items():
            os.kill(ui.pid, stop)
            status = ui.wait(timeout=60)
            outlived = servers[stop] & running().keys()
            assert not outlived, f"processes {outlived} of the UI's server outlived `aesearch ui` ({stop.name})"
            assert port_is_free(port), stop.name
            assert status == 0, stop.name
            printed = log.read_text()
            assert f"Uvicorn running on http://127.0.0.1:{port}" in printed, printed
            assert "0.0.0.0" not in printed and "Registry store URI not provided" not in printed, printed
    finally:
        for ui, _, _ in uis.values():
            ui.kill()
        for pid in set().union(*servers.values()):  # only what this test started, should a UI leave it behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --- the UI, in a browser -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ui(small_search, tmp_path_factory):
    """`aesearch ui` on the small search's embedded store."""
    experiment, _ = small_search
    port = free_port()
    store = sqlite_uri(experiment.parent.parent / "mlflow.db")
    command = [sys.executable, "-m", "aesearch.cli", "ui", "--tracking-uri", store, "--port", str(port)]
    yield from serve(command, port, tmp_path_factory.mktemp("ui") / "ui.log")


def test_the_ui_lists_the_trial_runs_of_a_search(ui, tracked, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    _, experiment, runs, _ = tracked
    with open_page(f"{ui}/#/experiments/{experiment.experiment_id}/runs", tmp_path / "profile") as browser:
        names = [trial_run.info.run_name for trial_run in runs]
        # The search run is listed, its trial runs folded under it: unfold them.
        expand = "button[data-component-id*='runnamecellrenderer']"
        try:
            WebDriverWait(browser, 90, poll_frequency=1).until(lambda d: d.find_elements("css selector", expand))
            text = browser.find_element("tag name", "body").text
            assert "Training runs" in text and "small" in text
            browser.find_element("css selector", expand).click()
            WebDriverWait(browser, 30, poll_frequency=1).until(
                lambda d: all(name in d.find_element("tag name", "body").text for name in names))
        finally:
            browser.save_screenshot(str(tmp_path / "runs.png"))
    assert png_shape(str(tmp_path / "runs.png"))[1] >= 1000


def test_the_served_models_class_loads_without_mlflows_warning_about_type_hints():
    """MLflow warns at every load of a model whose `predict` has no type hints; ours has one that asks for no
    schema inference (the model is logged with its own signature), so loading it is quiet."""
    code = ("import warnings\n"
            "with warnings.catch_warnings():\n"
            "    warnings.simplefilter('ignore')\n"
            "    import mlflow.pyfunc\n"  # MLflow's own import warns about its own classes
            "with warnings.catch_warnings(record=True) as seen:\n"
            "    warnings.simplefilter('always')\n"
            "    from aesearch.tracking.served_model import AutoencoderModel\n"
            "print(len(seen), [str(w.message) for w in seen])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("0 "), done.stdout
