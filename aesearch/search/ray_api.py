"""The private Ray APIs aesearch reaches, all here, for the Ray range pyproject declares.

Ray has no public way yet to (0) tell Optuna that a trial was stopped early, (1) open a storage URI with the filesystem Tune writes it with,
(2) find which checkpoint a stored search state would restore, (3) make its C++ core re-read the
authentication mode of this process, (4) ask a cluster's GCS a question without a token, (5) count a
trial killed by Ray's memory monitor as a failed trial rather than end the search, (6) let a finished
trial's record drop what no one reads again.
`tests/test_ray_api.py` fails loudly, naming the API, when a Ray upgrade moves one of them.
"""

from __future__ import annotations

import functools
from typing import Any

from ray.exceptions import OutOfMemoryError, RayActorError
from ray.tune.search.optuna import OptunaSearch

from aesearch.tracking.outcomes import Outcome


def filesystem_and_path(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) for a local folder or a URI, as Ray Tune opens its storage."""
    from ray.train._internal.storage import get_fs_and_path

    return get_fs_and_path(uri, None)


def newest_experiment_state(experiment_path: str) -> str | None:
    """The newest saved search state file of a Tune experiment (its path in the experiment's filesystem:
    for s3://BUCKET/... that is BUCKET/..., without the scheme), or None before the first save."""
    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint

    return _find_newest_experiment_checkpoint(experiment_path)


def latest_checkpoint(run_metadata_json: str) -> Any | None:
    """The checkpoint a trial's saved run metadata (in a search state) would restore, or None."""
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    manager = _TrainingRunMetadata.from_json_state(run_metadata_json).checkpoint_manager
    latest = manager.latest_checkpoint_result if manager else None
    return latest.checkpoint if latest is not None else None


def compact_finished_trial(trial: Any, kept_metrics: set[str]) -> None:
    """Drop from a finished trial's Tune record what nothing reads again: the running statistics (max,
    min, mean, last-5 and last-10 means) Tune keeps of every number a trial reports, but for
    `kept_metrics`, and every checkpoint but the latest (the older ones are deleted from the storage by
    CheckpointPruner). Tune holds each finished trial's record, and its JSON, in the driver and writes
    it in every save of the search state, for the whole search: ~50 KB per trial of 24 numbers."""
    metadata = trial.run_metadata
    for name in [name for name in metadata.metric_analysis if name not in kept_metrics]:
        del metadata.metric_analysis[name]
        metadata.metric_n_steps.pop(name, None)
    manager = metadata.checkpoint_manager
    if manager is not None and manager.latest_checkpoint_result is not None:
        manager._checkpoint_results = [manager.latest_checkpoint_result]
    metadata.invalidate_cache()  # Tune keeps the record's JSON until told it changed


def reload_core_config() -> None:
    """Make Ray's C++ core read its settings (RAY_AUTH_MODE among them) from the environment again."""
    from ray._raylet import Config

    Config.initialize("")


def gcs_needs_token(address: str, timeout_s: float) -> bool:
    """Does the GCS at HOST:PORT refuse a client without a token? Raises grpc.RpcError if it does
    not answer at all."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    request = gcs_service_pb2.InternalKVGetRequest(key=b"session_name", namespace=b"session")
    with grpc.insecure_channel(address) as channel:
        try:
            gcs_service_pb2_grpc.InternalKVGcsServiceStub(channel).InternalKVGet(request, timeout=timeout_s)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                return True
            raise
    return False


class KilledForMemory(RayActorError):
    """A trial's process killed by Ray's memory monitor (its node past `RAY_memory_usage_threshold`). Ray
    reports the kill to the trial's pending task as `OutOfMemoryError` (ray-project/ray#28937), which Tune's
    actor manager does not expect of an actor task: it raises, and the whole search ends. As this actor
    error, the kill takes the path of any dead trial process (a node lost, a worker crashed): the trial
    fails once, and is retried from its last checkpoint up to `budget.max_failures` times, or errors.
    Its message ends with one line saying so (an errored trial's outcome quotes the last line)."""

    def __init__(self, message: str):
        reason = next((line.strip() for line in message.splitlines() if line.startswith("OOM kill reason:")),
                      message.split("\n", 1)[0])
        summary = f"KilledForMemory: killed by Ray's memory monitor: {reason.removeprefix('OOM kill reason: ')}"
        super().__init__(error_msg=f"{message}\n{summary}")
        self.args = (message,)  # what pickling (Tune keeps an errored trial's error) calls it with again


def count_memory_kills_as_trial_failures() -> None:
    """A trial killed by Ray's memory monitor fails alone; the search goes on. Tune's actor manager takes an
    OutOfMemoryError as the death of the trial's actor (see KilledForMemory), on a task of the trial and on
    its start alike; and a trial whose actor died and that errors is saved as errored: Tune marks a stopped
    trial for the next snapshot of the search only while its actor is alive, so the search's saved state
    kept it RUNNING (a finished search then looked interrupted, and --resume would run it again). Reaches
    Tune's private RayActorManager._actor_task_failed and _actor_start_failed, and TuneController's
    _schedule_trial_stop and _mark_trial_to_checkpoint."""
    from ray.air.execution._internal.actor_manager import RayActorManager
    from ray.tune.execution.tune_controller import TuneController

    for owner, name, patch in ((RayActorManager, "_actor_task_failed", _memory_kill_as_actor_death),
                               (RayActorManager, "_actor_start_failed", _memory_kill_as_actor_death),
                               (TuneController, "_schedule_trial_stop", _saved_once_stopped)):
        method = getattr(owner, name)
        if not getattr(method, "aesearch_patched", False):
            setattr(owner, name, patch(method))


def _memory_kill_as_actor_death(failed):
    def as_actor_death(value):
        return KilledForMemory(str(value)) if isinstance(value, OutOfMemoryError) else value

    @functools.wraps(failed)
    def handle(self, *args, **kwargs):  # Tune passes (tracked actor or task, exception), by keyword
        failed(self, *map(as_actor_death, args), **{name: as_actor_death(v) for name, v in kwargs.items()})

    handle.aesearch_patched = True
    return handle


def _saved_once_stopped(stop):
    @functools.wraps(stop)
    def schedule_trial_stop(self, trial, *args, **kwargs):
        stop(self, trial, *args, **kwargs)
        self._mark_trial_to_checkpoint(trial)

    schedule_trial_stop.aesearch_patched = True
    return schedule_trial_stop


class MarkingOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch that tells Optuna which trials were stopped early. Ray tells Optuna a stopped
    trial's last result as if the trial had completed; here its Optuna trial also gets the user
    attribute `stopped_at_epoch`, and with `stopped_as_pruned` it is told as PRUNED instead: Optuna's
    TPE then ranks it below every completed trial, by how far it got and then by its last value (for
    one objective, from the values Ray reported each epoch), as it ranks the trials its own pruners
    stop. Reaches OptunaSearch's private `_ot_trials`, `_ot_study` and `_completed_trials`."""

    def __init__(self, *args: Any, max_epochs: int, stopped_as_pruned: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_epochs, self.stopped_as_pruned = max_epochs, stopped_as_pruned

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        from optuna.trial import TrialState

        optuna_trial = self._ot_trials.get(trial_id)
        ended = Outcome.from_report(result or {})
        stopped = optuna_trial is not None and not error and ended.kind == "stopped" and ended.epoch < self.max_epochs
        if not stopped or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result, error)
            return
        optuna_trial.set_user_attr("stopped_at_epoch", ended.epoch)
        if not self.stopped_as_pruned:
            super().on_trial_complete(trial_id, result, error)
            return
        if isinstance(self.metric, str) and self.metric in result:  # the value at the stop: Ray reports
            optuna_trial.report(result[self.metric], result["training_iteration"])  # it here, not as a result
        self._ot_study.tell(optuna_trial, state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)
