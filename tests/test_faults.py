"""Faults during a search, injected for real on the production stack of cluster/rehearsal.py's
LocalCluster (a 3-node Ray cluster, an MLflow server on PostgreSQL with its artifacts in SeaweedFS's
S3 server, the search's storage in the same bucket, all on 127.0.0.1): a worker node killed mid-trial,
trials that raise (once, and in every attempt), a config that diverges, the tracking server crashed
and restarted, PostgreSQL restarted, the S3 server down for seconds while trials checkpoint. They all
hit one search (a search costs half a minute to start here): it must finish, lose nothing, and say
what happened on every trial's run. A search of its own has trials killed by Ray's
memory monitor (its threshold is per node, read as Ray starts)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from pyarrow.fs import FileSelector

from aesearch.errors import UserError
from aesearch.locations import sqlite_uri
from aesearch.search.faults import GIB, node_memory, read_faults
from aesearch.search.storage import SearchFolder, storage_unreachable, upload_folder
from tests.conftest import REPO
from tests.searching import DIVERGING_START, run, search_command, tracking_uri, wait_until, write_space

sys.path.insert(0, str(REPO / "cluster"))
from rehearsal import LocalCluster  # noqa: E402

pytestmark = pytest.mark.slow  # searches through killed nodes, servers and storage

EPOCHS = 24  # ~0.3 s each here: trials that outlast a node's death and the server's outage
TRIALS = 9  # 3 at a time: some still to start once the node is dead, whichever trial it held
BIGGER = ("base:\n  model: {hidden_dims: [32]}", "base:\n  model: {hidden_dims: [256, 128]}")  # epochs that take a while
# Ray's nodes report a dead node after 5 failed health checks 1 s apart (Ray's default: 3 s apart), so the
# killed trial is retried seconds after the kill, not a quarter of a minute. A node that only answers
# slowly is not affected: each check still waits for Ray's 10 s timeout.
HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5"}


def fault_space(folder: Path, name: str, trials: int, extra: str = "") -> Path:
    """The tests' small space, with bigger models, no early stopping, 2 retries per trial."""
    space = write_space(folder, name, trials=trials, epochs=EPOCHS, grace=EPOCHS, extra=extra)
    text = space.read_text().replace(*BIGGER).replace("max_concurrent: 2", "max_concurrent: 3")
    space.write_text(text.replace("keep_checkpoints: 10}", "keep_checkpoints: 10, max_failures: 2}"))
    return space


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, monkeypatch_module):
    """A Ray head and two worker nodes (1 CPU each) and a tracking server with basic auth."""
    for name, value in HEALTH_CHECKS.items():  # every node inherits this process's environment
        monkeypatch_module.setenv(name, value)
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
               cluster.gcs_address, "--storage", cluster.storage, "--tracking-uri", cluster.tracking_uri]
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
    assert read_faults({"AESEARCH_FAULTS": '[{"trial": 1, "epoch": 2, "kind": "memory"}]'})[0].kind == "memory"
    for text, named in (("[{\"trial\": 0, \"epoch\": 1}]", "[0].trial=0"), ("not json", "Invalid JSON"),
                        ("[{\"trial\": 1, \"epoch\": 1, \"when\": 2}]", "[0].when: unknown key"),
                        ("[{\"trial\": 1, \"epoch\": 1, \"kind\": \"disk\"}]", "[0].kind='disk': unknown fault kind; valid names: memory, raise")):
        with pytest.raises(UserError, match="AESEARCH_FAULTS") as caught:
            read_faults({"AESEARCH_FAULTS": text})
        assert named in str(caught.value)
    space = write_space(tmp_path, "planned", trials=1, epochs=1, grace=1)
    done = subprocess.run([sys.executable, "-m", "aesearch.cli", "search", str(space), "--storage",
                           str(tmp_path / "results"), "--tracking-uri", sqlite_uri(tmp_path / "mlflow.db")],
                          env={**os.environ, "AESEARCH_FAULTS": "[{\"trial\": 1}]"}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "AESEARCH_FAULTS" in done.stderr and "[0].epoch: required" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["planned.yaml"]  # nothing written


# --- a node killed, trials that raise, a config that diverges, the tracking server down -------------


def test_a_search_through_node_death_failing_trials_divergence_and_server_outages_finishes_and_loses_nothing(
    cluster, tmp_path
):
    name = "chaos"
    # Trial 1 diverges (a VAE at lr 1.0); trial 2 raises in epoch 3 of its first attempt only, trial 3 in
    # epoch 2 of every attempt (3 with max_failures 2).
    space = fault_space(tmp_path, name, trials=TRIALS, extra=DIVERGING_START)
    plan = [{"trial": 2, "epoch": 3, "attempts": 1}, {"trial": 3, "epoch": 2}]
    search = start_search(cluster, space, name, {"AESEARCH_FAULTS": json.dumps(plan)})
    client = MlflowClient(cluster.tracking_uri)
    workers = {node["node_id"]: node["raylet_pid"] for node in cluster.nodes() if not node["head"]}

    def training(on_nodes, at_least: int, at_most: int, besides: int = 0):
        """A trial without an injected fault, running on one of those nodes, that far into training."""
        for number, run in trial_runs(client, name).items():
            epochs = len(epochs_logged(client, run.info.run_id))
            if number > 3 and number != besides and run.data.tags.get("node") in on_nodes \
                    and run.info.status == "RUNNING" and at_least <= epochs <= at_most:
                return number, run.data.tags["node"], epochs
        return None

    killed_trial, killed_node, epochs_before = wait_until(lambda: training(workers, 3, EPOCHS - 5),
                                                         "a trial 3 epochs into training on a worker node")
    kill_node(workers[killed_node])
    alive = {node["node_id"] for node in cluster.nodes()} - {killed_node}
    wait_until(lambda: "restored" in client.get_run(trial_runs(client, name)[killed_trial].info.run_id).data.tags,
               "the killed trial going on on another node")
    # Any other trial with epochs still to train: it reports across the outages below (a trial waits at
    # its report while S3 is down). Its first half only would depend on which trials are still to start.
    early, _, _ = wait_until(lambda: training(alive, 1, EPOCHS - 6, besides=killed_trial),
                             "another trial with epochs still to train")
    cluster.s3.stop(grace=0)  # the object store crashes, down for a while: no checkpoint, no artifact,
    s3_down_ms = int(time.time() * 1000)  # no experiment state can be stored
    time.sleep(5)
    cluster.s3.start()
    s3_back_ms = int(time.time() * 1000)
    down_since_ms = int(time.time() * 1000)
    cluster.stop_mlflow(grace=0)  # then the tracking server crashes: no time to finish a request
    time.sleep(6)  # the other trials train on meanwhile
    back_at_ms = int(time.time() * 1000)
    cluster.start_mlflow()
    cluster.database.restart()  # and MLflow's backend store goes away and comes back (a fast shutdown)
    output = finish(search, cluster, name)

    runs = trial_runs(client, name)
    assert sorted(runs) == list(range(1, TRIALS + 1))
    assert {run.info.status for run in runs.values()} <= {"FINISHED", "FAILED"}  # none left RUNNING
    tags = {number: run.data.tags for number, run in runs.items()}
    assert tags[1]["outcome"] == "diverged at epoch 1"

    # The trial on the killed node went on from its last checkpoint on another node, and finished.
    moved = tags[killed_trial]
    assert moved["outcome"] == "completed" and moved["node"] != killed_node, moved
    went_on_from = int(moved["restored"].split("from epoch ")[1].split()[0])
    assert went_on_from >= epochs_before - 1 and killed_node not in moved["restored"]

    # Trial 2 raised once, was retried from its checkpoint of epoch 2, and completed.
    assert tags[2]["outcome"] == "completed" and tags[2]["aesearch.attempt"] == "2"
    assert tags[2]["restored"].startswith("attempt 2 went on from epoch 2 ")
    once = artifact_text(client, runs[2].info.run_id, "errors/tracebacks.txt", tmp_path / "2")
    assert once.count("injected fault: trial #2, epoch 3, attempt 1") == 1

    # Trial 3 raised in each of its 3 attempts: errored, with every traceback on its run.
    assert runs[3].info.status == "FAILED"
    assert tags[3]["outcome"].startswith("errored after 3 attempts: ") and "InjectedFault" in tags[3]["outcome"]
    text = artifact_text(client, runs[3].info.run_id, "errors/tracebacks.txt", tmp_path / "3")
    assert text.count("Failure # ") == 3 and text.count("injected fault: trial #3, epoch 2") == 3
    assert epochs_logged(client, runs[3].info.run_id) == [1]

    # What the trials measured while the server was down reached it afterwards: every epoch, once.
    # (The searcher may draw another learning rate that diverges: such a trial has one epoch, no metrics.)
    completed = [n for n in runs if n not in (1, 3) and tags[n]["outcome"] != "diverged at epoch 1"]
    assert killed_trial in completed and len(completed) >= 3
    measured_while_down, stamps = 0, {}
    for number in completed:
        assert tags[number]["outcome"] == "completed", (number, tags[number])
        history = client.get_metric_history(runs[number].info.run_id, "epoch")
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), number
        measured_while_down += sum(down_since_ms <= m.timestamp < back_at_ms for m in history)
        stamps[number] = sorted(m.timestamp for m in history)
        pictures = {a.path for a in client.list_artifacts(runs[number].info.run_id, "images")}
        assert "images/reconstructions.png" in pictures and len(pictures) > 2
        checkpoints = client.list_artifacts(runs[number].info.run_id, "checkpoints")
        assert [a.path for a in checkpoints] == ["checkpoints/best.pt"]
    assert measured_while_down >= 3
    # The trials training when S3 went down waited at their next report (no checkpoint could be stored)
    # and went on once S3 was back: no retry, no epoch lost or repeated (checked above).
    assert stamps[early][0] < s3_down_ms and stamps[early][-1] > s3_back_ms, (s3_down_ms, s3_back_ms, stamps[early])
    assert tags[early]["aesearch.attempt"] == "1", tags[early]  # not retried: it waited
    assert max(b - a for a, b in zip(stamps[early], stamps[early][1:])) >= 4000, stamps[early]
    # Ray Tune's side, in the bucket: every trial's newest checkpoint, once; the search's own files.
    stored = [key for page in cluster.s3.client().get_paginator("list_objects_v2").paginate(
        Bucket=cluster.s3.RESULTS, Prefix=f"searches/{name}/") for key in (i["Key"] for i in page.get("Contents", []))]
    checkpoints: dict[str, set[str]] = {}
    for key in stored:
        parts = key.split("/")
        if len(parts) > 4 and parts[3].startswith("checkpoint_"):
            checkpoints.setdefault(parts[2], set()).add(parts[3])
    board = pd.read_csv(cluster.s3.client().get_object(Bucket=cluster.s3.RESULTS,
                                                       Key=f"searches/{name}/leaderboard.csv")["Body"])
    assert len(board) == TRIALS and len(checkpoints) >= len(completed)
    many = {trial: sorted(kept) for trial, kept in checkpoints.items() if len(kept) > 1}
    assert not many, many
    assert not any("tracking" in t for t in tags.values())  # nothing is incomplete: it all arrived
    search_run = client.get_run(tags[2]["mlflow.parentRunId"])
    assert search_run.info.status == "FINISHED" and "best_trial_run" in search_run.data.tags
    assert "errored" in output and "diverged" in output and "aesearch: warning" not in output


def test_the_staged_state_reaches_a_storage_that_was_down_once_it_answers_again(cluster, tmp_path, monkeypatch):
    """Ray Tune only logs that its last upload of a search's state failed (the S3 server down as the search
    ended); aesearch then uploads the staged state again, waiting (`patiently`, tests/test_outbox.py) while
    the storage's error says it does not answer (driver.py, storage.py)."""
    for key, value in cluster.s3.client_env(cluster.s3.trials).items():  # the searches' own keys
        monkeypatch.setenv(key, value)
    staged = tmp_path / "driver_artifacts"  # what Tune stages: its state files and each trial's results
    (staged / "trial_1").mkdir(parents=True)
    (staged / "experiment_state-1.json").write_text('{"trials": "all ended"}')
    (staged / "trial_1" / "result.json").write_text('{"epoch": 3}\n')
    experiment = f"{cluster.storage}/ended"
    cluster.s3.stop(grace=0)  # the object store crashes as the search ends
    try:
        with pytest.raises(OSError) as refused:  # what Tune met
            upload_folder(str(staged), experiment)
        assert storage_unreachable(refused.value)  # worth waiting for
    finally:
        cluster.s3.start()  # and is back
    upload_folder(str(staged), experiment)
    folder = SearchFolder(experiment)
    assert folder.read("experiment_state-1.json") == '{"trials": "all ended"}'
    assert folder.read("trial_1/result.json") == '{"epoch": 3}\n'
    stored = {info.path.removeprefix(folder.path + "/")
              for info in folder.fs.get_file_info(FileSelector(folder.path, recursive=True)) if info.size}
    assert stored == {"experiment_state-1.json", "trial_1/result.json"}


# --- a trial killed by Ray's memory monitor ----------------------------------------------------------


def test_a_trial_killed_by_rays_memory_monitor_fails_alone_and_the_search_goes_on(ray_env, tmp_path):
    """Ray reports a worker its memory monitor killed as OutOfMemoryError, which Tune did not expect of a
    trial: the whole search ended. Here Ray's own monitor kills for real, on a local Ray instance of the
    search's own (the raylet reads the threshold from the driver's environment), one trial at a time:
    trial 1 outgrows its node in its first attempt and is retried from its checkpoint, trial 2 in each
    attempt and errors. The threshold sits 3 GiB above what this machine uses now (the search itself takes
    ~1.5 GiB), and each kill lets the node use at most 1 GiB more than that (faults.hog_memory)."""
    total, used = node_memory()
    space = write_space(tmp_path, "memory", trials=2, epochs=3, grace=3)
    space.write_text(space.read_text().replace("max_concurrent: 2", "max_concurrent: 1"))  # default max_failures: 1
    plan = [{"trial": 1, "epoch": 2, "attempts": 1, "kind": "memory"}, {"trial": 2, "epoch": 2, "kind": "memory"}]
    env = {**ray_env, "AESEARCH_FAULTS": json.dumps(plan), "RAY_memory_monitor_refresh_ms": "100",
           "RAY_memory_usage_threshold": f"{(used + 3 * GIB) / total:.4f}"}
    done = run(search_command(space, tmp_path / "results"), env, cwd=REPO, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]

    client = MlflowClient(tracking_uri(tmp_path / "results"))
    experiment = client.get_experiment_by_name("memory")
    runs = {int(r.data.tags["aesearch.trial_number"]): r for r in client.search_runs(
        [experiment.experiment_id], filter_string="tags.`aesearch.role` = 'trial'")}
    killed = "KilledForMemory: killed by Ray's memory monitor: Memory usage "
    retried, errored = runs[1].data.tags, runs[2].data.tags
    assert retried["outcome"] == "completed" and retried["aesearch.attempt"] == "2", retried
    assert retried["restored"].startswith("attempt 2 went on from epoch 1 ")
    once = artifact_text(client, runs[1].info.run_id, "errors/tracebacks.txt", tmp_path / "1")
    assert once.count(killed) == 1 and "OOM kill reason" in once  # Ray's monitor killed it, not the hog's cap
    assert runs[2].info.status == "FAILED" and errored["outcome"].startswith(f"errored after 2 attempts: {killed}")
    twice = artifact_text(client, runs[2].info.run_id, "errors/tracebacks.txt", tmp_path / "2")
    assert twice.count(killed) == 2 and "reached its cap" not in twice
    assert "2 trials: 1 completed, 1 errored" in done.stdout
    said = [line.split(" failed ", 1)[1] for line in done.stderr.splitlines() if " failed (attempt " in line]
    assert [line.replace(killed, "").split("; ")[-1] for line in said] == [  # one line per failed attempt
        "retried from its last checkpoint", "retried from its last checkpoint", "errored"], said
    assert all(f": {killed}" in line for line in said) and said[-1].startswith("(attempt 2)")
