"""The search's folder in its storage (a local folder or s3://, gs://, file://), and its checkpoints.

Ray Tune writes the experiment there; aesearch adds the space as launched, the tracking store it
logs to and the leaderboard, and prunes trial checkpoints no resume can need.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aesearch.errors import UserError
from aesearch.search import ray_api

TRACKING_FILE = "tracking_uri"  # where the search logs, so --resume logs there too


class SearchFolder:
    """The search's folder in its storage, a local folder or a URI (s3://, gs://, file://) alike:
    read and written through the filesystem Ray Tune itself writes it with (pyarrow's)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.path = ray_api.filesystem_and_path(uri)

    def exists(self, name: str = "") -> bool:
        return self.exists_at(f"{self.path}/{name}".rstrip("/"))

    def exists_at(self, path: str) -> bool:
        from pyarrow.fs import FileType

        return self.fs.get_file_info(path).type != FileType.NotFound

    def bucket(self) -> str | None:
        """The bucket of an object store's URI (s3://BUCKET/..., gs://BUCKET/...); None for a folder."""
        from pyarrow.fs import LocalFileSystem

        return None if isinstance(self.fs, LocalFileSystem) else self.path.split("/", 1)[0]

    def read(self, name: str) -> str:
        with self.fs.open_input_stream(f"{self.path}/{name}") as stream:
            return stream.readall().decode("utf-8")

    def write(self, name: str, text: str) -> None:
        self.fs.create_dir(self.path, recursive=True)
        with self.fs.open_output_stream(f"{self.path}/{name}") as stream:
            stream.write(text.encode("utf-8"))


# pyarrow's S3 errors worth waiting out (its own client already retried a few times): no connection,
# the server busy or failing, rather than a refusal (no such bucket, a wrong key).
TRANSIENT_S3 = re.compile(r"AWS Error (NETWORK_CONNECTION|SERVICE_UNAVAILABLE|SLOW_DOWN|INTERNAL_FAILURE|"
                          r"REQUEST_TIMEOUT|THROTTLING)|HTTP status 5\d\d")


def storage_unreachable(error: BaseException) -> bool:
    """The storage did not answer (an S3 server down or restarting): worth trying again later."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (ConnectionError, TimeoutError)) or TRANSIENT_S3.search(str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class FinalUploadWatch(logging.Handler):
    """Ray Tune uploads the search's staged state (the experiment state, the searcher's, every trial's
    results) to the storage once more when the search ends, and when the storage does not answer then
    it only logs so: `--resume` and `report` would read an older state. `with FinalUploadWatch() as
    watch: tuner.fit()`, then `watch.failed` says whether that last upload failed."""

    LOGGER, MESSAGE = "ray.tune.tune", "Experiment state snapshotting failed"  # as Ray 2.60 logs it

    def __init__(self):
        super().__init__(logging.ERROR)
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.MESSAGE):
            self.failed = True

    def __enter__(self) -> FinalUploadWatch:
        logging.getLogger(self.LOGGER).addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger(self.LOGGER).removeHandler(self)


def upload_folder(local: str, experiment_path: str) -> None:
    """Copy the local folder's files into the search's folder in its storage (what Tune's upload does)."""
    from pyarrow.fs import LocalFileSystem, copy_files

    folder = SearchFolder(experiment_path)
    folder.fs.create_dir(folder.path, recursive=True)
    copy_files(local, folder.path, source_filesystem=LocalFileSystem(), destination_filesystem=folder.fs)


def check_storage_has_no_credentials(storage: str) -> None:
    """Storage URIs are printed, logged as tags and saved with the search: credentials go elsewhere."""
    parts = urlsplit(storage)
    secret_params = {"access_key", "secret_key", "session_token"} & set(parse_qs(parts.query))
    if "://" in storage and (parts.username or parts.password or secret_params):
        raise UserError(
            f"--storage {parts.scheme}://***@{parts.hostname}{parts.path}: credentials in the URI are refused; "
            "give every node its own (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in its environment, or a role)"
        )


def remove_stored_checkpoints(fs, trial_dir: str, before: str | None = None) -> None:
    """Deletes a trial's checkpoint folders in its storage (only those older than `before`, if given)."""
    from pyarrow.fs import FileSelector, FileType

    for info in fs.get_file_info(FileSelector(trial_dir, allow_not_found=True)):
        if info.type == FileType.Directory and info.base_name.startswith("checkpoint_") and (
            before is None or info.base_name < before
        ):
            fs.delete_dir(info.path)


def prune_checkpoints(experiment_path: str, search_ended: bool = False, seen: set[int] | None = None) -> None:
    """Deletes each trial's checkpoints older than the one its stored search state would restore.

    The stored state only ever moves forward, so a checkpoint older than the one it names now is
    never needed again: not by `--resume`, not by the leaderboard (which reads the newest).
    `seen` (kept by the caller between saves): the stored trial records already pruned to, by hash. A
    record unchanged since is neither decoded nor its folder listed again: most of a large search, whose
    finished trials' records do not change (decoding every record took 0.9 s of the driver at 10,000).
    Once the search has ended (its final state stored), `keep_only_restorable` finishes the job.
    """
    stored = stored_trials(experiment_path)
    if stored is None:
        return  # not written yet, or caught mid-upload: keep everything until the next save
    fs, folder, records = stored
    if search_ended:
        keep_only_restorable(fs, folder, records)
        return
    seen = set() if seen is None else seen
    for record in records:
        key = hash(record)
        if key in seen:
            continue
        trial_dir, newest = restorable_checkpoint(record)
        if newest is not None:
            remove_stored_checkpoints(fs, f"{folder}/{trial_dir}", before=newest)
        seen.add(key)


def keep_only_restorable(fs, folder: str, records: list[tuple[str, str]]) -> None:
    """At the search's end, from one listing of its whole folder: every checkpoint folder but the one the
    final state would restore goes, whatever the prunes during the search saw. A report retried while
    the storage did not answer leaves a folder no record names (Tune numbers the checkpoint before it
    uploads it), and a trial a killed driver started after its last save is named by no record at all:
    `--resume` sampled afresh instead (its reports stay, as its MLflow run stays, deleted but restorable)."""
    from pyarrow.fs import FileSelector, FileType

    restorable = dict(restorable_checkpoint(record) for record in records)
    for info in fs.get_file_info(FileSelector(folder, recursive=True, allow_not_found=True)):
        trial_dir, _, name = info.path[len(folder) + 1:].rpartition("/")
        if info.type == FileType.Directory and name.startswith("checkpoint_") and "/" not in trial_dir \
                and restorable.get(trial_dir) != name:
            fs.delete_dir(info.path)


def stored_trials(experiment_path: str) -> tuple[Any, str, list[tuple[str, str]]] | None:
    """(filesystem, experiment folder, each trial's record: its JSON and its run metadata's) from the
    stored search state; None if there is none to read."""
    try:
        fs, _ = ray_api.filesystem_and_path(experiment_path)
        state_file = ray_api.newest_experiment_state(experiment_path)  # a path in that filesystem, no scheme
        if state_file is None:
            return None
        with fs.open_input_stream(state_file) as stream:
            state = json.loads(stream.readall())
    except (OSError, ValueError):
        return None
    return fs, state_file.rsplit("/", 1)[0], [tuple(record) for record in state["trial_data"]]


def restorable_checkpoint(record: tuple[str, str]) -> tuple[str, str | None]:
    """A stored trial record's folder, and the checkpoint resuming it would restore (None: none)."""
    trial_json, run_metadata_json = record
    checkpoint = ray_api.latest_checkpoint(run_metadata_json)
    name = checkpoint.path.rstrip("/").rsplit("/", 1)[1] if checkpoint is not None else None
    return json.loads(trial_json)["relative_logdir"], name
