"""`aesearch search`: a search space becomes Optuna TPE + ASHA trials on Ray Tune.

The driver loads the dataset once and hands it to every trial through Ray's object store
(`tune.with_parameters`); a trial is `run_trial`, a thin adapter around the one trainer
(`aesearch.training.trainer.train`) that reports each epoch to Tune with a checkpoint, so ASHA can stop it
and a failed or interrupted trial continues from where it was. Actors are reused across trials,
so a trial pays neither a process start nor `import torch`.

    STORAGE/NAME/                Ray Tune's experiment folder (searcher state, trial folders)
    STORAGE/NAME/space.yaml      the search space as launched (a resumed search must match it)
    STORAGE/NAME/leaderboard.csv every trial: outcome, objective, test metrics, parameters
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import yaml
from pydantic import ValidationError
from ray import tune
from ray.tune.logger import JsonLoggerCallback

from aesearch import settings
from aesearch.errors import UserError
from aesearch.metrics import board_metrics
from aesearch.packing.server import (
    MEMBER_CPU,
    server_count,
    start_servers,
    stop_servers,
)
from aesearch.parts.data import Data, load_data
from aesearch.plugins import load_plugins, shipped_modules
from aesearch.search.callbacks import CheckpointPruner, CompactFinished, FirstReport, Progress, RunCloser
from aesearch.search.faults import Fault, read_faults
from aesearch.search.leaderboard import NothingRan, leaderboard, nothing_ran
from aesearch.search.phases import Phases
from aesearch.search.ray_api import MarkingOptunaSearch, count_memory_kills_as_trial_failures
from aesearch.search.ray_cluster import check_reachable, connect
from aesearch.search.space import DefineByRun, SearchSpace, check_trials, check_validation_rows, start_points
from aesearch.search.staging import StagingNamed, StartClaim, staged_folder, staging_root
from aesearch.search.storage import (
    TRACKING_FILE,
    FinalUploadWatch,
    SearchFolder,
    check_storage_has_no_credentials,
    prune_checkpoints,
    storage_unreachable,
    upload_folder,
)
from aesearch.search.strategies import SAMPLERS, SCHEDULERS, STOPPED_TRIALS, Sampling, Stopping, quiet_optuna
from aesearch.search.trial import run_trial
from aesearch.tracking.outbox import is_unreachable, patiently
from aesearch.tracking.search_run import SearchRun, git_commit, package_versions
from aesearch.tracking.store import Tracking, check_store_reachable, is_local_store, resolve_tracking_uri


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

    @property
    def experiment_folder(self) -> str:
        """Ray Tune's experiment folder of the search: STORAGE/NAME."""
        return f"{self.storage.rstrip('/')}/{self.name}"


# --- the driver -------------------------------------------------------------------------------


def check_can_start(space: SearchSpace, options: SearchOptions) -> None:
    """Refuse, before anything is written, a search that would clobber or mismatch another."""
    check_storage_has_no_credentials(options.storage)
    if "://" not in options.storage:
        folder = Path(options.experiment_folder)
        existing = next(parent for parent in folder.parents if parent.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise UserError(f"--storage {options.storage}: cannot write there ({existing} is not a writable folder)")
    try:
        folder = SearchFolder(options.experiment_folder)
        exists, launched = folder.exists(), folder.exists("space.yaml")
        bucket = folder.bucket()
    except (OSError, ValueError) as error:  # an unknown scheme, a bucket it may not read, no credentials
        raise UserError(f"--storage {options.storage}: cannot read it ({error})") from None
    if bucket is not None and not folder.exists_at(bucket):
        raise UserError(f"--storage {options.storage}: there is no bucket {bucket!r} (make it first; "
                        "aesearch makes no buckets)")
    if options.resume:
        if not launched:
            raise UserError(f"--resume: no search named {options.name!r} under {options.storage}")
        if launched_space(folder.read("space.yaml")) != space.model_dump(mode="json"):
            raise UserError(
                f"--resume: the search space differs from the one search {options.name!r} was "
                f"launched with ({folder.uri}/space.yaml); resume with that space or start a new --name"
            )
    elif exists:
        raise UserError(
            f"a search named {options.name!r} already exists under {options.storage}; continue it "
            "with --resume or start another with --name"
        )


def launched_space(text: str) -> Any:
    """A stored space.yaml as this version reads it (older files spell one objective as a mapping)."""
    document = yaml.safe_load(text)
    try:
        return SearchSpace.model_validate(document).model_dump(mode="json")
    except ValidationError:
        return document


def search(space: SearchSpace, options: SearchOptions, phases: Phases | None = None) -> pd.DataFrame:
    """Run (or resume) the search, tracked in MLflow; returns the leaderboard of every trial.
    `phases` (if given) gets a mark at the end of each stage, for `aesearch: time: ...`."""
    settings.apply()  # Ray's and MLflow's settings, inherited by every process the search starts
    phases = phases or Phases()
    check_can_start(space, options)
    faults = read_faults()
    uri = resolve_tracking_uri(options.tracking_uri)
    check_tracking(options, uri)
    check_store_reachable(uri)
    if options.address:
        check_reachable(options.address)  # seconds, not a dataset download later
    data = load_data(space.data, options.data_dir, options.download)
    check_trials(space, data.spec)
    check_validation_rows(space, data)
    shipped = shipped_modules(load_plugins(space.plugins))  # imported already, when the space was read
    phases.mark("start (imports, checks, data)")
    if options.address:
        connect(options.address, shipped)  # a cluster may refuse us (no answer, a wrong token): before anything is written
    try:
        runs = SearchRun(uri, options.name)  # opening an embedded store creates it: after every check of input
        if not options.resume:
            runs.check_new()
        else:
            runs.check_artifacts_in_place()
        if not options.address:
            connect(None, shipped)  # a local Ray instance: started once the search is known to be new
        check_resources(space, local=options.address is None)
        if options.address and is_local_store(uri):
            print(f"aesearch: warning: trials on other nodes log to {uri} only if they see this path; "
                  "give a tracking server with --tracking-uri http://HOST:PORT", file=sys.stderr)
        tracking = runs.start(options.resume, describe(space, options, data), space_document(space),
                              space.budget.tracking_patience_s, data, space.budget.tracking_batch_s)
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
    if interrupted(space, results):
        runs.finish("KILLED", None)
        raise SearchInterrupted(options.name)
    board = leaderboard(results, space)
    folder = SearchFolder(options.experiment_folder)
    patiently_stored(lambda: folder.write("leaderboard.csv", board.to_csv(index=False)), space, options,
                     "the leaderboard is in the search's MLflow run only")
    failed = nothing_ran(board)
    patience = space.budget.tracking_patience_s
    try:  # a tracking server that is down now is waited for, up to the patience
        patiently(lambda: runs.tag_ranks(rank_tags(board)), patience)
        if (board["rank"] == 1).any():
            best = board[board["rank"] == 1].iloc[0]
            metrics = {k: best[k] for k in board_metrics(space.metrics) if pd.notna(best.get(k))}
            front = board.loc[board["pareto_rank"] == 1, "trial"].tolist() if space.multi_objective else None
            patiently(lambda: runs.register_best(best["mlflow_run_id"], metrics, front), patience)
        closing = "FAILED" if failed else "FINISHED"
        known = set(board.get("trial", [])) if options.resume else None  # only a resumed search has lost runs
        patiently(lambda: runs.finish(closing, board.to_csv(index=False), known), patience)
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


def rank_tags(board: pd.DataFrame) -> dict[str, dict[str, str]]:
    """MLflow run id -> its place in the search as tags (see SearchRun.tag_ranks)."""
    tags = {}
    for row in board[board["mlflow_run_id"].fillna("").astype(bool)].to_dict("records"):
        ranked = pd.notna(row["rank"])
        place = {"rank": str(int(row["rank"])) if ranked else "unranked"}
        if "pareto_rank" in row:
            on_front = ranked and row["pareto_rank"] == 1
            place |= {"pareto_rank": str(int(row["pareto_rank"])) if ranked else "unranked",
                      "pareto_front": "true" if on_front else "false"}
        tags[row["mlflow_run_id"]] = place
    return tags


def check_tracking(options: SearchOptions, uri: str) -> None:
    """A resumed search logs where it started: refuse another tracking store."""
    folder = SearchFolder(options.experiment_folder)
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
        "seed": space.seed, "dataset": space.data.dataset, "dataset_fingerprint": data.fingerprint,
        "data.binarize": space.data.binarize, "objective.metric": space.primary.metric, "objective.mode": space.primary.mode,
        "objectives": ", ".join(f"{o.metric} {o.mode}" for o in space.objective),
        "budget.num_samples": space.budget.num_samples, "budget.max_epochs": space.budget.max_epochs,
        "budget.grace_period": space.budget.grace_period, "budget.reduction_factor": space.budget.reduction_factor,
        "budget.brackets": space.budget.brackets,
        "max_concurrent": space.max_concurrent, "resources.cpu": space.resources.cpu,
        "resources.gpu": space.resources.gpu, "resources.pack": space.resources.pack,
        "sampler": space.sampler, "early_stopping": space.early_stopping, "stopped_trials": space.stopped_trials,
        "tpe_window": space.tpe_window,
        "searched": ", ".join(space.space),
    }
    tags = {
        **{f"version.{name}": version for name, version in package_versions().items()},
        "git_commit": git_commit(), "storage": options.experiment_folder,
        "cluster.nodes": str(sum(1 for node in ray.nodes() if node.get("Alive"))),
        "cluster.cpus": f"{resources.get('CPU', 0):g}", "cluster.gpus": f"{resources.get('GPU', 0):g}",
    }
    return {"params": params, "tags": tags}


class SearchInterrupted(Exception):
    """The search was stopped (Ctrl-C) before its trials ended; `--resume` continues it."""


def interrupted(space: SearchSpace, results: tune.ResultGrid) -> bool:
    """Did Tune stop on Ctrl-C? It returns normally then; its trials tell: some it put back to
    pending, or fewer trials than asked for with no time budget to explain it. (Tune's own view, not
    the state in the storage: that may be older, when the storage did not answer at the end.)"""
    unfinished = len(results) > results.num_terminated + results.num_errors
    return unfinished or (len(results) < space.budget.num_samples and space.budget.time_budget_s is None)


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


def optuna_searcher(space: SearchSpace) -> MarkingOptunaSearch:
    """The searcher of a new search: the space's sampler over its define-by-run function."""
    quiet_optuna()
    one = not space.multi_objective  # Optuna's TPE on every objective: a list of several
    return MarkingOptunaSearch(
        DefineByRun(space),
        metric=space.primary.metric if one else space.metrics,
        mode=space.primary.mode if one else space.modes,
        sampler=sampler_for(space),
        points_to_evaluate=start_points(space) or None,
        max_epochs=space.budget.max_epochs,
        stopped_as_pruned=STOPPED_TRIALS[space.stopped_trials],
    )


def sampler_for(space: SearchSpace):
    """Optuna's sampler for the search: its `sampler`, seeded."""
    return SAMPLERS[space.sampler](Sampling(space.seed, space.tpe_window, space.multi_objective))


def scheduler_for(space: SearchSpace):
    """Tune's trial scheduler for the search: its `early_stopping` on its objectives and budget."""
    budget = space.budget
    rungs = {"time_attr": "epoch", "max_t": budget.max_epochs, "grace_period": budget.grace_period,
             "reduction_factor": budget.reduction_factor, "brackets": budget.brackets, "seed": space.seed}
    return SCHEDULERS[space.early_stopping](Stopping(space.metrics, space.modes, rungs))


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
    path = options.experiment_folder
    if options.resume:  # the searcher's state, the trials and their checkpoints come back
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        searcher = optuna_searcher(space)
        budget = space.budget
        scheduler = scheduler_for(space)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(  # the searcher and the scheduler know their objectives
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
                    JsonLoggerCallback(), Progress(space), CheckpointPruner(options.experiment_folder),
                    RunCloser(space, tracking), CompactFinished(space), FirstReport(phases),
                    StagingNamed(options.name),
                ],
                verbose=0,
            ),
        )
        folder = SearchFolder(options.experiment_folder)
        folder.write("space.yaml", space_document(space))
        folder.write(TRACKING_FILE, tracking.uri + "\n")
    count_memory_kills_as_trial_failures()  # a trial killed for memory fails alone; the search goes on
    with StartClaim(options.name, staging_root()), FinalUploadWatch() as final_upload:
        results = tuner.fit()  # with a staging folder not shared with a search started at once
    staged = staged_folder(options.name)
    if final_upload.failed and staged is not None:  # the stored state would be older than the search
        print(f"aesearch: Ray Tune could not upload the search's final state to {options.experiment_folder}; "
              f"uploading it again", file=sys.stderr)
        if not patiently_stored(lambda: upload_folder(staged, options.experiment_folder), space, options,
                                "the stored state is older than the search (--resume and report would read it)"):
            return results
    patiently_stored(lambda: prune_checkpoints(options.experiment_folder, search_ended=True), space, options,
                     "checkpoints no resume needs are left in it")  # the final state is stored now
    return results


def patiently_stored(call: Any, space: SearchSpace, options: SearchOptions, otherwise: str) -> bool:
    """`call()`, waiting for a storage that does not answer up to `budget.storage_patience_s`; if it still
    does not, a warning that says what follows (`otherwise`), and False: the search goes on to close
    its MLflow runs, which hold every trial."""
    patience = space.budget.storage_patience_s
    try:
        patiently(call, patience, transient=storage_unreachable)
        return True
    except OSError as error:
        if not storage_unreachable(error):
            raise
        print(f"aesearch: warning: the storage {options.experiment_folder} did not answer for {patience:g} s: "
              f"{otherwise}", file=sys.stderr)
        return False
