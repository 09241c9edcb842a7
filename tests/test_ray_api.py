"""The private Ray APIs of aesearch/search/ray_api.py, each checked against the installed Ray: an
upgrade that moves one fails here, naming it, rather than deep inside a search."""

import importlib
import inspect

import pytest
import ray

from aesearch.search import ray_api

PRIVATE = [  # module, name, parameters ray_api passes it
    ("ray.train._internal.storage", "get_fs_and_path", ["storage_path", "storage_filesystem"]),
    ("ray.tune.execution.experiment_state", "_find_newest_experiment_checkpoint", ["experiment_path"]),
    ("ray.tune.trainable.metadata", "_TrainingRunMetadata", []),
    ("ray._raylet", "Config", []),
    ("ray.core.generated.gcs_service_pb2_grpc", "InternalKVGcsServiceStub", []),
    ("ray.core.generated.gcs_service_pb2", "InternalKVGetRequest", []),
    ("ray.air.execution._internal.actor_manager", "RayActorManager._actor_task_failed",
     ["self", "tracked_actor_task", "exception"]),
    ("ray.air.execution._internal.actor_manager", "RayActorManager._actor_start_failed",
     ["self", "tracked_actor", "exception"]),
    ("ray.tune.execution.tune_controller", "TuneController._schedule_trial_stop", ["self", "trial", "exception"]),
    ("ray.tune.execution.tune_controller", "TuneController._mark_trial_to_checkpoint", ["self", "trial"]),
]


@pytest.mark.parametrize("module, name, parameters", PRIVATE, ids=[f"{m}.{n}" for m, n, _ in PRIVATE])
def test_each_private_ray_api_is_where_aesearch_reaches_it(module, name, parameters):
    where = f"Ray {ray.__version__} has no {module}.{name} (or it changed): update aesearch/search/ray_api.py"
    try:
        found = importlib.import_module(module)
        for part in name.split("."):  # a function, a class, or a method of one
            found = getattr(found, part)
    except (ImportError, AttributeError) as error:
        pytest.fail(f"{where} ({error})")
    if parameters:
        assert list(inspect.signature(found).parameters)[: len(parameters)] == parameters, where


def test_the_run_metadata_still_names_its_latest_checkpoint():
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    state = _TrainingRunMetadata().get_json_state()  # a trial's metadata as a search state stores it
    assert ray_api.latest_checkpoint(state) is None  # no checkpoint yet, and no error on the way


def test_storage_opens_with_tunes_filesystem(tmp_path):
    from pyarrow.fs import LocalFileSystem

    fs, path = ray_api.filesystem_and_path(str(tmp_path))
    assert isinstance(fs, LocalFileSystem) and path == str(tmp_path)
    assert ray_api.newest_experiment_state(str(tmp_path)) is None  # no search state saved there yet
