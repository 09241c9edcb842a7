"""Ray Tune callbacks of the driver: progress on the terminal, each trial's run closed in MLflow and
checkpoints kept for the best trials only, superseded checkpoints pruned, finished trials' records
compacted, the first report timed.

Tune pickles them with the search and restores them on --resume: they hold only settings, and open
what they need in `setup`.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ray.tune import Callback

from aesearch.metrics import DIRECTIONS
from aesearch.search.leaderboard import outside_the_best
from aesearch.search.phases import Phases
from aesearch.search.ray_api import compact_finished_trial
from aesearch.search.space import (
    SearchSpace,
)
from aesearch.search.storage import prune_checkpoints, remove_stored_checkpoints
from aesearch.search.trial import CLOSED, UNDELIVERED
from aesearch.tracking.outbox import Outbox, describe_error, is_unreachable
from aesearch.tracking.outcomes import Outcome, is_finite_number
from aesearch.tracking.search_run import SearchRun
from aesearch.tracking.store import Tracking


class FirstReport(Callback):
    """Marks the end of the wait for the first trial's first report (workers started, imports done)."""

    def __init__(self, phases: Phases):
        self.phases, self.seen = phases, False

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not self.seen:
            self.seen = True
            self.phases.mark("to the first trial report")


ENDED_STATUSES = ("TERMINATED", "ERROR")  # Tune's trials that never run again within a Tune run


class Progress(Callback):
    """Live progress on the terminal: trials by state, and the best so far; a line when a trial ends
    or fails (at most one a second: a search of thousands of short trials would print thousands of
    lines, each counting every trial), every 10 s otherwise, and a last one when the search ends.

    It is saved with the search (Ray pickles the run's callbacks) and restored on --resume,
    so it holds no open stream and starts its counts afresh in `setup`.
    """

    def __init__(self, space: SearchSpace):
        self.metric, self.mode = space.primary.metric, space.primary.mode
        self.max_epochs = space.budget.max_epochs

    def setup(self, **info):
        self.started = time.monotonic()
        self.ended: dict[str, str] = {}  # trial id -> its outcome's kind
        self.best: tuple[float, str, str] | None = None
        self.last_line = 0.0
        self.first_live = 0  # Tune's trials before this one have all ended: a line reads from here on

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if is_finite_number(value):
            better = self.best is None or DIRECTIONS[self.mode].is_better(value, self.best[0])
            if better:
                self.best = (value, trial.trial_id, result.get("family", "?"))
        if time.monotonic() - self.last_line > 10:
            self._line(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended[trial.trial_id] = Outcome.from_report(trial.last_result or {}).kind
        if time.monotonic() - self.last_line > 1:
            self._line(trials)

    def on_experiment_end(self, trials, **info):
        self._line(trials)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._failed(trial, "retried from its last checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._failed(trial, "errored")
        self.ended[trial.trial_id] = "errored"
        if time.monotonic() - self.last_line > 1:
            self._line(trials)

    def _failed(self, trial, then: str) -> None:
        """A line for each failed attempt: what failed it (an exception, a lost node, a memory kill)."""
        raised = final_line(tracebacks(trial))[:300]
        sys.stderr.write(f"[{time.monotonic() - self.started:6.0f}s] trial {trial.trial_id} failed "
                         f"(attempt {trial.num_failures}): {raised}; {then}\n")

    def _line(self, trials) -> None:
        self.last_line = time.monotonic()
        best = f"best {self.metric} {self.best[0]:.4g} ({self.best[2]}, {self.best[1]})" if self.best else "no result yet"
        while self.first_live < len(trials) and (trials[self.first_live].trial_id in self.ended
                                                  or trials[self.first_live].status in ENDED_STATUSES):
            self.first_live += 1  # Tune lists its trials in the order they came, and an ended one stays so
        counts = progress_counts({t.trial_id: t.status for t in trials[self.first_live:]}, self.ended)
        sys.stderr.write(f"[{time.monotonic() - self.started:6.0f}s] {counts} | {best}\n")
        sys.stderr.flush()


def progress_counts(statuses: dict[str, str], ended: dict[str, str]) -> str:
    """Trials by state, from Tune's status of each (trial id -> RUNNING, PENDING, ...) and the outcome
    of those that ended (trial id -> kind). An ended trial counts by its outcome whatever its status:
    Tune calls `on_trial_complete` before it marks the trial TERMINATED, so the last line of a search
    would otherwise still count its last trial as running."""
    states = Counter(status for trial_id, status in statuses.items() if trial_id not in ended)
    outcomes = Counter(ended.values())
    return (f"{states.get('RUNNING', 0)} running, {states.get('PENDING', 0)} pending, "
            f"{outcomes.get('completed', 0)} completed, {outcomes.get('stopped', 0)} stopped early, "
            f"{outcomes.get('diverged', 0)} diverged, {outcomes.get('errored', 0)} errored")


def tracebacks(trial) -> str:
    """Tune's error file of a trial: each failed attempt so far, the last line of each saying what failed it."""
    local = trial.error_file  # written on this machine just now; storage may not have it yet
    return Path(local).read_text() if local and Path(local).is_file() else str(trial.get_error() or "")


def final_line(text: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")


MOST_WAITING = 64  # records to MLflow (~2 per trial that ends) the driver goes on with before it waits for them


class RunCloser(Callback):
    """Gives each trial's MLflow run its outcome and terminal status as soon as Tune is done with it,
    unless the trial closed it itself (it completed or diverged: `CLOSED` in its last report; one that
    ASHA stopped between two epochs or that errored cannot), and what went wrong: each failed
    attempt's traceback, and epochs whose records never reached the server. And keeps checkpoints for
    the best `budget.keep_checkpoints` finished trials only, in trial storage and in MLflow: each time
    a trial ends, the finished trials that are not (or no longer) among the best K lose theirs (errored
    trials keep theirs: a resumed search retries them from it).

    All of it is sent through one outbox, in order (a stopped trial's best checkpoint is logged before
    it can be removed), by a thread of its own: the driver starts the next trial meanwhile. While the
    tracking server does not answer, it waits there and is tried again, at the end of the search for
    up to `budget.tracking_patience_s`. Each save of the search state first waits for what is being
    delivered (`get_state`), so that a state naming a trial as ended is not ahead of its run; and the
    driver waits whenever more than `MOST_WAITING` records are, so that this wait stays short (Tune
    spaces its saves 19 times their length apart: a wait of minutes is a save every hour, all of which
    a killed driver loses).
    Pickled with the search: it holds only settings, and opens its client when the search (re)starts."""

    def __init__(self, space: SearchSpace, tracking: Tracking):
        self.metrics, self.modes, self.keep = space.metrics, space.modes, space.budget.keep_checkpoints
        self.tracking = tracking

    def setup(self, **info):
        self.runs = SearchRun(self.tracking.uri, tracking=self.tracking)
        self.outbox = Outbox(on_error=self.warn, in_background=True, most_waiting=MOST_WAITING)
        self.dropped: set[str] = set()  # trials whose checkpoints were removed (in the outbox's thread)
        self.finished: dict[str, Any] | None = None  # the finished trials still to rank (trial id -> trial)
        # One filesystem for every trial's storage: each Tune trial holds a copy of the search's, and an S3
        # one keeps a connection open once used (the driver ran out of file descriptors at 10,000 trials).
        self.filesystem = None

    def one_filesystem(self, trials_own):
        """The filesystem every trial's storage is reached through: the first trial's copy."""
        self.filesystem = self.filesystem or trials_own
        return self.filesystem

    @staticmethod
    def warn(what: str, error: Exception) -> None:  # a callback that raises would end the search
        print(f"aesearch: warning: {what}: {describe_error(error)}", file=sys.stderr)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        ended, run_id = Outcome.from_report(last), last.get("mlflow_run_id")
        if ended.kind == "stopped" and run_id and trial.checkpoint:
            checkpoint = type(trial.checkpoint)(trial.checkpoint.path, self.one_filesystem(trial.checkpoint.filesystem))
            self.outbox.send(f"the best checkpoint of trial {trial.trial_id}",
                             lambda: self.runs.log_best_checkpoint(run_id, checkpoint))
        if not last.get(CLOSED):  # else the trial closed its run itself, with this very outcome
            # A diverged trial's last epoch has no metrics by design: its loss was not a number.
            epochs = int(last.get("epoch", 0)) - (1 if ended.kind == "diverged" else 0)
            self.outbox.send(f"the outcome of trial {trial.trial_id}", lambda: self.runs.close_trial(
                trial.trial_id, ended, run_id, epochs, last.get(UNDELIVERED)))
        self._drop_checkpoints_outside_the_best(trials, trial)

    def _drop_checkpoints_outside_the_best(self, trials, ended) -> None:
        """On one objective a trial once outside the best K stays outside (the finished trials only
        grow), so only those not yet dropped are ranked, and only they are kept here: a trial's end
        costs the same at any size (reading every trial's status at each end took 3.5 ms of the
        driver's loop at 3,000 trials). With several objectives, a trial's Pareto rank depends on every
        other trial: all are ranked. The ranking runs in the outbox's thread, on the last reports as
        they are now."""
        if self.finished is None:  # the first end since the search (re)started: what a resumed search had
            self.finished = {t.trial_id: t for t in trials if t.status == "TERMINATED"}
        self.finished[ended.trial_id] = ended
        if len(self.metrics) == 1:
            for trial_id in [trial_id for trial_id in self.finished if trial_id in self.dropped]:
                del self.finished[trial_id]
        candidates = dict(self.finished)
        last_results = {trial_id: t.last_result or {} for trial_id, t in candidates.items()}
        self.outbox.send("the checkpoints of the trials outside the best",
                         lambda: self._drop_outside_the_best(candidates, last_results))

    def _drop_outside_the_best(self, candidates: dict, last_results: dict[str, dict]) -> None:
        for trial_id in outside_the_best(last_results, self.metrics, self.modes, self.keep):
            if trial_id in self.dropped:
                continue
            trial = candidates[trial_id]
            try:
                remove_stored_checkpoints(self.one_filesystem(trial.storage.storage_filesystem),
                                          trial.storage.trial_fs_path)
                last = last_results[trial_id]
                if last.get("mlflow_run_id"):
                    self.runs.remove_checkpoints(last["mlflow_run_id"], last.get("mlflow_artifact_uri"))
            except Exception as error:
                if is_unreachable(error):
                    raise  # the outbox tries again later
                self.warn(f"the removal of trial {trial_id}'s checkpoints", error)  # disk space is not worth a search
            self.dropped.add(trial_id)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._log_errors(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        raised = final_line(self._log_errors(trial))
        ended = Outcome("errored", detail=f"after {trial.num_failures} attempts: {raised[:300]}")
        self.outbox.send(f"the outcome of trial {trial.trial_id}", lambda: self.runs.close_trial(
            trial.trial_id, ended, (trial.last_result or {}).get("mlflow_run_id")))

    def _log_errors(self, trial) -> str:
        """Tune's error file of the trial (every failed attempt so far), logged to its run."""
        text = tracebacks(trial)
        run_id, attempts = (trial.last_result or {}).get("mlflow_run_id"), trial.num_failures
        if run_id and text:
            self.outbox.send(f"the tracebacks of trial {trial.trial_id}",
                             lambda: self.runs.log_errors(run_id, text, attempts))
        return text

    def get_state(self) -> None:
        self.outbox.flush()  # unless the server does not answer (then it waits for the next save)
        return None  # what is sent is in MLflow, not in the search state

    def on_experiment_end(self, trials, **info):
        # Tune then reads every trial's result file, each through its trial's own copy of the filesystem: on
        # S3 a connection per trial, 10,000 open at once at the end of a 10,000-trial search (EMFILE).
        for trial in trials:
            if trial.storage is not None:
                trial.storage.storage_filesystem = self.one_filesystem(trial.storage.storage_filesystem)
        if not self.outbox.deliver(self.tracking.patience_s):
            print(f"aesearch: warning: the tracking server {self.tracking.uri} did not take "
                  f"{self.outbox.undelivered()}", file=sys.stderr)


class CompactFinished(Callback):
    """Each finished trial's Tune record keeps only what is read again (see `compact_finished_trial`):
    the last result (the leaderboard), the statistics of the search's objectives, the latest checkpoint.
    What the driver holds per finished trial, and every save of the search state, shrinks to what a
    search of 10,000 trials can carry."""

    def __init__(self, space: SearchSpace):
        self.objectives = set(space.metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        compact_finished_trial(trial, self.objectives)

    def on_trial_error(self, iteration, trials, trial, **info):
        compact_finished_trial(trial, self.objectives)


# Of the driver's time, at most, spent pruning checkpoints during a search: at 10,000 trials a pruning
# (~1 s) then waits ~50 s, and the running trials' checkpoints of those seconds wait with it.
PRUNING_SHARE = 0.02


class CheckpointPruner(Callback):
    """Prunes superseded trial checkpoints at each save of the search state (Tune's `get_state` hook).

    Ray's own `CheckpointConfig(num_to_keep)` deletes a checkpoint the moment a newer one is
    reported, before the search state naming the newer one has reached storage (that upload runs
    in the background and is skipped while an earlier one still runs): a driver killed in between
    leaves trials that `--resume` cannot restore. See `prune_checkpoints` for the safe rule.
    """

    def __init__(self, experiment_path: str):
        self.experiment_path = experiment_path

    def setup(self, **info):
        self.seen: set[int] = set()  # the stored trial records pruned to (prune_checkpoints)
        self.next_at = 0.0  # time.monotonic() of the next pruning

    def get_state(self) -> None:
        """Prunes, at most `PRUNING_SHARE` of the time: it reads the stored search state back, which
        grows with the trials (~100 MB at 10,000; it took ~1 s, 5-8% of the driver's loop, when it ran at
        every save and decoded every trial's record). The search's end prunes whatever is left."""
        if time.monotonic() >= self.next_at:
            started = time.monotonic()
            try:
                prune_checkpoints(self.experiment_path, seen=self.seen)
            except OSError:  # the storage stopped answering: Tune would end the search; the next save retries
                pass
            self.next_at = time.monotonic() + (time.monotonic() - started) / PRUNING_SHARE
        return None  # the pruner keeps no state of its own
