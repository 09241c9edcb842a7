"""The private Ray APIs of aesearch/search/ray_api.py, each checked against the installed Ray: an
upgrade that moves one fails here, naming it, rather than deep inside a search."""

import importlib
import inspect
from pathlib import Path

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


def test_the_run_metadata_still_names_its_latest_checkpoint(tmp_path):
    """A trial's run metadata, as a search state stores it: none before its first checkpoint (no error on the
    way), then the newest of those it registered, not the first or the best."""
    from ray import tune
    from ray.train._internal.checkpoint_manager import _TrainingResult
    from ray.tune.experiment import Trial

    metadata = Trial("run_trial", stub=True).run_metadata
    assert ray_api.latest_checkpoint(metadata.get_json_state()) is None
    for epoch, loss in ((1, 0.5), (2, 0.1), (3, 0.9)):  # the best is epoch 2's; the latest, epoch 3's
        (tmp_path / str(epoch)).mkdir()
        metadata.checkpoint_manager.register_checkpoint(
            _TrainingResult(tune.Checkpoint.from_directory(str(tmp_path / str(epoch))), {"loss": loss}))
        metadata.invalidate_cache()
        assert ray_api.latest_checkpoint(metadata.get_json_state()).path == str(tmp_path / str(epoch))


def test_storage_opens_with_tunes_filesystem(tmp_path):
    from pyarrow.fs import LocalFileSystem

    fs, path = ray_api.filesystem_and_path(str(tmp_path))
    assert isinstance(fs, LocalFileSystem) and path == str(tmp_path)
    assert ray_api.newest_experiment_state(str(tmp_path)) is None  # no search state saved there yet


def test_a_compacted_trial_record_keeps_its_last_result_the_kept_statistics_and_its_latest_checkpoint(tmp_path):
    """On a real Tune trial record: three epochs reported, each with a checkpoint; compacted, it holds the
    same last result, statistics of the kept metric only, its newest checkpoint only, and its JSON (what
    each save of the search state writes) shrinks and says so."""
    from ray import tune
    from ray.train._internal.checkpoint_manager import _TrainingResult
    from ray.tune.experiment import Trial
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    trial = Trial("run_trial", stub=True)
    metadata = trial.run_metadata
    for epoch in (1, 2, 3):
        result = {"val/recon_mse": 1.0 / epoch, "train/loss": 2.0 / epoch, "test/psnr": 10.0 * epoch,
                  "training_iteration": epoch}
        trial.update_last_result(result)
        (tmp_path / str(epoch)).mkdir()
        metadata.checkpoint_manager.register_checkpoint(
            _TrainingResult(tune.Checkpoint.from_directory(str(tmp_path / str(epoch))), result))
    before = metadata.get_json_state()  # cached, as Tune caches it

    ray_api.compact_finished_trial(trial, {"val/recon_mse"})
    after = metadata.get_json_state()
    restored = _TrainingRunMetadata.from_json_state(after)
    assert len(after) < len(before)
    assert restored.last_result == trial.last_result and restored.last_result["test/psnr"] == 30.0
    assert set(restored.metric_analysis) == set(restored.metric_n_steps) == {"val/recon_mse"}
    assert restored.metric_analysis["val/recon_mse"]["min"] == 1 / 3
    assert [r.checkpoint.path for r in restored.checkpoint_manager.best_checkpoint_results] == [str(tmp_path / "3")]
    assert ray_api.latest_checkpoint(after).path == str(tmp_path / "3")


def test_the_pruner_decodes_only_the_stored_trial_records_that_changed_since_it_last_pruned(tmp_path, monkeypatch):
    """On real Tune trial records in a stored search state: each trial keeps only the checkpoint the state
    would restore; pruning again decodes no record that did not change (a finished trial's), and a trial
    that reported a newer checkpoint since is pruned to it."""
    import json

    from ray import tune
    from ray.train._internal.checkpoint_manager import _TrainingResult
    from ray.tune.experiment import Trial

    from aesearch.search import storage

    experiment = tmp_path / "search"
    trials = {}
    for name in ("trial_a", "trial_b"):
        trial = Trial("run_trial", stub=True)
        trial.relative_logdir = name
        trials[name] = trial

    def report_checkpoint(name: str, number: int) -> None:
        folder = experiment / name / f"checkpoint_{number:06d}"
        folder.mkdir(parents=True)
        trials[name].run_metadata.checkpoint_manager.register_checkpoint(
            _TrainingResult(tune.Checkpoint.from_directory(str(folder)), {"training_iteration": number + 1}))
        trials[name].run_metadata.invalidate_cache()

    def save_state(stamp: str) -> None:
        state = {"trial_data": [trial.get_json_state() for trial in trials.values()]}
        (experiment / f"experiment_state-2026-12-07_00-00-{stamp}.json").write_text(json.dumps(state))

    def checkpoints(name: str) -> list[str]:
        return sorted(p.name for p in (experiment / name).iterdir())

    decoded = []
    original = storage.restorable_checkpoint
    monkeypatch.setattr(storage, "restorable_checkpoint", lambda record: decoded.append(record) or original(record))
    for number in range(3):
        report_checkpoint("trial_a", number)
    for number in range(2):
        report_checkpoint("trial_b", number)
    save_state("01")
    seen: set[int] = set()
    storage.prune_checkpoints(str(experiment), seen=seen)
    assert checkpoints("trial_a") == ["checkpoint_000002"] and checkpoints("trial_b") == ["checkpoint_000001"]
    assert len(decoded) == 2
    storage.prune_checkpoints(str(experiment), seen=seen)  # nothing changed: nothing decoded
    assert len(decoded) == 2
    report_checkpoint("trial_b", 2)  # trial_b goes on; trial_a has ended
    save_state("02")
    storage.prune_checkpoints(str(experiment), seen=seen)
    assert len(decoded) == 3 and checkpoints("trial_b") == ["checkpoint_000002"]
    (experiment / "trial_c" / "checkpoint_000000").mkdir(parents=True)  # started after the last save
    # trial_a's last report: Tune numbered its checkpoint, whose upload failed (the storage down), and the
    # trial then errored; its record, already pruned to, does not change. The search's end removes it.
    (experiment / "trial_a" / "checkpoint_000003").mkdir()
    storage.prune_checkpoints(str(experiment), seen=seen)
    assert checkpoints("trial_a") == ["checkpoint_000002", "checkpoint_000003"]  # unchanged: not listed again
    storage.prune_checkpoints(str(experiment), search_ended=True, seen=seen)
    assert checkpoints("trial_a") == ["checkpoint_000002"] and checkpoints("trial_c") == []
    assert checkpoints("trial_b") == ["checkpoint_000002"]


def test_the_checkpoints_of_trials_outside_the_best_go_through_one_filesystem_not_each_trials_copy(tmp_path):
    """Each Tune trial holds a copy of the search's filesystem; an S3 one keeps a connection (a socket and an
    eventfd) open once used, so pruning through each trial's copy leaked two file descriptors per trial
    until a 10,000-trial search on S3 ran out of them. Every trial is pruned through the first one's: here a
    trial whose own copy reaches nothing (rooted elsewhere) still loses its checkpoints."""
    from pyarrow.fs import LocalFileSystem, SubTreeFileSystem
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    from aesearch.locations import sqlite_uri
    from aesearch.search.callbacks import RunCloser
    from aesearch.search.space import parse_space
    from aesearch.tracking.outcomes import REPORTED
    from aesearch.tracking.store import Tracking

    space = parse_space({"name": "s", "space": {"model.latent_dim": {"type": "categorical", "choices": [4, 8]}},
                         "budget": {"keep_checkpoints": 1}})
    closer = RunCloser(space, Tracking(uri=sqlite_uri(tmp_path / "mlflow.db"), experiment_id="0", parent_run_id="",
                                         patience_s=1.0))
    closer.setup()
    candidates, last_results = {}, {}
    for number, error in enumerate([0.1, 0.2, 0.3]):
        trial = Trial("run_trial", stub=True)
        trial.storage = StorageContext(storage_path=str(tmp_path / "results"), experiment_dir_name="s",
                                       trial_dir_name=f"trial_{number}")
        (Path(trial.storage.trial_fs_path) / "checkpoint_000000").mkdir(parents=True)
        candidates[trial.trial_id] = trial
        last_results[trial.trial_id] = {"val/recon_mse": error, "val/loss": error, "epoch": 1.0,
                                        REPORTED["completed"]: 1.0}
    trials = list(candidates.values())
    trials[2].storage.storage_filesystem = SubTreeFileSystem(str(tmp_path / "elsewhere"), LocalFileSystem())
    closer._drop_outside_the_best(candidates, last_results)
    kept = [any(Path(trial.storage.trial_fs_path).iterdir()) for trial in trials]
    assert kept == [True, False, False]  # the best keeps its checkpoint; the other two lose theirs
    assert closer.filesystem is trials[1].storage.storage_filesystem  # the first trial it pruned


def test_at_the_end_tune_reads_every_trials_results_through_the_one_filesystem(tmp_path):
    """At the end of a search Tune reads each trial's result file through the trial's own copy of the
    filesystem (ExperimentAnalysis): on S3 a connection each, and a 10,000-trial search ran out of file
    descriptors there. The search's end routes every trial through one: here the trials' own copies reach
    nothing (rooted elsewhere), and Tune still finds every result."""
    import json

    from pyarrow.fs import LocalFileSystem, SubTreeFileSystem
    from ray.train._internal.storage import StorageContext
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial

    from aesearch.locations import sqlite_uri
    from aesearch.search.callbacks import RunCloser
    from aesearch.search.space import parse_space
    from aesearch.tracking.store import Tracking

    space = parse_space({"name": "s", "space": {"model.latent_dim": {"type": "categorical", "choices": [4, 8]}}})
    closer = RunCloser(space, Tracking(uri=sqlite_uri(tmp_path / "mlflow.db"), experiment_id="0", parent_run_id="",
                                         patience_s=1.0))
    closer.setup()
    closer.filesystem = LocalFileSystem()  # the one the search's first trial brought
    trials = []
    for number in range(3):
        trial = Trial("run_trial", stub=True)
        trial.storage = StorageContext(storage_path=str(tmp_path / "results"), experiment_dir_name="s",
                                       trial_dir_name=f"trial_{number}")
        folder = Path(trial.storage.trial_fs_path)
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps({"val/recon_mse": 0.1 * (number + 1), "training_iteration": 1,
                                                        "trial_id": trial.trial_id}) + "\n")
        trial.storage.storage_filesystem = SubTreeFileSystem(str(tmp_path / "elsewhere"), LocalFileSystem())
        trials.append(trial)
    closer.on_experiment_end(trials)
    assert all(trial.storage.storage_filesystem is closer.filesystem for trial in trials)
    state = tmp_path / "results" / "s" / "experiment_state-0.json"  # as Tune names it (not read: trials given)
    analysis = ExperimentAnalysis(str(state), trials=trials, storage_filesystem=LocalFileSystem(),
                                  default_metric="val/recon_mse", default_mode="min")
    frames = analysis.trial_dataframes
    assert sorted(round(frame["val/recon_mse"].iloc[0], 3) for frame in frames.values()) == [0.1, 0.2, 0.3]
