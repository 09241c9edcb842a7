"""Faults during a search, injected for real on a 3-node Ray cluster and an MLflow server on 127.0.0.1
(cluster/rehearsal.py's LocalCluster): a worker node killed mid-trial, trials that raise (once, and
in every attempt), a config that diverges, the tracking server stopped and restarted mid-search.
Each time the search must finish, lose nothing, and say what happened on every trial's run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from aesearch.errors import UserError
from aesearch.faults import read_faults
from tests.conftest import REPO
from tests.searching import DIVERGING_START, write_space

sys.path.insert(0, str(REPO / "cluster"))
from rehearsal import LocalCluster  # noqa: E402

EPOCHS = 15
OUTAGE_EPOCHS = 60  # ~0.3 s each here: trials that outlast the outage
BIGGER = ("base:\n  model: {hidden_dims: [32]}", "base:\n  model: {hidden_dims: [256, 128]}")  # epochs that take a while


def fault_space(folder: Path, name: str, trials: int, extra: str = "", epochs: int = EPOCHS) -> Path:
    """The tests' small space, with bigger models, no early stopping, 2 retries per trial."""
    space = write_space(folder, name, trials=trials, epochs=epochs, grace=epochs, extra=extra)
    text = space.read_text().replace(*BIGGER).replace("max_concurrent: 2", "max_concurrent: 3")
    space.write_text(text.replace("keep_checkpoints: 10}", "keep_checkpoints: 10, max_failures: 2}"))
    return space


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, monkeypatch_module):
    """A Ray head and two worker nodes (1 CPU each) and a tracking server with basic auth."""
    with LocalCluster(tmp_path_factory.mktemp("faults"), workers=2) as cluster:
        monkeypatch_module.setenv("MLFLOW_TRACKING_USERNAME", "admin")  # this test process reads the server
        monkeypatch_module.setenv("MLFLOW_TRACKING_PASSWORD", cluster.mlflow_password)
        yield cluster


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def start_search(cluster: LocalCluster, space: Path, name: str, env: dict | None = None) -> subprocess.Popen:
    """The driver on this machine, its trials on the cluster's nodes, logging to the server."""
    command = [sys.executable, "-m", "aesearch.cli", "search", str(space), "--name", name, "--address",
               cluster.gcs_address, "--storage", str(cluster.workdir / "results"), "--tracking-uri",
               cluster.tracking_uri]
    log = open(cluster.workdir / "logs" / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(command, env={**cluster.env(), **(env or {})}, cwd=cluster.workdir,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def finish(search: subprocess.Popen, cluster: LocalCluster, name: str, timeout: float = 400) -> str:
    try:
        search.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(search.pid, signal.SIGKILL)
        search.wait()
    output = (cluster.workdir / "logs" / f"{name}.log").read_text()
    assert search.returncode == 0, output[-4000:]
    return output


def trial_runs(client: MlflowClient, name: str) -> dict[int, object]:
    """Trial number -> its MLflow run."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return {}
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`aesearch.role` = 'trial'")
    return {int(run.data.tags["aesearch.trial_number"]): run for run in runs}


def epochs_logged(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "epoch"))


def artifact_text(client: MlflowClient, run_id: str, path: str, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, path, str(folder))).read_text()


def wait_for(condition, what: str, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {timeout} s")


def kill_node(raylet_pid: int) -> None:
    """A node gone the hard way: its raylet and every process it started (its workers), SIGKILL."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(stat.parent.name))
    doomed, i = [raylet_pid], 0
    while i < len(doomed):
        doomed += children.get(doomed[i], [])
        i += 1
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- the fault plan ---------------------------------------------------------------------------------


def test_a_fault_plan_is_validated_before_anything_starts(tmp_path):
    assert read_faults({}) == []
    plan = read_faults({"AESEARCH_FAULTS": '[{"trial": 2, "epoch": 3, "attempts": 1}]'})
    assert (plan[0].trial, plan[0].epoch, plan[0].attempts) == (2, 3, 1)
    for text, named in (("[{\"trial\": 0, \"epoch\": 1}]", "0.trial=0"), ("not json", "Invalid JSON"),
                        ("[{\"trial\": 1, \"epoch\": 1, \"when\": 2}]", "0.when: unknown key")):
        with pytest.raises(UserError, match="AESEARCH_FAULTS") as caught:
            read_faults({"AESEARCH_FAULTS": text})
        assert named in str(caught.value)
    space = write_space(tmp_path, "planned", trials=1, epochs=1, grace=1)
    done = subprocess.run([sys.executable, "-m", "aesearch.cli", "search", str(space), "--storage",
                           str(tmp_path / "results"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                          env={**os.environ, "AESEARCH_FAULTS": "[{\"trial\": 1}]"}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "AESEARCH_FAULTS" in done.stderr and "0.epoch: required" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["planned.yaml"]  # nothing written


# --- a node killed, trials that raise, a config that diverges ----------------------------------------


def test_a_killed_node_failing_and_diverging_trials_end_recorded_and_the_search_finishes(cluster, tmp_path):
    name = "chaos"
    # Trial 1 diverges (a VAE at lr 1.0); trial 2 raises in epoch 3 of its first attempt only, trial 3 in
    # epoch 2 of every attempt (3 with max_failures 2).
    space = fault_space(tmp_path, name, trials=6, extra=DIVERGING_START)
    plan = [{"trial": 2, "epoch": 3, "attempts": 1}, {"trial": 3, "epoch": 2}]
    search = start_search(cluster, space, name, {"AESEARCH_FAULTS": json.dumps(plan)})
    client = MlflowClient(cluster.tracking_uri)
    workers = {node["node_id"]: node["raylet_pid"] for node in cluster.nodes() if not node["head"]}

    def victim():
        """A trial without an injected fault, training on a worker node, a few epochs in."""
        for number, run in trial_runs(client, name).items():
            if number > 3 and run.data.tags.get("node") in workers and run.info.status == "RUNNING" \
                    and len(epochs_logged(client, run.info.run_id)) >= 3:
                return number, run.data.tags["node"], len(epochs_logged(client, run.info.run_id))
        return None

    killed_trial, killed_node, epochs_before = wait_for(victim, "a trial 3 epochs into training on a worker node")
    kill_node(workers[killed_node])
    output = finish(search, cluster, name)

    runs = trial_runs(client, name)
    assert sorted(runs) == [1, 2, 3, 4, 5, 6]
    assert {run.info.status for run in runs.values()} <= {"FINISHED", "FAILED"}  # none left RUNNING
    tags = {number: run.data.tags for number, run in runs.items()}
    assert tags[1]["outcome"] == "diverged at epoch 1"

    # The trial on the killed node went on from its last checkpoint on another node, and finished.
    moved = tags[killed_trial]
    assert moved["outcome"] == "completed" and moved["node"] != killed_node, moved
    went_on_from = int(moved["restored"].split("from epoch ")[1].split()[0])
    assert went_on_from >= epochs_before - 1 and killed_node not in moved["restored"]
    assert epochs_logged(client, runs[killed_trial].info.run_id) == list(range(1, EPOCHS + 1))  # each epoch once

    # Trial 2 raised once, was retried from its checkpoint of epoch 2, and completed.
    assert tags[2]["outcome"] == "completed" and tags[2]["aesearch.attempt"] == "2"
    assert tags[2]["restored"].startswith("attempt 2 went on from epoch 2 ")
    assert epochs_logged(client, runs[2].info.run_id) == list(range(1, EPOCHS + 1))
    once = artifact_text(client, runs[2].info.run_id, "errors/tracebacks.txt", tmp_path / "2")
    assert once.count("injected fault: trial #2, epoch 3, attempt 1") == 1

    # Trial 3 raised in each of its 3 attempts: errored, with every traceback on its run.
    assert runs[3].info.status == "FAILED"
    assert tags[3]["outcome"].startswith("errored after 3 attempts: ") and "InjectedFault" in tags[3]["outcome"]
    text = artifact_text(client, runs[3].info.run_id, "errors/tracebacks.txt", tmp_path / "3")
    assert text.count("Failure # ") == 3 and text.count("injected fault: trial #3, epoch 2") == 3
    assert epochs_logged(client, runs[3].info.run_id) == [1]

    assert not any("tracking" in t for t in tags.values())  # the server was up: nothing is incomplete
    assert "errored" in output and "diverged" in output  # the search's own summary names both

    # The report lists them too.
    report = tmp_path / "report"
    made = subprocess.run([sys.executable, "-m", "aesearch.cli", "report", name, "--tracking-uri",
                           cluster.tracking_uri, "--out", str(report)], env=cluster.env(), capture_output=True,
                          text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    unranked = (report / "report.md").read_text().split("Trials not ranked")[1].split("\n#")[0]
    assert "errored after 3 attempts" in unranked and "diverged at epoch 1" in unranked


# --- the tracking server stopped and restarted mid-search --------------------------------------------


def test_records_made_while_the_tracking_server_is_down_arrive_once_it_is_back(cluster, tmp_path):
    name = "outage"
    space = fault_space(tmp_path, name, trials=4, epochs=OUTAGE_EPOCHS)
    space.write_text(space.read_text().replace("high: 1.0", "high: 0.003"))  # no trial diverges here
    search = start_search(cluster, space, name)
    client = MlflowClient(cluster.tracking_uri)
    wait_for(lambda: any(len(epochs_logged(client, run.info.run_id)) >= 2 for run in trial_runs(client, name).values()),
             "a trial 2 epochs in")
    cluster.stop_mlflow(grace=0)  # a crash: no time to finish a request
    down_since_ms = int(time.time() * 1000)
    time.sleep(10)  # the trials train on meanwhile
    back_at_ms = int(time.time() * 1000)
    cluster.start_mlflow()
    output = finish(search, cluster, name)

    runs = trial_runs(client, name)
    assert sorted(runs) == [1, 2, 3, 4]
    measured_while_down = 0
    for number, run in runs.items():
        assert run.info.status == "FINISHED" and run.data.tags["outcome"] == "completed", (number, run.data.tags)
        assert "tracking" not in run.data.tags, run.data.tags["tracking"]  # nothing was lost
        history = client.get_metric_history(run.info.run_id, "epoch")
        assert sorted(m.step for m in history) == list(range(1, OUTAGE_EPOCHS + 1))  # every epoch, once
        measured_while_down += sum(down_since_ms <= m.timestamp < back_at_ms for m in history)
        pictures = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
        assert "images/reconstructions.png" in pictures and len(pictures) > 2
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/best.pt"]
    assert measured_while_down >= 3  # epochs trained during the outage, delivered after it
    search_run = client.get_run(next(iter(runs.values())).data.tags["mlflow.parentRunId"])
    assert search_run.info.status == "FINISHED" and "best_trial_run" in search_run.data.tags
    assert "Traceback" not in output
