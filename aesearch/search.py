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

import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

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
    # A local raylet would start idle workers at once, which Tune never uses (its trial actors ask for
    # a runtime env of their own): on a small machine they only slow the start of the real ones.
    "RAY_enable_worker_prestart": "0",
}
# MLflow's client retries a failed request for about four minutes, and a trial would stop training
# meanwhile: a search's processes give up on a request in seconds and retry on their own terms
# (a trial's records wait in its outbox, see aesearch.tracking.Outbox).
MLFLOW_RETRY_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
for _key, _value in (RAY_SETTINGS | MLFLOW_RETRY_SETTINGS).items():
    os.environ.setdefault(_key, _value)

import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune import Callback  # noqa: E402
from ray.tune.logger import JsonLoggerCallback  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from aesearch.checkpoints import load_checkpoint  # noqa: E402
from aesearch.config import variant_family  # noqa: E402
from aesearch.data import Data, load_data  # noqa: E402
from aesearch.errors import ConfigError, DivergedError, UserError  # noqa: E402
from aesearch.faults import Fault, fire, read_faults  # noqa: E402
from aesearch.pack_server import (  # noqa: E402
    MEMBER_CPU,
    choose_server,
    gpu_memory_cap,
    server_count,
    start_servers,
    stop_servers,
    train_in_pack,
)
from aesearch.phases import Phases  # noqa: E402
from aesearch.ray_cluster import check_reachable, connect  # noqa: E402
from aesearch.space import (  # noqa: E402
    DefineByRun,
    SearchSpace,
    decode_params,
    start_points,
    trial_config,
)
from aesearch.tracking import (  # noqa: E402
    Outbox,
    SearchRun,
    Tracking,
    TrialRun,
    check_store_reachable,
    describe_error,
    git_commit,
    is_local_store,
    is_unreachable,
    log_invalid_trial,
    package_versions,
    patiently,
    resolve_tracking_uri,
)
from aesearch.train import EpochEnd, train  # noqa: E402

CHECKPOINT_FILE = "checkpoint.pt"  # the run at the epoch reported
BEST_FILE = "best.pt"  # the run at its best epoch so far
TRACKING_FILE = "tracking_uri"  # where the search logs, so --resume logs there too
UNDELIVERED = "tracking/undelivered"  # a trial's report: what never reached the tracking server ('' if all did)

@dataclass
class SearchOptions:
    name: str
    storage: str  # a local folder (absolute) or a URI such as s3://bucket/prefix
    address: str | None = None
    data_dir: Path | None = None
    download: bool = False
    resume: bool = False
    tracking_uri: str | None = None  # MLflow; None: $MLFLOW_TRACKING_URI, else the embedded store
    reuse_actors: bool = True  # False only to measure what reuse saves (benchmarks/)


# --- inside a trial ---------------------------------------------------------------------------


class TuneReporter:
    """Reports each epoch to Tune with a checkpoint of the run (what ASHA and retries need), after
    the trial's MLflow run has it.

    Every checkpoint also carries `best.pt`, the checkpoint of the best epoch so far, so that a
    restored trial still has it to log at its end. The last epoch is held back: `run_trial`
    reports it together with the evaluation suite's test metrics, because ASHA stops a trial the
    moment it reports its final epoch.
    """

    def __init__(self, extra: dict[str, Any], epochs: int, track: Callable[[EpochEnd], None]):
        self.extra, self.epochs, self.track = extra, epochs, track
        self.held: tuple[dict[str, float], tempfile.TemporaryDirectory] | None = None
        self.started = time.perf_counter()
        self.kept = tempfile.TemporaryDirectory()
        self.best_file = Path(self.kept.name) / BEST_FILE

    def __call__(self, end: EpochEnd) -> None:
        self.track(end)
        folder = tempfile.TemporaryDirectory()
        end.save_checkpoint(Path(folder.name) / CHECKPOINT_FILE)
        if end.is_best:
            shutil.copyfile(Path(folder.name) / CHECKPOINT_FILE, self.best_file)
        if self.best_file.is_file():
            shutil.copyfile(self.best_file, Path(folder.name) / BEST_FILE)
        if end.epoch == self.epochs:
            self.held = (end.metrics, folder)
            return
        with folder:
            self.report(end.metrics, folder.name)

    def report(self, metrics: dict[str, Any], checkpoint_folder: str | None = None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_folder) if checkpoint_folder else None
        elapsed = {"time/trial_seconds": time.perf_counter() - self.started}  # in this trial process
        tune.report({**metrics, **self.extra, **elapsed}, checkpoint=checkpoint)


def trial_number(trial_dir: str, trial_id: str) -> str:
    """The trial's ordinal in the search (Tune names its folder `<trainable>_<id>_<n>_...`)."""
    found = re.search(rf"{trial_id}_(\d+)", Path(trial_dir).name)
    return found.group(1) if found else trial_id


def run_trial(params: dict[str, Any], data: Data, space: SearchSpace, tracking: Tracking,
              faults: list[Fault], servers: list[Any] | None = None) -> None:
    """The Ray Tune trainable: one trial of the search, trained by the one trainer (here, or by a
    pack server when `servers` are given), logged to MLflow."""
    worst = math.inf if space.objective.mode == "min" else -math.inf
    context = tune.get_context()
    trial_id, node = context.get_trial_id(), ray.get_runtime_context().get_node_id()
    number = trial_number(context.get_trial_dir(), trial_id)
    try:
        config = trial_config(space, decode_params(space, params))
    except ConfigError as error:  # conditions that overlap: not worth retrying
        run_id = log_invalid_trial(tracking, trial_id, number, params, str(error))
        tune.report({"epoch": 0.0, space.objective.metric: worst, "outcome/invalid": 1.0, "error": str(error)[:500],
                     "mlflow_run_id": run_id})
        return
    server = choose_server(servers, config, space.resources.pack) if servers else None
    device = config.runtime.device
    if server is not None:  # the server's device trains it
        device = ray.get(server.training_device.remote())
    elif device == "auto":  # Ray hides no GPU from a trial that asked for none: use one only if given one
        device = "cuda" if ray.get_gpu_ids() else "cpu"
    config = config.model_copy(update={"runtime": config.runtime.model_copy(update={"device": device})})
    if server is None and device.startswith("cuda"):
        gpu_memory_cap(space.resources.gpu)  # trials sharing a GPU each keep to their share
    run = TrialRun.for_trial(tracking, trial_id, number, config, data, node)
    extra = {"family": variant_family(config), "node": node, "mlflow_run_id": run.run_id}
    reporter = TuneReporter(extra, config.epochs, run.log_epoch)
    resume_state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # a retry after a failure, or a resumed search
        with checkpoint.as_directory() as folder:
            resume_state = load_checkpoint(Path(folder) / CHECKPOINT_FILE)
            if (Path(folder) / BEST_FILE).is_file():
                shutil.copyfile(Path(folder) / BEST_FILE, reporter.best_file)
        run.set_tag("restored", f"attempt {run.attempt} went on from epoch {resume_state['epoch']} on node {node}")

    def on_epoch(end: EpochEnd) -> None:
        fire(faults, number, end.epoch, run.attempt)  # AESEARCH_FAULTS: a rehearsed failure, before the report
        reporter(end)

    try:
        if server is not None:
            result = train_in_pack(server, trial_id, config, data, on_epoch, resume_from=resume_state)
        else:
            result = train(config, data, on_epoch, resume_from=resume_state)
    except DivergedError as error:
        reporter.report({"epoch": float(error.epoch), space.objective.metric: worst, "outcome/diverged": 1.0,
                         UNDELIVERED: run.wait_for_server()})
        return
    except SystemExit:  # Tune stopped the trial (ASHA) inside a report: what waits may still reach the server
        run.wait_for_server()
        raise
    # Before the last report: the driver closes the run on it.
    undelivered = run.finish(result, reporter.best_file)
    final = {**result.history[-1], **result.metrics, "outcome/completed": 1.0, "time/tracking_seconds": run.seconds,
             UNDELIVERED: undelivered}
    if reporter.held is None:  # resumed after the last epoch: nothing left to train
        reporter.report(final)
        return
    with reporter.held[1] as folder:
        reporter.report(final, folder)


# --- the driver -------------------------------------------------------------------------------


def experiment_folder(options: SearchOptions) -> str:
    return f"{options.storage.rstrip('/')}/{options.name}"


class SearchFolder:
    """The search's folder in its storage, a local folder or a URI (s3://, gs://, file://) alike:
    read and written through the filesystem Ray Tune itself writes it with (pyarrow's)."""

    def __init__(self, options: SearchOptions):
        from ray.train._internal.storage import get_fs_and_path

        self.uri = experiment_folder(options)
        self.fs, self.path = get_fs_and_path(self.uri, None)

    def exists(self, name: str = "") -> bool:
        from pyarrow.fs import FileType

        return self.fs.get_file_info(f"{self.path}/{name}".rstrip("/")).type != FileType.NotFound

    def read(self, name: str) -> str:
        with self.fs.open_input_stream(f"{self.path}/{name}") as stream:
            return stream.readall().decode("utf-8")

    def write(self, name: str, text: str) -> None:
        self.fs.create_dir(self.path, recursive=True)
        with self.fs.open_output_stream(f"{self.path}/{name}") as stream:
            stream.write(text.encode("utf-8"))


def check_storage_has_no_credentials(storage: str) -> None:
    """Storage URIs are printed, logged as tags and saved with the search: credentials go elsewhere."""
    parts = urlsplit(storage)
    secret_params = {"access_key", "secret_key", "session_token"} & set(parse_qs(parts.query))
    if "://" in storage and (parts.username or parts.password or secret_params):
        raise UserError(
            f"--storage {parts.scheme}://***@{parts.hostname}{parts.path}: credentials in the URI are refused; "
            "give every node its own (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in its environment, or a role)"
        )


def check_can_start(space: SearchSpace, options: SearchOptions) -> None:
    """Refuse, before anything is written, a search that would clobber or mismatch another."""
    check_storage_has_no_credentials(options.storage)
    if "://" not in options.storage:
        folder = Path(experiment_folder(options))
        existing = next(parent for parent in folder.parents if parent.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise UserError(f"--storage {options.storage}: cannot write there ({existing} is not a writable folder)")
    try:
        folder = SearchFolder(options)
        exists, launched = folder.exists(), folder.exists("space.yaml")
    except (OSError, ValueError) as error:  # an unknown scheme, a bucket it may not read, no credentials
        raise UserError(f"--storage {options.storage}: cannot read it ({error})") from None
    if options.resume:
        if not launched:
            raise UserError(f"--resume: no search named {options.name!r} under {options.storage}")
        if yaml.safe_load(folder.read("space.yaml")) != space.model_dump(mode="json"):
            raise UserError(
                f"--resume: the search space differs from the one search {options.name!r} was "
                f"launched with ({folder.uri}/space.yaml); resume with that space or start a new --name"
            )
    elif exists:
        raise UserError(
            f"a search named {options.name!r} already exists under {options.storage}; continue it "
            "with --resume or start another with --name"
        )


def search(space: SearchSpace, options: SearchOptions, phases: Phases | None = None) -> pd.DataFrame:
    """Run (or resume) the search, tracked in MLflow; returns the leaderboard of every trial.
    `phases` (if given) gets a mark at the end of each stage, for `aesearch: time: ...`."""
    phases = phases or Phases()
    check_can_start(space, options)
    faults = read_faults()
    uri = resolve_tracking_uri(options.tracking_uri)
    check_tracking(options, uri)
    check_store_reachable(uri)
    if options.address:
        check_reachable(options.address)  # seconds, not a dataset download later
    data = load_data(space.data, options.data_dir, options.download)
    phases.mark("start (imports, checks, data)")
    if options.address:
        connect(options.address)  # a cluster may refuse us (no answer, a wrong token): before anything is written
    try:
        runs = SearchRun(uri, options.name)  # opening an embedded store creates it: after every check of input
        if not options.resume:
            runs.check_new()
        if not options.address:
            connect(None)  # a local Ray instance: started once the search is known to be new
        check_resources(space, local=options.address is None)
        if options.address and is_local_store(uri):
            print(f"aesearch: warning: trials on other nodes log to {uri} only if they see this path; "
                  "give a tracking server with --tracking-uri http://HOST:PORT", file=sys.stderr)
        tracking = runs.start(options.resume, describe(space, options, data), space_document(space),
                              space.budget.tracking_patience_s)
        phases.mark("Ray and the MLflow run")
        runs.prepare_model_export()  # in the background, while the trials run
        try:
            results = _fit(space, options, data, tracking, faults, phases)
        except BaseException:
            runs.finish("FAILED", None)
            raise
        phases.mark("trials")
    finally:
        ray.shutdown()
    if interrupted(space, options):
        runs.finish("KILLED", None)
        raise SearchInterrupted(options.name)
    board = leaderboard(results, space)
    folder = SearchFolder(options)
    folder.write("leaderboard.csv", board.to_csv(index=False))
    failed = nothing_ran(board)
    patience = space.budget.tracking_patience_s
    try:  # a tracking server that is down now is waited for, up to the patience
        finite = board[board[space.objective.metric].map(is_finite_number)]
        if len(finite):
            best = finite.iloc[0]
            metrics = {k: best[k] for k in LEADERBOARD_METRICS if pd.notna(best.get(k))}
            patiently(lambda: runs.register_best(best["trial"], metrics), patience)
        closing = "FAILED" if failed else "FINISHED"
        patiently(lambda: runs.finish(closing, board.to_csv(index=False), set(board.get("trial", []))), patience)
    except Exception as error:
        if not is_unreachable(error):
            raise
        print(f"aesearch: warning: the tracking server {uri} did not answer for {patience:g} s: the search run is "
              f"not closed and its best model not registered; the leaderboard is in {folder.uri}/leaderboard.csv",
              file=sys.stderr)
    phases.mark("closing (leaderboard, best model, runs)")
    if failed:
        raise NothingRan(options.name, board, f"{folder.uri}/leaderboard.csv")
    return board


class NothingRan(Exception):
    """Every trial of the search errored or never started: it found nothing, and says so."""

    def __init__(self, name: str, board: pd.DataFrame, where: str):
        self.board = board
        counts = Counter(outcome_kind(state) for state in board.get("outcome", []))
        states = ", ".join(f"{n} {state}" for state, n in counts.most_common()) or "no trial started"
        super().__init__(f"search {name!r}: no trial ran to an end ({states}); each trial's error is in its "
                         f"MLflow run (errors/tracebacks.txt) and the leaderboard, {where}")


def nothing_ran(board: pd.DataFrame) -> bool:
    """No trial trained to an outcome of its own: each errored, or none started."""
    return board.empty or bool(board["outcome"].map(outcome_kind).isin({"errored", "not started"}).all())


def check_tracking(options: SearchOptions, uri: str) -> None:
    """A resumed search logs where it started: refuse another tracking store."""
    folder = SearchFolder(options)
    if options.resume and folder.exists(TRACKING_FILE):
        started_with = folder.read(TRACKING_FILE).strip()
        if started_with != uri:
            raise UserError(
                f"--tracking-uri {uri}: search {options.name!r} was started with tracking store "
                f"{started_with}; resume it with --tracking-uri {started_with}"
            )


def space_document(space: SearchSpace) -> str:
    return yaml.safe_dump(space.model_dump(mode="json"), sort_keys=False)


def describe(space: SearchSpace, options: SearchOptions, data: Data) -> dict[str, dict[str, Any]]:
    """The search run's params (what was searched, on what) and tags (with what, where)."""
    resources = ray.cluster_resources()
    params = {
        "seed": space.seed, "dataset": space.data.name, "dataset_fingerprint": data.fingerprint,
        "objective.metric": space.objective.metric, "objective.mode": space.objective.mode,
        "budget.num_samples": space.budget.num_samples, "budget.max_epochs": space.budget.max_epochs,
        "budget.grace_period": space.budget.grace_period, "budget.reduction_factor": space.budget.reduction_factor,
        "max_concurrent": space.max_concurrent, "resources.cpu": space.resources.cpu,
        "resources.gpu": space.resources.gpu, "resources.pack": space.resources.pack,
        "sampler": space.sampler, "early_stopping": space.early_stopping,
        "searched": ", ".join(space.space),
    }
    tags = {
        **{f"version.{name}": version for name, version in package_versions().items()},
        "git_commit": git_commit(), "storage": experiment_folder(options),
        "cluster.nodes": str(sum(1 for node in ray.nodes() if node.get("Alive"))),
        "cluster.cpus": f"{resources.get('CPU', 0):g}", "cluster.gpus": f"{resources.get('GPU', 0):g}",
    }
    return {"params": params, "tags": tags}


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


SAMPLERS = {  # space.sampler -> Optuna's sampler for a seed
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
}
SCHEDULERS = {  # space.early_stopping -> Tune's trial scheduler for the budget
    "asha": lambda budget: ASHAScheduler(time_attr="epoch", max_t=budget.max_epochs, grace_period=budget.grace_period,
                                         reduction_factor=budget.reduction_factor),
    "none": lambda budget: FIFOScheduler(),
}


def _fit(space: SearchSpace, options: SearchOptions, data: Data, tracking: Tracking, faults: list[Fault],
         phases: Phases):
    resources, max_concurrent, servers = space.resources, space.max_concurrent, None
    trial_resources = {"cpu": resources.cpu, "gpu": resources.gpu}
    if resources.pack > 1:  # trials become members of pack servers, which hold the CPUs and GPUs
        count = server_count(resources.cpu, resources.gpu, resources.pack, space.budget.num_samples, max_concurrent)
        servers = start_servers(data, resources.cpu, resources.gpu, resources.pack, count)
        trial_resources = {"cpu": MEMBER_CPU, "gpu": 0}
        max_concurrent = min(max_concurrent or math.inf, count * resources.pack)
    try:
        return _fit_trials(space, options, data, tracking, faults, servers, trial_resources, max_concurrent, phases)
    finally:
        if servers:
            stop_servers(servers)


def _fit_trials(space: SearchSpace, options: SearchOptions, data: Data, tracking: Tracking, faults: list[Fault],
                servers: list[Any] | None, trial_resources: dict[str, float], max_concurrent: int | None,
                phases: Phases):
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, data=data, space=space, tracking=tracking, faults=faults, servers=servers),
        trial_resources,
    )
    path = experiment_folder(options)
    if options.resume:  # the searcher's state, the trials and their checkpoints come back
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        searcher = OptunaSearch(
            DefineByRun(space),
            metric=space.objective.metric,
            mode=space.objective.mode,
            sampler=SAMPLERS[space.sampler](space.seed),
            points_to_evaluate=start_points(space) or None,
        )
        budget = space.budget
        scheduler = SCHEDULERS[space.early_stopping](budget)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=space.objective.metric,
                mode=space.objective.mode,
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=budget.num_samples,
                max_concurrent_trials=max_concurrent,
                time_budget_s=budget.time_budget_s,
                reuse_actors=options.reuse_actors,
            ),
            run_config=tune.RunConfig(
                name=options.name,
                storage_path=options.storage,
                failure_config=tune.FailureConfig(max_failures=budget.max_failures),
                # No num_to_keep: Ray would delete a checkpoint the saved search state still
                # names (see CheckpointPruner); the pruner keeps the disk bounded instead.
                callbacks=[
                    JsonLoggerCallback(), Progress(space), CheckpointPruner(experiment_folder(options)),
                    RunCloser(tracking), BestCheckpointsKeeper(space, tracking), FirstReport(phases),
                ],
                verbose=0,
            ),
        )
        folder = SearchFolder(options)
        folder.write("space.yaml", space_document(space))
        folder.write(TRACKING_FILE, tracking.uri + "\n")
    results = tuner.fit()
    prune_checkpoints(experiment_folder(options))  # the final state save has reached storage now
    return results


# --- what the user sees -----------------------------------------------------------------------


def is_finite_number(value: Any) -> bool:
    """A real objective value: not missing, not NaN or inf (a diverged or invalid trial)."""
    return isinstance(value, int | float) and math.isfinite(value)


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


class FirstReport(Callback):
    """Marks the end of the wait for the first trial's first report (workers started, imports done)."""

    def __init__(self, phases: Phases):
        self.phases, self.seen = phases, False

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not self.seen:
            self.seen = True
            self.phases.mark("to the first trial report")


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
        if is_finite_number(value):
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


class RunCloser(Callback):
    """Gives each trial's MLflow run its outcome and terminal status as soon as Tune is done with it
    (the trial itself cannot: ASHA stops it between two epochs), and what went wrong: each failed
    attempt's traceback, and epochs whose records never reached the server. While the tracking
    server does not answer, these wait in an outbox, tried again at each later event and, at the
    end of the search, for up to `budget.tracking_patience_s`. Pickled with the search: it holds
    only where to log, and opens its client when the search (re)starts."""

    def __init__(self, tracking: Tracking):
        self.tracking = tracking

    def setup(self, **info):
        self.runs = SearchRun(self.tracking.uri, tracking=self.tracking)
        self.outbox = Outbox(on_error=self.warn)

    @staticmethod
    def warn(what: str, error: Exception) -> None:  # a callback that raises would end the search
        print(f"aesearch: warning: {what}: {describe_error(error)}", file=sys.stderr)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.outbox.flush()  # what waits for the server, if anything (at most every few seconds)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        ended, run_id = outcome(last, None), last.get("mlflow_run_id")
        if outcome_kind(ended) == "stopped early" and run_id and trial.checkpoint:
            checkpoint = trial.checkpoint
            self.outbox.send(f"the best checkpoint of trial {trial.trial_id}",
                      lambda: self.runs.log_best_checkpoint(run_id, checkpoint))
        # A diverged trial's last epoch has no metrics by design: its loss was not a number.
        epochs = int(last.get("epoch", 0)) - (1 if outcome_kind(ended) == "diverged" else 0)
        self.outbox.send(f"the outcome of trial {trial.trial_id}", lambda: self.runs.close_trial(
            trial.trial_id, ended, run_id, epochs, last.get(UNDELIVERED, "")))

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._log_errors(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        tracebacks = self._log_errors(trial)
        raised = next((line for line in reversed(tracebacks.splitlines()) if line.strip()), "")
        ended = f"errored after {trial.num_failures} attempts: {raised.strip()[:300]}"
        self.outbox.send(f"the outcome of trial {trial.trial_id}", lambda: self.runs.close_trial(
            trial.trial_id, ended, (trial.last_result or {}).get("mlflow_run_id")))

    def _log_errors(self, trial) -> str:
        """Tune's error file of the trial (every failed attempt so far), logged to its run."""
        local = trial.error_file  # written on this machine just now; storage may not have it yet
        tracebacks = Path(local).read_text() if local and Path(local).is_file() else trial.get_error() or ""
        run_id, attempts = (trial.last_result or {}).get("mlflow_run_id"), trial.num_failures
        if run_id and tracebacks:
            self.outbox.send(f"the tracebacks of trial {trial.trial_id}",
                      lambda: self.runs.log_errors(run_id, tracebacks, attempts))
        return tracebacks

    def on_experiment_end(self, trials, **info):
        if not self.outbox.deliver(self.tracking.patience_s):
            print(f"aesearch: warning: the tracking server {self.tracking.uri} did not take "
                  f"{self.outbox.undelivered()}", file=sys.stderr)


class BestCheckpointsKeeper(Callback):
    """Keeps checkpoints for the best `budget.keep_checkpoints` finished trials only, in trial storage and in
    MLflow: each time a trial ends, the finished trials that are not (or no longer) among the best K lose
    theirs. Errored trials keep theirs (a resumed search retries them from it). Runs after RunCloser, which
    logs a stopped trial's best checkpoint first. Pickled with the search; re-ranks from Tune's trials."""

    def __init__(self, space: SearchSpace, tracking: Tracking):
        self.metric, self.mode, self.keep = space.objective.metric, space.objective.mode, space.budget.keep_checkpoints
        self.tracking = tracking

    def setup(self, **info):
        self.runs = SearchRun(self.tracking.uri, tracking=self.tracking)
        self.removed: set[str] = set()

    def on_trial_complete(self, iteration, trials, trial, **info):
        finished = [t for t in trials if t.status == "TERMINATED" or t is trial]
        ranked = [t for t in finished if is_finite_number((t.last_result or {}).get(self.metric))]
        ranked.sort(key=lambda t: t.last_result[self.metric], reverse=self.mode == "max")
        best = {t.trial_id for t in ranked[: self.keep]}
        for dropped in finished:
            if dropped.trial_id in best or dropped.trial_id in self.removed:
                continue
            try:  # a callback that raises would make Tune treat the ended trial as failed and retry it
                remove_stored_checkpoints(dropped.storage.storage_filesystem, dropped.storage.trial_fs_path)
                if (dropped.last_result or {}).get("mlflow_run_id"):
                    self.runs.remove_checkpoints(dropped.last_result["mlflow_run_id"])
                self.removed.add(dropped.trial_id)
            except Exception as error:  # noqa: BLE001 - disk space is not worth a search
                if not is_unreachable(error):  # else: tried again when the next trial ends
                    self.removed.add(dropped.trial_id)
                    print(f"aesearch: warning: could not remove the checkpoints of trial {dropped.trial_id}: "
                          f"{describe_error(error)}", file=sys.stderr)


def remove_stored_checkpoints(fs, trial_dir: str, before: str | None = None) -> None:
    """Deletes a trial's checkpoint folders in its storage (only those older than `before`, if given)."""
    from pyarrow.fs import FileSelector, FileType

    for info in fs.get_file_info(FileSelector(trial_dir, allow_not_found=True)):
        if info.type == FileType.Directory and info.base_name.startswith("checkpoint_") and (
            before is None or info.base_name < before
        ):
            fs.delete_dir(info.path)


class CheckpointPruner(Callback):
    """Prunes superseded trial checkpoints at each save of the search state (Tune's `get_state` hook).

    Ray's own `CheckpointConfig(num_to_keep)` deletes a checkpoint the moment a newer one is
    reported, before the search state naming the newer one has reached storage (that upload runs
    in the background and is skipped while an earlier one still runs): a driver killed in between
    leaves trials that `--resume` cannot restore. See `prune_checkpoints` for the safe rule.
    """

    def __init__(self, experiment_path: str):
        self.experiment_path = experiment_path

    def get_state(self) -> None:
        prune_checkpoints(self.experiment_path)
        return None  # the pruner keeps no state of its own


def prune_checkpoints(experiment_path: str) -> None:
    """Deletes each trial's checkpoints older than the one its stored search state would restore.

    The stored state only ever moves forward, so a checkpoint older than the one it names now is
    never needed again: not by `--resume`, not by the leaderboard (which reads the newest).
    """
    for fs, trial_dir, restorable in stored_checkpoints(experiment_path):
        remove_stored_checkpoints(fs, trial_dir, before=restorable)


def stored_checkpoints(experiment_path: str) -> list[tuple[Any, str, str]]:
    """(filesystem, trial folder, checkpoint name) that resuming from the stored state would restore."""
    from ray.train._internal.storage import get_fs_and_path
    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    try:
        state_file = _find_newest_experiment_checkpoint(experiment_path)
        if state_file is None:
            return []
        fs, fs_path = get_fs_and_path(state_file)
        with fs.open_input_stream(fs_path) as stream:
            state = json.loads(stream.readall())
    except (OSError, ValueError):
        return []  # not written yet, or caught mid-upload: keep everything until the next save
    restorable = []
    for _, run_metadata_json in state["trial_data"]:
        manager = _TrainingRunMetadata.from_json_state(run_metadata_json).checkpoint_manager
        latest = manager.latest_checkpoint_result if manager else None
        if latest is not None and latest.checkpoint is not None:
            trial_dir, name = latest.checkpoint.path.rstrip("/").rsplit("/", 1)
            restorable.append((latest.checkpoint.filesystem, trial_dir, name))
    return restorable


LEADERBOARD_METRICS = [
    "test/recon_mse", "test/psnr", "test/probe_accuracy", "test/nll", "model/parameters", "time/trial_seconds",
    "time/tracking_seconds",
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
                "mlflow_run_id": last.get("mlflow_run_id", ""),
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
