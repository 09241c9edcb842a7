"""The search on a real Ray: a local instance (as `make quickstart` starts it), and the Ray instance the
tests share for a killed and resumed driver and a Ctrl-C.

Every Ray process a test starts runs with token authentication on (a token made by the test)
and bound to 127.0.0.1, and is stopped by its own handle or process group.
"""

import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from aesearch.locations import file_uri, sqlite_uri
from tests.conftest import KEPT_CHECKPOINTS
from tests.searching import (
    run,
    search_command,
    tracking_uri,
    trial_reports,
    write_space,
)

pytestmark = pytest.mark.slow  # searches: killed, interrupted, resumed


def test_every_trial_reports_the_yardstick_every_epoch(small_search):
    experiment, _ = small_search
    reports = trial_reports(experiment)
    assert len(reports) == 8
    for lines in reports.values():
        epochs = [int(line["epoch"]) for line in lines]
        assert epochs == list(range(1, len(epochs) + 1))
        assert all(isinstance(line["val/recon_mse"], float) for line in lines)


def test_asha_stops_some_trials_early_and_lets_others_complete(small_search):
    experiment, _ = small_search
    board = pd.read_csv(experiment / "leaderboard.csv")
    assert len(board) == 8
    outcomes = board["outcome"].tolist()
    assert any(o.startswith("stopped early at epoch") for o in outcomes)
    assert "completed" in outcomes
    completed = board[board["outcome"] == "completed"]
    assert (completed["epochs"] == 3).all() and completed["test/recon_mse"].notna().all()
    stopped = board[board["outcome"].str.startswith("stopped early")]
    assert (stopped["epochs"] < 3).all() and stopped["test/recon_mse"].isna().all()


def test_a_diverged_trial_is_recorded_and_the_search_goes_on(small_search):
    experiment, _ = small_search
    board = pd.read_csv(experiment / "leaderboard.csv")
    diverged = board[board["outcome"].str.startswith("diverged")]
    assert len(diverged) >= 1 and (diverged["outcome"] == "diverged at epoch 1").all()
    assert (diverged["val/recon_mse"] == float("inf")).all()
    assert len(board) == 8 and "completed" in set(board["outcome"])


def test_leaderboard_best_is_the_best_reported(small_search):
    experiment, done = small_search
    reports = trial_reports(experiment)
    final = {trial: lines[-1]["val/recon_mse"] for trial, lines in reports.items()}
    finite = [value for value in final.values() if math.isfinite(value)]
    assert len(set(finite)) == len(finite)  # no ties: the best is one trial
    best_trial = min(final, key=final.get)
    board = pd.read_csv(experiment / "leaderboard.csv", dtype={"trial": str})
    assert board.loc[0, "trial"] == best_trial
    assert board.loc[0, "val/recon_mse"] == pytest.approx(final[best_trial])
    assert board["val/recon_mse"].is_monotonic_increasing
    assert "best per variant family" in done.stdout and best_trial in done.stdout


def test_progress_is_shown_live(small_search):
    """A line as trials end, while others still run: the counts of ended trials only grow, and the last line
    says every trial has ended."""
    _, done = small_search
    progress = [line for line in done.stderr.splitlines() if " running, " in line]
    assert progress and "best val/recon_mse" in progress[-1]
    pattern = r"(\d+) running, (\d+) pending, (\d+) completed, (\d+) stopped early, (\d+) diverged, (\d+) errored"
    counts = [[int(n) for n in re.search(pattern, line).groups()] for line in progress]
    assert len(counts) >= 3, progress
    assert any(running > 0 for running, *_ in counts[:-1]), progress  # printed while trials were still running
    ended = [sum(line[2:]) for line in counts]
    assert ended == sorted(ended) and ended[-1] == 8, progress
    assert re.search(r"\] 0 running, 0 pending, [1-9]\d* completed", progress[-1]), progress[-1]  # all had ended
    assert re.search(r"\n8 trials: .*\d stopped early", done.stdout)  # the words of the progress line and outcomes


def test_the_search_ends_by_saying_where_its_time_went(small_search):
    _, done = small_search
    last = done.stderr.strip().splitlines()[-1]
    found = re.fullmatch(r"aesearch: time: (.+) = ([\d.]+) s", last)
    assert found, last
    phases = dict(part.rsplit(" ", 2)[:2] for part in found.group(1).split(" | "))
    assert list(phases) == [
        "start (imports, checks, data)", "Ray and the MLflow run", "to the first trial report", "trials",
        "closing (leaderboard, best model, runs)"]
    seconds = [float(value) for value in phases.values()]
    assert all(value >= 0 for value in seconds) and sum(seconds) == pytest.approx(float(found.group(2)), abs=0.3)
    assert seconds[3] > 0.5  # 8 trials of 3 epochs train for seconds, not nothing


def checkpoints_kept(experiment: Path) -> dict[str, list[str]]:
    """Trial id -> names of the checkpoint folders left in its trial folder (a trial that never reported:
    a folder a killed driver created for a trial it had not yet saved, so it has nothing to keep)."""
    kept = {}
    for log in experiment.glob("*/result.json"):
        lines = log.read_text().splitlines()
        if lines:
            kept[json.loads(lines[0])["trial_id"]] = sorted(p.name for p in log.parent.glob("checkpoint_*"))
        else:
            assert not list(log.parent.glob("checkpoint_*")), log.parent
    return kept


def test_a_finished_search_keeps_the_newest_checkpoint_of_its_best_trials_only(small_search):
    experiment, _ = small_search
    reports = trial_reports(experiment)
    board = pd.read_csv(experiment / "leaderboard.csv", dtype={"trial": str})
    best = set(board.dropna(subset=["val/recon_mse"])["trial"][:KEPT_CHECKPOINTS])
    kept = checkpoints_kept(experiment)
    assert len(kept) == 8 and len(best) == KEPT_CHECKPOINTS
    for trial, checkpoints in kept.items():
        epochs = len(reports[trial])  # every epoch reports a checkpoint, numbered from 0
        assert checkpoints == ([f"checkpoint_{epochs - 1:06d}"] if trial in best else []), trial


def test_a_finished_trials_stored_record_keeps_its_last_result_objective_statistics_and_latest_checkpoint(
        small_search):
    """What Tune keeps of each finished trial, in the driver and in every save of the search state: its
    last result whole (the leaderboard reads it), running statistics of the objective only, and only
    its latest checkpoint (CheckpointPruner deleted the others)."""
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    experiment, _ = small_search
    state = json.loads(max(experiment.glob("experiment_state-*.json")).read_text())
    reports = trial_reports(experiment)
    finished = 0
    for trial_json, metadata_json in state["trial_data"]:
        trial = json.loads(trial_json)
        metadata = _TrainingRunMetadata.from_json_state(metadata_json)
        assert trial["status"] in ("TERMINATED", "ERROR"), trial["status"]
        finished += 1
        assert set(metadata.metric_analysis) == {"val/recon_mse"} == set(metadata.metric_n_steps), trial["trial_id"]
        last = reports[trial["trial_id"]][-1]  # its last report, as Tune logged it
        assert metadata.last_result["epoch"] == last["epoch"] and set(last) <= set(metadata.last_result)
        manager = metadata.checkpoint_manager
        latest = manager.latest_checkpoint_result
        if last.get("outcome/diverged"):  # it diverged in its first epoch: it reported no checkpoint
            assert latest is None and manager.best_checkpoint_results == []
            continue
        assert manager.best_checkpoint_results == [latest]
        assert latest.checkpoint.path.endswith(f"checkpoint_{len(reports[trial['trial_id']]) - 1:06d}")
    assert finished == 8


def test_a_second_search_of_the_same_name_is_refused(small_search, ray_env):
    experiment, _ = small_search
    space = experiment.parent.parent / "small.yaml"
    done = run(search_command(space, experiment.parent), ray_env, timeout=120)
    assert done.returncode == 2
    assert "a search named 'small' already exists" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def saved_statuses(experiment: Path) -> dict[str, str]:
    """Trial statuses in the experiment state the driver last saved (what --resume starts from)."""
    try:
        state = json.loads(max(experiment.glob("experiment_state-*.json")).read_text())
    except (ValueError, OSError):  # nothing saved yet, or a state file being written
        return {}
    trials = [json.loads(trial_json) for trial_json, _ in state["trial_data"]]
    return {trial["trial_id"]: trial["status"] for trial in trials}


RESUMED_EPOCHS = 24  # long enough to kill mid-search


def kill_then_resume(tmp_path: Path, ray_env: dict, ray_address: str) -> tuple[Path, dict, subprocess.CompletedProcess]:
    """A search whose driver is killed once two trials have finished, then resumed: (its storage, the
    reports of the trials finished before the kill, the resumed search's finished process)."""
    space = write_space(tmp_path, "killed", trials=8, epochs=RESUMED_EPOCHS, grace=RESUMED_EPOCHS)
    storage = tmp_path / "results"
    experiment = storage / "killed"
    frequent_saves = {**ray_env, "TUNE_GLOBAL_CHECKPOINT_S": "0.5"}  # many saves, many prunes: many chances to race
    on_ray = ["--address", ray_address]  # the Ray instance the tests share: Ray ends the dead driver's trials
    driver = subprocess.Popen(
        search_command(space, storage, *on_ray), env=frequent_saves, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while list(saved_statuses(experiment).values()).count("TERMINATED") < 2:
            assert time.monotonic() < deadline, "no two trials finished within 5 minutes"
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver, the hard way
        driver.wait()
    statuses = saved_statuses(experiment)
    finished = {t: lines for t, lines in trial_reports(experiment).items() if statuses.get(t) == "TERMINATED"}
    assert len(finished) >= 2 and not (experiment / "leaderboard.csv").exists()
    assert len(finished) < 8, "the search ended before the kill: nothing left to resume"
    # What a driver killed between starting a trial and saving its state leaves: a trial folder, with
    # checkpoints, that the stored state does not name (made here: the race is rare).
    orphan = experiment / ORPHAN
    reported = (p.parent for p in experiment.glob("*/checkpoint_*") if (p.parent / "result.json").is_file())
    shutil.copytree(next(reported), orphan)  # a trial with reports (one killed before its first has none)
    reports = orphan / "result.json"
    reports.write_text(re.sub(r'"trial_id": "\w+"', '"trial_id": "0rphan00"', reports.read_text()))
    assert list(orphan.glob("checkpoint_*"))
    return storage, finished, run(search_command(space, storage, "--resume", *on_ray), ray_env)


ORPHAN = "run_trial_0rphan00_9_killed_before_its_state_was_saved"


def interrupt_then_resume(tmp_path: Path, ray_env: dict, ray_address: str):
    """A search stopped by Ctrl-C right after its first trial completes, then resumed: (its space, its
    storage, the interrupted driver's exit status and stderr, the resumed search's finished process)."""
    space = write_space(tmp_path, "interrupted", trials=4, epochs=20, grace=20)  # 1 or 2 not begun at the interrupt
    storage = tmp_path / "results"
    on_ray = ["--address", ray_address]  # the Ray instance the tests share: the driver is what Ctrl-C stops
    driver = subprocess.Popen(search_command(space, storage, *on_ray), env=ray_env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    guard = threading.Timer(300, lambda: os.killpg(driver.pid, signal.SIGKILL))  # a hung driver fails the test
    guard.start()
    try:
        progress = []
        for line in driver.stderr:  # the live progress: interrupt right after the first trial completes
            progress.append(line)
            if re.search(r"\b[1-3] completed", line):
                break
        driver.send_signal(signal.SIGINT)  # what Ctrl-C sends
        _, rest = driver.communicate(timeout=120)
        stderr = "".join(progress) + rest
    finally:
        guard.cancel()
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert driver.returncode == 130, stderr[-2000:]
    assert not (storage / "interrupted" / "leaderboard.csv").exists()
    return space, storage, stderr, run(search_command(space, storage, "--resume", *on_ray), ray_env)


@pytest.fixture(scope="module")
def stopped_and_resumed(tmp_path_factory, ray_env, ray_address):
    """The module's two searches whose driver stops midway, killed or interrupted, then resumed (each its
    own driver, on the Ray instance the tests share), and one that asks for a trial bigger than this
    machine: at the same time, so that one's start overlaps another's trials. Name -> the future of what
    its test reads (result() raises what went wrong before)."""
    scenarios = {"killed": kill_then_resume, "interrupted": interrupt_then_resume,
                 "greedy": ask_for_more_cpus_than_this_machine_has}
    with ThreadPoolExecutor() as pool:
        return {name: pool.submit(scenario, tmp_path_factory.mktemp(name), ray_env, ray_address)
                for name, scenario in scenarios.items()}


def test_resume_after_a_killed_driver_finishes_without_repeating_trials(stopped_and_resumed):
    storage, finished, done = stopped_and_resumed["killed"].result()
    experiment, orphan, epochs = storage / "killed", storage / "killed" / ORPHAN, RESUMED_EPOCHS
    assert done.returncode == 0, done.stderr[-3000:]
    board = pd.read_csv(experiment / "leaderboard.csv", dtype={"trial": str})
    assert len(board) == 8 and board["trial"].is_unique and set(board["outcome"]) == {"completed"}
    after = trial_reports(experiment)
    for trial, lines in finished.items():  # finished before the kill: not one more report
        assert after[trial] == lines, f"finished trial {trial} ran again"
    kept = {trial: names for trial, names in checkpoints_kept(experiment).items() if trial in set(board["trial"])}
    assert len(kept) == 8 and all(len(names) == 1 for names in kept.values())  # the killed run's too
    assert not list(orphan.glob("checkpoint_*")) and (orphan / "result.json").is_file()  # its reports stay

    # Optuna: the resumed study (Tune's saved searcher) holds each of the 8 trials once, each COMPLETE.
    searcher = pickle.loads(max(experiment.glob("searcher-state-*.pkl")).read_bytes())
    study = searcher["_ot_study"]
    assert sorted(searcher["_ot_trials"]) == sorted(board["trial"])
    assert len(study.trials) == 8 and {t.state.name for t in study.trials} == {"COMPLETE"}
    assert len({t.number for t in study.trials}) == 8

    # MLflow: a restored trial went on in its own run; every epoch logged once; all runs ended.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(storage))
    experiment_id = client.get_experiment_by_name("killed").experiment_id
    runs = client.search_runs([experiment_id], filter_string="tags.`aesearch.role` = 'trial'")
    assert sorted(r.data.tags["aesearch.trial_id"] for r in runs) == sorted(board["trial"])
    from mlflow.entities import ViewType

    lost = client.search_runs([experiment_id], filter_string="tags.`aesearch.role` = 'trial'",
                              run_view_type=ViewType.DELETED_ONLY)  # begun after the last saved state
    assert all(r.info.status == "KILLED" and r.data.tags["outcome"].startswith("lost") for r in lost)
    for trial_run in runs:
        assert trial_run.info.status == "FINISHED" and trial_run.data.tags["outcome"] == "completed"
        steps = [m.step for m in client.get_metric_history(trial_run.info.run_id, "val/recon_mse")]
        assert sorted(steps) == list(range(1, epochs + 1)), trial_run.data.tags["aesearch.trial_id"]


def test_storage_that_is_not_a_writable_folder_is_refused_before_ray_starts(tmp_path, ray_env):
    space = write_space(tmp_path, "nowhere", trials=2, epochs=1, grace=1)
    (tmp_path / "a_file").write_text("keep")
    done = run(search_command(space, tmp_path / "a_file"), ray_env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"aesearch: error: --storage {tmp_path / 'a_file'}: cannot write there ({tmp_path / 'a_file'} is not a writable folder)"
    ]
    assert (tmp_path / "a_file").read_text() == "keep"


def test_storage_given_as_a_uri_is_checked_like_a_folder(small_search, tmp_path, capsys):
    """A URI (s3://, gs://, file://) is read through the filesystem Ray writes it with: the same refusals."""
    from aesearch.cli import main

    experiment, _ = small_search
    space = experiment.parent.parent / "small.yaml"
    storage = file_uri(experiment.parent)  # file:///...: the shared search's storage, as a URI
    store = ["--tracking-uri", sqlite_uri(tmp_path / "mlflow.db")]
    assert main(["search", str(space), "--storage", storage, *store]) == 2
    assert "a search named 'small' already exists" in capsys.readouterr().err
    other = write_space(tmp_path, "small", trials=3, epochs=3, grace=1)  # not the space it was launched with
    assert main(["search", str(other), "--storage", storage, "--resume", *store]) == 2
    assert f"launched with ({storage}/small/space.yaml)" in capsys.readouterr().err
    assert main(["search", str(space), "--storage", "nosuchscheme://bucket/x", *store]) == 2
    assert "--storage nosuchscheme://bucket/x: cannot read it" in capsys.readouterr().err
    for secret in ("s3://AKIAEXAMPLE:s3cr3t@bucket/x", "s3://bucket/x?access_key=AKIAEXAMPLE&secret_key=s3cr3t"):
        assert main(["search", str(space), "--storage", secret, *store]) == 2
        err = capsys.readouterr().err
        assert "credentials in the URI are refused" in err and "s3cr3t" not in err and "AKIAEXAMPLE" not in err
    assert not (tmp_path / "mlflow.db").exists()


def ask_for_more_cpus_than_this_machine_has(tmp_path: Path, ray_env: dict, ray_address: str):
    """A search of its own (on a local Ray instance it starts, not the shared one) whose trials want 64
    CPUs: (its folder, its finished process)."""
    space = write_space(tmp_path, "greedy", trials=2, epochs=1, grace=1)
    return tmp_path, run(search_command(space, tmp_path / "results", "--cpus-per-trial", "64"), ray_env, timeout=120)


def test_a_trial_bigger_than_this_machine_is_refused(stopped_and_resumed):
    tmp_path, done = stopped_and_resumed["greedy"].result()
    assert done.returncode == 2
    assert "aesearch: error: --cpus-per-trial 64 (resources.cpu): the Ray cluster has" in done.stderr
    assert not (tmp_path / "results").exists()


def test_ctrl_c_stops_the_search_and_says_how_to_resume(stopped_and_resumed):
    space, storage, stderr, done = stopped_and_resumed["interrupted"].result()
    assert f"search 'interrupted' interrupted; continue it with: aesearch search {space} --name interrupted" in stderr
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(pd.read_csv(storage / "interrupted" / "leaderboard.csv")) == 4
