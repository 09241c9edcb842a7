"""The private Ray APIs aesearch reaches, all here, for the Ray range pyproject declares.

Ray has no public way yet to (0) tell Optuna that a trial was stopped early, (1) open a storage URI with the filesystem Tune writes it with,
(2) find which checkpoint a stored search state would restore, (3) make its C++ core re-read the
authentication mode of this process, (4) ask a cluster's GCS a question without a token.
`tests/test_ray_api.py` fails loudly, naming the API, when a Ray upgrade moves one of them.
"""

from __future__ import annotations

from typing import Any

from ray.tune.search.optuna import OptunaSearch

from aesearch.tracking.outcomes import Outcome


def filesystem_and_path(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) for a local folder or a URI, as Ray Tune opens its storage."""
    from ray.train._internal.storage import get_fs_and_path

    return get_fs_and_path(uri, None)


def newest_experiment_state(experiment_path: str) -> str | None:
    """The newest saved search state file of a Tune experiment, or None before the first save."""
    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint

    return _find_newest_experiment_checkpoint(experiment_path)


def latest_checkpoint(run_metadata_json: str) -> Any | None:
    """The checkpoint a trial's saved run metadata (in a search state) would restore, or None."""
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    manager = _TrainingRunMetadata.from_json_state(run_metadata_json).checkpoint_manager
    latest = manager.latest_checkpoint_result if manager else None
    return latest.checkpoint if latest is not None else None


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
