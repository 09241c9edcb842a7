"""The search's pure logic, without a Ray cluster: outcomes as data, the one ranking, the leaderboard
from Tune's results, the metric catalogue's say in reproductions."""

import inspect
import logging
import math
import threading
import time

import pandas as pd
import pytest
from ray.tune import Result
from ray.tune import tune as tune_module

from aesearch.metrics import (
    ALWAYS_PER_EPOCH,
    USE_METRICS,
    is_epoch_objective,
    lookup,
    ranked_metrics,
    resolved,
    selection_key,
)
from aesearch.results.reproduce import OTHER_DEVICE_TYPE, allowed, compared
from aesearch.results.tables import leaderboard as report_leaderboard
from aesearch.search.callbacks import Progress, progress_counts
from aesearch.search.leaderboard import format_leaderboard, leaderboard, nothing_ran, outside_the_best, rank
from aesearch.search.space import parse_space
from aesearch.search.staging import StartClaim
from aesearch.search.storage import FinalUploadWatch
from aesearch.tracking.outcomes import KINDS, REPORTED, Outcome, counted

EVERY_OUTCOME = [Outcome("completed"), Outcome("stopped", 5), Outcome("diverged", 1), Outcome("invalid", detail="x"),
                 Outcome("errored", detail="after 3 attempts: ValueError: boom"), Outcome("not started"),
                 Outcome("lost", detail="the search state was saved before this trial began")]


@pytest.mark.parametrize("outcome", EVERY_OUTCOME, ids=lambda o: o.kind)
def test_an_outcome_is_read_back_from_its_tags_whatever_its_words(outcome):
    tags = outcome.tags()
    assert Outcome.from_tags(tags) == outcome
    reworded = {**tags, "outcome": "some other wording"}  # people's words are never parsed back
    assert Outcome.from_tags(reworded) == outcome


def test_words_are_made_from_the_data():
    assert Outcome("stopped", 5).words() == "stopped early at epoch 5"
    assert Outcome("diverged", 1).words() == "diverged at epoch 1"
    assert Outcome("errored", detail="after 3 attempts: X").words() == "errored after 3 attempts: X"
    assert Outcome.from_tags({"outcome": "completed"}) is None  # words alone are not an outcome
    with pytest.raises(ValueError, match="not one of"):
        Outcome("finished")


def test_the_outcome_of_a_trial_from_its_last_report():
    assert Outcome.from_report({"epoch": 4.0, REPORTED["completed"]: 1.0}) == Outcome("completed")
    assert Outcome.from_report({"epoch": 2.0}) == Outcome("stopped", 2)
    assert Outcome.from_report({"epoch": 3.0, REPORTED["diverged"]: 1.0}) == Outcome("diverged", 3)
    assert Outcome.from_report({"epoch": 0.0, REPORTED["invalid"]: 1.0, "error": "bad"}).kind == "invalid"
    assert Outcome.from_report({}) == Outcome("not started")
    assert Outcome.from_report({"epoch": 2.0}, RuntimeError("x")).kind == "errored"
    assert set(KINDS) == {o.kind for o in EVERY_OUTCOME}


def trials(*rows):
    return pd.DataFrame([{"name": n, "state": s, "objective": v, "number": i} for i, (n, s, v) in enumerate(rows)])


def test_only_trials_that_trained_to_an_end_are_ranked_best_first():
    board = rank(trials(("a", "completed", 0.3), ("b", "errored", 0.01), ("c", "stopped", 0.2),
                        ("d", "diverged", math.inf), ("e", "completed", math.nan), ("f", "completed", 0.1)),
                 ["objective"], ["min"], tiebreak="number")
    assert board["name"].tolist() == ["f", "c", "a", "b", "d", "e"]
    assert board["rank"].tolist()[:3] == [1, 2, 3] and board["rank"][3:].isna().all()
    best_first = rank(trials(("a", "completed", 0.3), ("f", "completed", 0.1)), ["objective"], ["max"])
    assert best_first["name"].tolist() == ["a", "f"]


def test_the_report_ranks_as_the_search_does():
    table = trials(("a", "completed", 0.3), ("b", "errored", 0.01), ("c", "stopped", 0.2), ("d", "completed", 0.2))
    board = report_leaderboard(table, [("val/recon_mse", "min")])
    assert board["name"].tolist() == ["c", "d", "a"] and board["rank"].tolist() == [1, 2, 3]  # ties: trial number


SPACE = parse_space({"name": "s", "space": {"model.latent_dim": {"type": "categorical", "choices": [8, 16]}},
                     "budget": {"num_samples": 3}})


def result(metrics, error=None):
    return Result(metrics=metrics, checkpoint=None, error=error, path="/tmp/run_x")


def test_the_search_leaderboard_from_tunes_results():
    results = [result({"trial_id": "t1", "epoch": 2.0, "val/recon_mse": 0.5, "family": "dense"}, None),
               result({"trial_id": "t2", "epoch": 4.0, "val/recon_mse": 0.2, REPORTED["completed"]: 1.0}, None),
               result({"trial_id": "t3", "epoch": 1.0, "val/recon_mse": 0.01}, RuntimeError("lost node"))]
    board = leaderboard(results, SPACE)
    assert board["trial"].tolist() == ["t2", "t1", "t3"]
    assert board["state"].tolist() == ["completed", "stopped", "errored"]
    assert board["outcome"].tolist()[1] == "stopped early at epoch 2" and board["rank"].tolist()[:2] == [1, 2]
    assert not nothing_ran(board)
    assert nothing_ran(leaderboard([results[2]], SPACE)) and nothing_ran(leaderboard([], SPACE))


def test_the_search_summary_counts_outcomes_in_the_words_used_elsewhere():
    results = [result({"trial_id": f"s{i}", "epoch": 1.0, "val/recon_mse": 0.5}) for i in range(2)]
    results.append(result({"trial_id": "c", "epoch": 4.0, "val/recon_mse": 0.2, REPORTED["completed"]: 1.0}))
    summary = format_leaderboard(leaderboard(results, SPACE), SPACE, "here")
    assert "\n3 trials: 2 stopped early, 1 completed\n" in summary
    assert counted(["completed"]) == "1 completed" and counted([]) == "none"


def test_every_leaderboard_shows_the_test_counterpart_of_each_objective_the_search_ranks_on():
    """A `use: clustering` search ranks on val/cluster_ari: its leaderboard shows test/cluster_ari, where a
    fixed list of columns showed the reconstruction error, PSNR and the probe only."""
    from aesearch.metrics import board_metrics

    space = parse_space({"name": "s", "use": "clustering", "budget": {"num_samples": 2}})
    results = [result({"trial_id": f"t{i}", "epoch": 3.0, "val/cluster_ari": ari, "test/cluster_ari": ari - 0.05,
                       "test/recon_mse": 0.1, "test/cluster_nmi": 0.5, "model/parameters": 70657.0,
                       REPORTED["completed"]: 1.0})
               for i, ari in enumerate([0.6, 0.8])]
    board = leaderboard(results, space)
    assert board["test/cluster_ari"].tolist() == pytest.approx([0.75, 0.55])  # best first
    printed = format_leaderboard(board, space, "here")
    header = printed.split("best trials")[1].splitlines()[1]
    assert " 70657\n" in printed and "e+04" not in printed  # a count prints whole
    assert header.split().index("test/cluster_ari") < header.split().index("test/recon_mse")
    assert "test/cluster_nmi" not in header and "test/psnr" not in header  # not an objective; no trial has it
    assert board_metrics(["val/loss"]) == board_metrics([])  # no test counterpart: the catalogue's columns only
    assert board_metrics(["val/nll", "val/recon_mse"])[:2] == ["test/nll", "test/recon_mse"]


def test_the_last_progress_line_counts_a_trial_tune_is_ending_as_ended():
    # Tune calls on_trial_complete while the trial's status is still RUNNING: the line counts it by its outcome.
    statuses = {f"t{i}": "TERMINATED" for i in range(9)} | {"t9": "RUNNING"}
    ended = {f"t{i}": "stopped" if i < 7 else "completed" for i in range(10)}
    assert progress_counts(statuses, ended) == ("0 running, 0 pending, 3 completed, 7 stopped early, 0 diverged, "
                                                "0 errored")
    assert progress_counts({"a": "RUNNING", "b": "PENDING", "c": "ERROR"}, {"c": "errored"}) == (
        "1 running, 1 pending, 0 completed, 0 stopped early, 0 diverged, 1 errored")


def test_thousands_of_trials_ending_at_once_print_a_line_a_second_and_the_search_its_last(capsys):
    """Each progress line counts every trial: one per trial that ends would be thousands of lines, each
    slower than the last. A line a second at most, and one when the search ends (Tune's cleanup)."""
    class Trial:
        def __init__(self, number: int):
            self.trial_id, self.status, self.last_result = f"t{number}", "RUNNING", {REPORTED["completed"]: 1.0}

    progress = Progress(SPACE)
    progress.setup()
    trials = [Trial(i) for i in range(2000)]
    for trial in trials:
        progress.on_trial_complete(0, trials, trial)
        trial.status = "TERMINATED"
    lines = capsys.readouterr().err.splitlines()
    assert 1 <= len(lines) <= 3  # the first, and one a second while 2,000 trials end
    progress.on_experiment_end(trials)
    (last,) = capsys.readouterr().err.splitlines()
    assert "] 0 running, 0 pending, 2000 completed, 0 stopped early" in last


def test_a_progress_line_reads_only_the_trials_that_have_not_ended(capsys):
    """Tune lists every trial of the search; a line counts from the first one that has not ended (at
    10,000 trials, reading every status each second was 5% of the driver's loop). Trials ended before a
    resume (TERMINATED, not seen ending) are skipped too, and the counts stay those of every trial."""
    class Trial:
        reads = 0

        def __init__(self, number: int, status: str):
            self.trial_id, self._status, self.last_result = f"t{number}", status, {REPORTED["completed"]: 1.0}

        @property
        def status(self) -> str:
            Trial.reads += 1
            return self._status

    progress = Progress(SPACE)
    progress.setup()
    trials = [Trial(i, "TERMINATED") for i in range(1000)] + [Trial(i, "RUNNING") for i in range(1000, 3000)]
    for trial in trials[1000:2990]:
        progress.on_trial_complete(0, trials, trial)
        trial._status = "TERMINATED"
    trials[2995]._status = "PENDING"
    Trial.reads = 0
    progress.on_experiment_end(trials)
    (last,) = capsys.readouterr().err.splitlines()[-1:]
    assert "] 9 running, 1 pending, 1990 completed, 0 stopped early" in last
    assert Trial.reads <= 2 * 10 + 1  # the ten live trials (and the one that stops the skipping), not 3,000


def test_the_checkpoint_pruner_takes_at_most_its_share_of_the_drivers_time(monkeypatch):
    """Pruning reads the stored search state back, which grows with the trials: it runs at a save of
    the state only once its last duration / PRUNING_SHARE has passed."""
    from aesearch.search import callbacks

    times: list[float] = []  # when it pruned

    def slow_prune(experiment_path: str, seen: set | None = None) -> None:
        times.append(time.monotonic())
        time.sleep(0.02)

    monkeypatch.setattr(callbacks, "prune_checkpoints", slow_prune)
    monkeypatch.setattr(callbacks, "PRUNING_SHARE", 0.05)
    pruner = callbacks.CheckpointPruner("/nowhere")
    pruner.setup()
    started = time.monotonic()
    while time.monotonic() - started < 1.5:  # a save of the search state every 10 ms
        pruner.get_state()
        time.sleep(0.01)
    assert 2 <= len(times) <= 5  # every 0.4 s (0.02 s / 0.05), not at each of ~100 saves
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.02 / callbacks.PRUNING_SHARE - 0.01


def test_the_catalogue_knows_every_metric_a_search_ranks_on_and_how_to_compare_them():
    assert all(lookup(name) is not None and is_epoch_objective(name) for name in ALWAYS_PER_EPOCH + USE_METRICS)
    assert [lookup(name).mode for name in ("val/anomaly_auroc", "val/cluster_ari", "val/nll", "val/elbo")] == [
        "max", "max", "min", "max"]
    assert lookup("val/denoise_psnr_masking").mode == "max" and lookup("val/denoise_mse_swap").mode == "min"
    assert is_epoch_objective("val/denoise_psnr_gaussian") and not is_epoch_objective("val/denoise_psnr_")
    assert not is_epoch_objective("test/recon_mse") and not is_epoch_objective("val/whatever")
    assert lookup("test/denoise_psnr_gaussian").mode == "max" and "gaussian" in lookup("test/denoise_psnr_gaussian").description
    assert lookup("no/such") is None
    assert list(ranked_metrics(["test/psnr", "test/denoise_psnr_masking", "test/recon_mse", "val/loss"])) == [
        "test/recon_mse", "test/psnr", "test/denoise_psnr_masking"]
    assert allowed("model/parameters", OTHER_DEVICE_TYPE) == 0.0
    assert allowed("test/cluster_ari", OTHER_DEVICE_TYPE) == OTHER_DEVICE_TYPE.score_atol
    assert allowed("test/active_units", OTHER_DEVICE_TYPE) == OTHER_DEVICE_TYPE.count_atol
    assert allowed("val/kl", OTHER_DEVICE_TYPE) == OTHER_DEVICE_TYPE.rtol
    assert not compared("time/train_seconds") and not compared("epoch") and compared("test/nll")


def test_only_the_best_ended_trials_keep_their_checkpoints():
    ended = {"a": {"epoch": 4.0, "loss": 0.3, REPORTED["completed"]: 1.0}, "b": {"epoch": 2.0, "loss": 0.1},
             "c": {"epoch": 1.0, "loss": math.inf, REPORTED["diverged"]: 1.0}, "d": {"epoch": 4.0, "loss": 0.2,
                                                                                  REPORTED["completed"]: 1.0}}
    assert sorted(outside_the_best(ended, ["loss"], ["min"], keep=2)) == ["a", "c"]
    assert sorted(outside_the_best(ended, ["loss"], ["max"], keep=1)) == ["b", "c", "d"]
    assert outside_the_best({}, ["loss"], ["min"], keep=2) == []


def test_a_tie_is_equality_at_the_metrics_resolution_and_val_loss_breaks_it():
    # a score in [0, 1] resolves to a thousandth; a continuous metric to four significant figures
    auroc, mse = ("val/anomaly_auroc", "val/recon_mse")
    assert resolved(auroc, 0.9996) == resolved(auroc, 1.0) != resolved(auroc, 0.998)
    assert resolved(mse, 0.0123401) == resolved(mse, 0.0123399) != resolved(mse, 0.01235)
    assert resolved("model/latent_dim", 7.0) == 7.0 and math.isinf(resolved("val/loss", math.inf))

    def key(auroc, loss):
        return selection_key("val/anomaly_auroc", {"val/anomaly_auroc": auroc, "val/loss": loss})

    assert key(0.9996, 1.5) < key(1.0, 5.3)  # tied: the lower val/loss is the better epoch
    assert key(1.0, 5.3) < key(0.99, 1.0)  # higher AUROC is better, whatever the loss
    assert key(1.0, 5.3) == key(1.0, 5.3)  # nothing better: the earlier epoch stays kept
    assert selection_key("val/loss", {"val/loss": 2.0}) < selection_key("val/loss", {"val/loss": 2.5})


def tied(*rows):
    """Trials of an anomaly search: (name, state, val/anomaly_auroc, best/val/loss, last val/loss)."""
    return pd.DataFrame([{"name": n, "state": s, "objective": v, "best/val/loss": best, "val/loss": last, "number": i}
                         for i, (n, s, v, best, last) in enumerate(rows)])


def test_trials_that_tie_on_the_objective_are_ranked_by_the_val_loss_of_their_kept_epoch():
    table = tied(("a", "completed", 1.0, 5.3, 1.5), ("b", "completed", 0.9996, 1.6, 1.6),
                 ("c", "stopped", 1.0, math.nan, 2.0), ("d", "completed", 0.98, 0.1, 0.1),
                 ("e", "completed", 1.0, 1.2, 1.2))
    board = report_leaderboard(table, [("val/anomaly_auroc", "max")])
    assert board["name"].tolist() == ["e", "b", "c", "a", "d"]  # a stopped trial: its last val/loss
    assert board["rank"].tolist() == [1, 2, 3, 4, 5]

    space = parse_space({"name": "s", "space": {"model.latent_dim": {"type": "categorical", "choices": [8, 16]}},
                         "objective": {"metric": "val/anomaly_auroc"}, "data": {"name": "digits", "anomaly": [0]}})
    done = {REPORTED["completed"]: 1.0, "epoch": 4.0}
    results = [result({"trial_id": "t1", "val/anomaly_auroc": 1.0, "val/loss": 1.5, "best/val/loss": 5.3, **done}),
               result({"trial_id": "t2", "val/anomaly_auroc": 1.0, "val/loss": 1.4, "best/val/loss": 1.4, **done}),
               result({"trial_id": "t3", "val/anomaly_auroc": 1.0, "val/loss": 1.9, "epoch": 1.0})]
    board = leaderboard(results, space)
    assert board["trial"].tolist() == ["t2", "t3", "t1"]
    summary = format_leaderboard(board, space, where="x")
    assert "3 trials tie at val/anomaly_auroc = 1.000, the best it can be; ranked by val/loss" in summary
    header, *rows = summary.split("best trials")[1].splitlines()[1:5]
    assert header.split()[4:6] == ["val/anomaly_auroc", "val/loss"]  # what ranked them, beside the objective
    assert [row.split()[-1] for row in rows] == ["1.4", "1.9", "5.3"]

    last = {r.metrics["trial_id"]: r.metrics for r in results}
    assert outside_the_best(last, ["val/anomaly_auroc"], ["max"], keep=1) == ["t3", "t1"]


def test_the_summary_says_nothing_of_ties_where_the_leader_stands_alone():
    space = parse_space({"name": "s", "space": {"model.latent_dim": {"type": "categorical", "choices": [8, 16]}},
                         "objective": {"metric": "val/anomaly_auroc"}, "data": {"name": "digits", "anomaly": [0]}})
    done = {REPORTED["completed"]: 1.0, "epoch": 4.0}
    results = [result({"trial_id": "t1", "val/anomaly_auroc": 0.97, "val/loss": 1.5, **done}),
               result({"trial_id": "t2", "val/anomaly_auroc": 0.91, "val/loss": 1.0, **done})]
    assert "tie" not in format_leaderboard(leaderboard(results, space), space, where="x")


def test_searches_of_one_name_started_at_once_get_tunes_staging_folder_each_in_a_second_of_its_own(tmp_path):
    """Tune names a search's staging folder by the second it starts and the search's name: drivers of
    one name that start together must each start Tune in another second; other names do not wait."""
    started: dict[str, list[int]] = {"same": [], "other": []}
    at_once = threading.Barrier(4)

    def claim(name: str):
        at_once.wait()
        with StartClaim(name, tmp_path):
            started[name].append(int(time.time()))  # Tune would name its folder now

    threads = [threading.Thread(target=claim, args=(name,)) for name in ("same", "same", "same", "other")]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    threads[-1].join()
    other_took = time.monotonic() - began
    for thread in threads:
        thread.join()
    assert len(set(started["same"])) == 3, started
    assert other_took < 1.0, other_took


def test_the_watch_hears_tunes_failed_last_upload_of_the_search_state_and_nothing_else():
    """Ray Tune only logs it when its last upload of the search's state fails (the driver then uploads
    that state again): the very words it logs (ray/tune/tune.py), and no other line, set the watch off."""
    assert f'"{FinalUploadWatch.MESSAGE}:"' in inspect.getsource(tune_module)
    tune_logger = logging.getLogger(FinalUploadWatch.LOGGER)
    with FinalUploadWatch() as watch:
        tune_logger.error("Saving experiment state to storage at 's3://b/x' failed with exception: ")
        tune_logger.warning(f"{FinalUploadWatch.MESSAGE}: a warning is not the failure")
        assert not watch.failed
        tune_logger.error(f"{FinalUploadWatch.MESSAGE}:")
        assert watch.failed
    assert watch not in tune_logger.handlers  # heard only while the search runs


@pytest.mark.parametrize("every_s", [0.0, 3600.0])
def test_a_trials_reports_carry_its_checkpoint_as_often_as_the_budget_says_and_its_best_epoch_always(tmp_path, every_s):
    """budget.checkpoint_every_s: 0 stores a checkpoint with every epoch; an hour stores the first epoch's
    and the last's only. Either way the last one carries the best epoch so far, even one that fell
    between the stored checkpoints."""
    from pathlib import Path

    from aesearch.search.trial import CHECKPOINT_FILE, TuneReporter
    from aesearch.training.checkpoints import BEST_FILE
    from aesearch.training.trainer import EpochEnd

    carried = []  # (epoch, what its checkpoint's files hold), or (epoch, None)

    def report(metrics, folder=None):
        files = {p.name: p.read_text() for p in Path(folder).iterdir()} if folder else None
        carried.append((metrics["epoch"], files))

    reporter = TuneReporter({}, epochs=5, track=lambda end: None, checkpoint_every_s=every_s)
    reporter.report = report
    for epoch, is_best in zip(range(1, 6), [True, True, False, True, False]):
        def save(path, epoch=epoch):
            Path(path).write_text(f"epoch {epoch}")
        reporter(EpochEnd(epoch, {"epoch": float(epoch)}, is_best, save, None))
    last_metrics, last_folder = reporter.held  # the last epoch waits for the test metrics
    with last_folder:
        report(last_metrics, last_folder.name)
    stored = [epoch for epoch, files in carried if files is not None]
    assert stored == ([1.0, 2.0, 3.0, 4.0, 5.0] if every_s == 0 else [1.0, 5.0])
    assert [epoch for epoch, _ in carried] == [1.0, 2.0, 3.0, 4.0, 5.0]  # every epoch is reported
    assert carried[-1][1] == {CHECKPOINT_FILE: "epoch 5", BEST_FILE: "epoch 4"}
