"""A trial of the search: the Ray Tune trainable around the one trainer.

`run_trial` trains one configuration (here, or in a pack server), logs it to its MLflow run, and
reports each epoch to Tune with a checkpoint, so ASHA can stop it and a failed or interrupted trial
continues from where it was.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune

from aesearch.config import on_device, variant_family
from aesearch.errors import ConfigError, DivergedError
from aesearch.metrics import DIRECTIONS
from aesearch.packing.server import (
    choose_server,
    gpu_memory_cap,
    train_in_pack,
)
from aesearch.parts.data import Data
from aesearch.search.faults import Fault, fire
from aesearch.search.space import (
    SearchSpace,
    decode_params,
    trial_config,
)
from aesearch.search.storage import storage_unreachable
from aesearch.tracking.outcomes import REPORTED, Outcome
from aesearch.tracking.runs import TrialRun, log_invalid_trial
from aesearch.tracking.store import Tracking
from aesearch.training.checkpoints import BEST_FILE, load_checkpoint
from aesearch.training.simulated import simulate
from aesearch.training.trainer import EpochEnd, train

CHECKPOINT_FILE = "checkpoint.pt"  # the run at the epoch reported
STORAGE_RETRY_S = 2.0  # how often a report waits for storage that does not answer
UNDELIVERED = "tracking/undelivered"  # a trial's report: what never reached the tracking server ('' if all did)
CLOSED = "tracking/closed"  # a trial's last report: 1.0 where the trial closed its run itself (TrialRun.close)


class TuneReporter:
    """Reports each epoch to Tune with a checkpoint of the run (what ASHA and retries need), after
    the trial's MLflow run has it.

    Every checkpoint also carries `best.pt`, the checkpoint of the best epoch so far, so that a
    restored trial still has it to log at its end. With `checkpoint_every_s`, only the reports that
    many seconds apart carry one; a best epoch between them is kept here, for the next. The last epoch
    is held back: `run_trial` reports it together with the evaluation suite's test metrics, because
    ASHA stops a trial the moment it reports its final epoch.
    """

    def __init__(self, extra: dict[str, Any], epochs: int, track: Callable[[EpochEnd], None],
                 storage_patience_s: float = 0.0, checkpoint_every_s: float = 0.0):
        self.extra, self.epochs, self.track = extra, epochs, track
        self.storage_patience_s, self.checkpoint_every_s = storage_patience_s, checkpoint_every_s
        self.checkpoint_due = 0.0  # time.monotonic() from which a report carries a checkpoint
        self.held: tuple[dict[str, float], tempfile.TemporaryDirectory] | None = None
        self.started = time.perf_counter()
        self.kept = tempfile.TemporaryDirectory()
        self.best_file = Path(self.kept.name) / BEST_FILE

    def __call__(self, end: EpochEnd) -> None:
        self.track(end)
        if end.epoch < self.epochs and time.monotonic() < self.checkpoint_due:
            if end.is_best:
                end.save_checkpoint(self.best_file)
            self.report(end.metrics)
            return
        self.checkpoint_due = time.monotonic() + self.checkpoint_every_s
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
        # Tune uploads the checkpoint before it takes the report: while the storage does not answer
        # (an S3 server restarting), nothing was reported, and the same report is tried again.
        deadline = time.monotonic() + self.storage_patience_s
        while True:
            try:
                tune.report({**metrics, **self.extra, **elapsed}, checkpoint=checkpoint)
                return
            except OSError as error:
                if not storage_unreachable(error) or time.monotonic() >= deadline:
                    raise
                time.sleep(STORAGE_RETRY_S)


def trial_number(trial_dir: str, trial_id: str) -> str:
    """The trial's ordinal in the search (Tune names its folder `<trainable>_<id>_<n>_...`)."""
    found = re.search(rf"{trial_id}_(\d+)", Path(trial_dir).name)
    return found.group(1) if found else trial_id


def closed_by_the_trial(run: TrialRun, last: dict[str, Any]) -> dict[str, Any]:
    """The trial's last report, its run closed first with the outcome the driver would read from it."""
    return {**last, CLOSED: float(run.close(Outcome.from_report(last), last[UNDELIVERED]))}


def run_trial(params: dict[str, Any], data: Data, space: SearchSpace, tracking: Tracking,
              faults: list[Fault], servers: list[Any] | None = None) -> None:
    """The Ray Tune trainable: one trial of the search, trained by the one trainer (here, or by a
    pack server when `servers` are given) or simulated (`space.simulate`), logged to MLflow."""
    worst = {o.metric: DIRECTIONS[o.mode].worst for o in space.objective}  # what broke ranks last
    context = tune.get_context()
    trial_id, node = context.get_trial_id(), ray.get_runtime_context().get_node_id()
    number = trial_number(context.get_trial_dir(), trial_id)
    try:
        config = trial_config(space, decode_params(space, params))
    except ConfigError as error:  # conditions that overlap: not worth retrying
        run_id = log_invalid_trial(tracking, trial_id, number, params, str(error))
        tune.report({"epoch": 0.0, **worst, REPORTED["invalid"]: 1.0, "error": str(error)[:500],
                     "mlflow_run_id": run_id})
        return
    server = choose_server(servers, config, space.resources.pack) if servers else None
    device = config.runtime.device
    if server is not None:  # the server's device trains it
        device = ray.get(server.training_device.remote())
    elif device == "auto":  # Ray hides no GPU from a trial that asked for none: use one only if given one
        device = "cuda" if ray.get_gpu_ids() else "cpu"
    config = on_device(config, device)
    if server is None and device.startswith("cuda"):
        gpu_memory_cap(space.resources.gpu)  # trials sharing a GPU each keep to their share
    run = TrialRun.for_trial(tracking, trial_id, number, config, data, node)
    if space.simulate is not None:
        run.set_tag("simulated", f"a synthetic learning curve, {space.simulate.seconds_per_epoch:g} s per epoch: "
                    "nothing was trained")
    extra = {"family": variant_family(config), "node": node, "mlflow_run_id": run.run_id,
             "mlflow_artifact_uri": run.artifact_uri}
    reporter = TuneReporter(extra, config.epochs, run.log_epoch, space.budget.storage_patience_s,
                             space.budget.checkpoint_every_s)
    resume_state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # a retry after a failure, or a resumed search
        with checkpoint.as_directory() as folder:
            resume_state = load_checkpoint(Path(folder) / CHECKPOINT_FILE)
            if (Path(folder) / BEST_FILE).is_file():
                shutil.copyfile(Path(folder) / BEST_FILE, reporter.best_file)
        run.set_tag("restored", f"attempt {run.attempt} went on from epoch {resume_state['epoch']} on node {node}")
        run.catch_up(resume_state["history"])

    def on_epoch(end: EpochEnd) -> None:
        fire(faults, number, end.epoch, run.attempt)  # AESEARCH_FAULTS: a rehearsed failure, before the report
        reporter(end)

    try:
        if space.simulate is not None:
            result = simulate(config, data, on_epoch, space.simulate, resume_from=resume_state)
        elif server is not None:
            result = train_in_pack(server, trial_id, config, data, on_epoch, resume_from=resume_state)
        else:
            result = train(config, data, on_epoch, resume_from=resume_state)
    except DivergedError as error:
        diverged = {"epoch": float(error.epoch), **worst, REPORTED["diverged"]: 1.0, UNDELIVERED: run.wait_for_server()}
        reporter.report(closed_by_the_trial(run, diverged))
        return
    except SystemExit:  # Tune stopped the trial (ASHA) inside a report: what waits may still reach the server
        run.wait_for_server()
        raise
    final = {**result.history[-1], **result.metrics, REPORTED["completed"]: 1.0,
             UNDELIVERED: run.finish(result, reporter.best_file)}
    final = closed_by_the_trial(run, final)
    final["time/tracking_seconds"] = run.seconds
    if reporter.held is None:  # resumed after the last epoch: nothing left to train
        reporter.report(final)
        return
    with reporter.held[1] as folder:
        reporter.report(final, folder)
