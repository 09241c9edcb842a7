"""`aesearch search`: a search space becomes Optuna TPE + ASHA trials on Ray Tune.

The driver loads the dataset once and hands it to every trial through Ray's object store
(`tune.with_parameters`); a trial is `run_trial`, a thin adapter around the one trainer
(`aesearch.train.train`) that reports each epoch to Tune with a checkpoint, so ASHA can stop it
and a failed or interrupted trial continues from where it was. Actors are reused across trials,
so a trial pays neither a process start nor `import torch`.

    STORAGE/NAME/                Ray Tune's experiment folder (searcher state, trial folders)
    STORAGE/NAME/space.yaml      the search space as launched (a resumed search must match it)
    STORAGE/NAME/leaderboard.csv every trial: outcome, objective, test metrics, parameters
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Set before Ray is imported and started (its workers inherit them). Ray's own terminal output,
# loggers and working-directory changes, off: aesearch prints its own progress, writes its own
# leaderboard, and trials keep the driver's working directory. And workers run in this very
# Python environment: under `uv run`, Ray would otherwise start them with `uv run` in a copy of
# the working directory that has no virtual environment.
RAY_SETTINGS = {
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_DEDUP_LOGS": "0",
}
for _key, _value in RAY_SETTINGS.items():
    os.environ.setdefault(_key, _value)

import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune import Callback  # noqa: E402
from ray.tune.logger import JsonLoggerCallback  # noqa: E402
from ray.tune.schedulers import ASHAScheduler  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from aesearch.checkpoints import load_checkpoint  # noqa: E402
from aesearch.config import variant_family  # noqa: E402
from aesearch.data import Data, load_data  # noqa: E402
from aesearch.errors import ConfigError, DivergedError, UserError  # noqa: E402
from aesearch.space import DefineByRun, SearchSpace, decode_params, start_points, trial_config  # noqa: E402
from aesearch.train import EpochEnd, train  # noqa: E402

CHECKPOINT_FILE = "checkpoint.pt"

@dataclass
class SearchOptions:
    name: str
    storage: str  # a local folder (absolute) or a URI such as s3://bucket/prefix
    address: str | None = None
    data_dir: Path | None = None
    download: bool = False
    resume: bool = False
    reuse_actors: bool = True  # False only to measure what reuse saves (benchmarks/)


# --- inside a trial ---------------------------------------------------------------------------


class TuneReporter:
    """Reports each epoch to Tune with a checkpoint of the run (what ASHA and retries need).

    The last epoch is held back: `run_trial` reports it together with the evaluation suite's
    test metrics, because ASHA stops a trial the moment it reports its final epoch.
    """

    def __init__(self, extra: dict[str, Any], epochs: int):
        self.extra, self.epochs = extra, epochs
        self.held: tuple[dict[str, float], tempfile.TemporaryDirectory] | None = None
        self.started = time.perf_counter()

    def __call__(self, end: EpochEnd) -> None:
        folder = tempfile.TemporaryDirectory()
        end.save_checkpoint(Path(folder.name) / CHECKPOINT_FILE)
        if end.epoch == self.epochs:
            self.held = (end.metrics, folder)
            return
        with folder:
            self.report(end.metrics, folder.name)

    def report(self, metrics: dict[str, Any], checkpoint_folder: str | None = None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_folder) if checkpoint_folder else None
        elapsed = {"time/trial_seconds": time.perf_counter() - self.started}  # in this trial process
        tune.report({**metrics, **self.extra, **elapsed}, checkpoint=checkpoint)


def run_trial(params: dict[str, Any], data: Data, space: SearchSpace) -> None:
    """The Ray Tune trainable: one trial of the search, trained by the one trainer."""
    worst = math.inf if space.objective.mode == "min" else -math.inf
    try:
        config = trial_config(space, decode_params(space, params))
    except ConfigError as error:  # conditions that overlap: not worth retrying
        tune.report({"epoch": 0.0, space.objective.metric: worst, "outcome/invalid": 1.0, "error": str(error)[:500]})
        return
    if config.runtime.device == "auto":
        # Ray hides no GPU from a trial that asked for none: use one only if it was given one.
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        config = config.model_copy(update={"runtime": config.runtime.model_copy(update={"device": device})})
    reporter = TuneReporter(
        {"family": variant_family(config), "node": ray.get_runtime_context().get_node_id()}, config.epochs
    )
    resume_state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # a retry after a failure, or a resumed search
        with checkpoint.as_directory() as folder:
            resume_state = load_checkpoint(Path(folder) / CHECKPOINT_FILE)
    try:
        result = train(config, data, reporter, resume_from=resume_state)
    except DivergedError as error:
        reporter.report({"epoch": float(error.epoch), space.objective.metric: worst, "outcome/diverged": 1.0})
        return
    final = {**result.history[-1], **result.metrics, "outcome/completed": 1.0}
    if reporter.held is None:  # resumed after the last epoch: nothing left to train
        reporter.report(final)
        return
    with reporter.held[1] as folder:
        reporter.report(final, folder)


# --- the driver -------------------------------------------------------------------------------


def experiment_folder(options: SearchOptions) -> str:
    return f"{options.storage.rstrip('/')}/{options.name}"


def check_can_start(space: SearchSpace, options: SearchOptions) -> None:
    """Refuse, before anything is written, a search that would clobber or mismatch another."""
    if "://" in options.storage:
        return  # remote storage: Ray checks it when the search starts
    folder = Path(experiment_folder(options))
    existing = next(parent for parent in folder.parents if parent.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"--storage {options.storage}: cannot write there ({existing} is not a writable folder)")
    launched = folder / "space.yaml"
    if options.resume:
        if not folder.is_dir() or not launched.is_file():
            raise UserError(f"--resume: no search named {options.name!r} under {options.storage}")
        if yaml.safe_load(launched.read_text(encoding="utf-8")) != space.model_dump(mode="json"):
            raise UserError(
                f"--resume: the search space differs from the one search {options.name!r} was "
                f"launched with ({launched}); resume with that space or start a new --name"
            )
    elif folder.exists():
        raise UserError(
            f"a search named {options.name!r} already exists under {options.storage}; continue it "
            "with --resume or start another with --name"
        )


def search(space: SearchSpace, options: SearchOptions) -> pd.DataFrame:
    """Run (or resume) the search; returns the leaderboard of every trial."""
    check_can_start(space, options)
    data = load_data(space.data, options.data_dir, options.download)
    connect(options.address)
    try:
        check_resources(space, local=options.address is None)
        results = _fit(space, options, data)
    finally:
        ray.shutdown()
    if interrupted(space, options):
        raise SearchInterrupted(options.name)
    board = leaderboard(results, space)
    if "://" not in options.storage:
        board.to_csv(Path(experiment_folder(options)) / "leaderboard.csv", index=False)
    return board


class SearchInterrupted(Exception):
    """The search was stopped (Ctrl-C) before its trials ended; `--resume` continues it."""


def interrupted(space: SearchSpace, options: SearchOptions) -> bool:
    """Did Tune stop on Ctrl-C? It returns normally then; the saved state tells: trials it put
    back to pending, or fewer trials than asked for with no time budget to explain it."""
    saved = tune.ExperimentAnalysis(experiment_folder(options)).trials
    unfinished = any(trial.status not in ("TERMINATED", "ERROR") for trial in saved)
    return unfinished or (len(saved) < space.budget.num_samples and space.budget.time_budget_s is None)


def check_resources(space: SearchSpace, local: bool) -> None:
    """A trial that asks for more than any machine has would wait forever: refuse it."""
    available = ray.cluster_resources()
    for kind, asked in (("CPU", space.resources.cpu), ("GPU", space.resources.gpu)):
        have = available.get(kind, 0.0)
        if asked > have:
            flag = "--cpus-per-trial" if kind == "CPU" else "--gpus-per-trial"
            message = f"{flag} {asked:g} (resources.{kind.lower()}): the Ray cluster has {have:g} {kind}s in all"
            if local:
                raise UserError(message)
            print(f"aesearch: warning: {message}; trials wait until the cluster grows", file=sys.stderr)


def connect(address: str | None) -> None:
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING, "configure_logging": True}
    if not address:
        ray.init(include_dashboard=False, **quiet)
        return
    check_reachable(address)
    # An explicit address does not turn Ray's token authentication on by itself: keep it on.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ray.exceptions.RayError) as error:
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise UserError(
            f"--address {address}: cannot connect to the Ray cluster (is it running, and does this "
            f"machine have its token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token?): {reason}"
        ) from None


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at a cluster address (Ray retries)."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address}: expected HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise UserError(f"--address {address}: no Ray cluster answers there ({error.strerror or error})") from None


def _fit(space: SearchSpace, options: SearchOptions, data: Data):
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, data=data, space=space),
        {"cpu": space.resources.cpu, "gpu": space.resources.gpu},
    )
    path = experiment_folder(options)
    if options.resume:  # the searcher's state, the trials and their checkpoints come back
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        searcher = OptunaSearch(
            DefineByRun(space),
            metric=space.objective.metric,
            mode=space.objective.mode,
            sampler=optuna.samplers.TPESampler(seed=space.seed),
            points_to_evaluate=start_points(space) or None,
        )
        budget = space.budget
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=budget.max_epochs,
            grace_period=budget.grace_period,
            reduction_factor=budget.reduction_factor,
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=space.objective.metric,
                mode=space.objective.mode,
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=budget.num_samples,
                max_concurrent_trials=space.max_concurrent,
                time_budget_s=budget.time_budget_s,
                reuse_actors=options.reuse_actors,
            ),
            run_config=tune.RunConfig(
                name=options.name,
                storage_path=options.storage,
                failure_config=tune.FailureConfig(max_failures=budget.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[JsonLoggerCallback(), Progress(space)],
                verbose=0,
            ),
        )
        if "://" not in options.storage:
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "space.yaml").write_text(
                yaml.safe_dump(space.model_dump(mode="json"), sort_keys=False), encoding="utf-8"
            )
    return tuner.fit()


# --- what the user sees -----------------------------------------------------------------------


def outcome_kind(outcome: str) -> str:
    """'stopped early at epoch 5' -> 'stopped early': the outcome without its epoch."""
    return outcome.split(" at epoch")[0]


def outcome(last: dict[str, Any], error: Exception | None) -> str:
    """How a trial ended, from its last report."""
    if error is not None:
        return "errored"
    if last.get("outcome/invalid"):
        return "invalid config"
    if last.get("outcome/diverged"):
        return f"diverged at epoch {int(last.get('epoch', 0))}"
    if last.get("outcome/completed"):
        return "completed"
    if "epoch" not in last:
        return "not started"
    return f"stopped early at epoch {int(last['epoch'])}"


class Progress(Callback):
    """Live progress on the terminal: trials by state, and the best so far.

    It is saved with the search (Ray pickles the run's callbacks) and restored on --resume,
    so it holds no open stream and starts its counts afresh in `setup`.
    """

    def __init__(self, space: SearchSpace):
        self.metric, self.mode = space.objective.metric, space.objective.mode
        self.max_epochs = space.budget.max_epochs

    def setup(self, **info):
        self.started = time.monotonic()
        self.ended: dict[str, str] = {}
        self.best: tuple[float, str, str] | None = None
        self.last_line = 0.0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if isinstance(value, int | float) and math.isfinite(value):
            better = self.best is None or (value < self.best[0] if self.mode == "min" else value > self.best[0])
            if better:
                self.best = (value, trial.trial_id, result.get("family", "?"))
        if time.monotonic() - self.last_line > 10:
            self._line(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended[trial.trial_id] = outcome(trial.last_result or {}, None)
        self._line(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended[trial.trial_id] = "errored"
        self._line(trials)

    def _line(self, trials) -> None:
        self.last_line = time.monotonic()
        states = Counter(trial.status for trial in trials)
        ended = Counter(outcome_kind(state) for state in self.ended.values())
        best = f"best {self.metric} {self.best[0]:.4g} ({self.best[2]}, {self.best[1]})" if self.best else "no result yet"
        sys.stderr.write(
            f"[{time.monotonic() - self.started:6.0f}s] {states.get('RUNNING', 0)} running, "
            f"{states.get('PENDING', 0)} pending, {ended.get('completed', 0)} completed, "
            f"{ended.get('stopped early', 0)} stopped early, {ended.get('diverged', 0)} diverged, "
            f"{ended.get('errored', 0)} errored | {best}\n"
        )
        sys.stderr.flush()


LEADERBOARD_METRICS = [
    "test/recon_mse", "test/psnr", "test/probe_accuracy", "test/nll", "model/parameters", "time/trial_seconds",
]


def leaderboard(results, space: SearchSpace) -> pd.DataFrame:
    """One row per trial, best first: outcome, objective, test metrics and parameters."""
    metric, mode = space.objective.metric, space.objective.mode
    rows = []
    for result in results:
        last = result.metrics or {}
        params = decode_params(space, (result.config or {}))
        rows.append(
            {
                "trial": last.get("trial_id", Path(result.path).name),
                "family": last.get("family", "?"),
                "outcome": outcome(last, result.error),
                "epochs": int(last.get("epoch", 0)),
                metric: last.get(metric, math.nan),
                **{name: last.get(name, math.nan) for name in LEADERBOARD_METRICS},
                "node": last.get("node", ""),
                "params": ", ".join(f"{k}={v}" for k, v in params.items()),
            }
        )
    board = pd.DataFrame(rows)
    if board.empty:
        return board
    board = board.sort_values(metric, ascending=(mode == "min"), na_position="last", kind="stable")
    return board.reset_index(drop=True)


def format_leaderboard(board: pd.DataFrame, space: SearchSpace, where: str, top: int = 10) -> str:
    metric = space.objective.metric
    if board.empty:
        return "no trials ran"
    columns = ["trial", "family", "outcome", "epochs", metric, "test/recon_mse", "test/psnr", "test/probe_accuracy"]
    overall = board.head(top)[columns]
    per_family = board.dropna(subset=[metric]).groupby("family", sort=False).head(1)[columns]
    counts = Counter(outcome_kind(state) for state in board["outcome"])
    summary = ", ".join(f"{n} {state}" for state, n in counts.most_common())
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        return (
            f"\n{len(board)} trials: {summary}\n\n"
            f"best trials ({metric}, {space.objective.mode}):\n{overall.to_string(index=False, na_rep='-')}\n\n"
            f"best per variant family:\n{per_family.to_string(index=False, na_rep='-')}\n\n"
            f"results: {where}\n"
        )
