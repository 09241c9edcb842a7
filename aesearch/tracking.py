"""MLflow tracking: one experiment per search, a parent run for the search, one child run per trial.

    experiment <search name>              tagged so the UI opens on its training runs
      run <search name>                   space.yaml, seed, dataset fingerprint, versions, git commit,
                                          cluster size, leaderboard.csv, the best model (registered)
        run beta_vae-dense-z16-b2-#17     one per Tune trial: the resolved config as params, tags,
                                          per-epoch metrics (step = epoch), test/... metrics,
                                          images/, config.yaml, checkpoints/best.pt

A trial logs its own run from inside the trial (`TrialRun`), the only thing that writes it; a
trial restored from a checkpoint finds its run again by its Ray trial id and goes on in it. The
driver (`SearchRun`) owns the parent run and gives every child run its outcome and terminal
status when Tune is done with the trial, so no run is left "running" after a search.

Where: `--tracking-uri`, else MLFLOW_TRACKING_URI, else an embedded SQLite store in the working
directory (`mlflow.db`, artifacts in `mlartifacts/`). An `mlflow server` over HTTP with proxied
artifacts lets trials on any node log without shared disk. Credentials go in MLflow's own
variables (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD), never in the URI.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import platform
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import torch
import yaml

from aesearch.config import TrainConfig, flatten, variant_family
from aesearch.errors import UserError

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from aesearch.data import Data
    from aesearch.train import EpochEnd, TrainResult

# No download progress bars or INFO chatter in the search's output, no usage reports sent home
# from every trial process (the user's environment can say otherwise).
MLFLOW_SETTINGS = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # a line per closed run on a server; aesearch says where
}
for _key, _value in MLFLOW_SETTINGS.items():
    os.environ.setdefault(_key, _value)

EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlartifacts"
TRIAL_ID_TAG = "aesearch.trial_id"
TRIAL_NUMBER_TAG = "aesearch.trial_number"  # the trial's ordinal in its search, from 1
ROLE_TAG = "aesearch.role"  # "search" (the parent run), "trial" or "reproduction"
REPRODUCES_TAG = "aesearch.reproduces"  # a reproduction's original run
OUTCOME_TAG = "outcome"
ATTEMPT_TAG = "aesearch.attempt"  # 1 for a trial's first run, +1 for each retry or resume
INCOMPLETE_TAG = "tracking"  # set when records of the run never reached the server
BEST_CHECKPOINT = "checkpoints/best.pt"
MLFLOW_BATCH = 100  # MLflow takes at most 100 params (and 1000 metrics) per log_batch call


def resolve_tracking_uri(flag: str | None) -> str:
    """`--tracking-uri`, else MLFLOW_TRACKING_URI, else the embedded store in the working directory."""
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / EMBEDDED_DB}"
    parts = urlsplit(uri)
    if parts.password or parts.username:  # it would reach logs, tags and Ray's job config
        raise UserError(
            f"--tracking-uri {parts.scheme}://***@{parts.hostname}: credentials in the URI are refused; "
            "put them in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
        )
    if parts.scheme not in ("sqlite", "http", "https", "file", "postgresql", "mysql", "databricks", ""):
        raise UserError(
            f"--tracking-uri {uri}: unsupported scheme {parts.scheme!r} (sqlite, http(s), file, postgresql, mysql)"
        )
    return uri


def check_store_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when no tracking server answers (MLflow's client retries)."""
    import urllib.error
    import urllib.request

    if urlsplit(uri).scheme not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        return  # something answers (a proxy or auth may guard /health): MLflow's client says more
    except OSError as error:
        reason = getattr(error, "reason", None) or error
        raise UserError(f"--tracking-uri {uri}: no MLflow tracking server answers there ({reason})") from None


def check_store_exists(uri: str) -> None:
    """Reading a store that is not there must not create one (opening SQLite would)."""
    parts = urlsplit(uri)
    local = {"sqlite": uri.partition(":///")[2], "file": parts.path, "": uri}.get(parts.scheme)
    if local and not Path(local).exists():
        raise UserError(f"--tracking-uri {uri}: no such store yet (run a search first)")
    check_store_reachable(uri)


def is_local_store(uri: str) -> bool:
    """A store only this machine (or a shared disk) can reach."""
    return urlsplit(uri).scheme in ("sqlite", "file", "")


def embedded_artifacts(uri: str, experiment: str) -> str | None:
    """For a SQLite store, artifacts live beside the database file; other stores decide themselves."""
    parts = urlsplit(uri)
    if parts.scheme != "sqlite":
        return None
    return (Path(parts.path).parent / EMBEDDED_ARTIFACTS / experiment).as_uri()


@contextlib.contextmanager
def fluent_api_on(uri: str) -> Iterator[None]:
    """MLflow's fluent API (`mlflow.search_runs`, `mlflow.pytorch.log_model`) on `uri` for the
    duration only: `set_tracking_uri` also sets MLFLOW_TRACKING_URI for the whole process and its
    children, where it would become every later command's default store."""
    import mlflow

    before = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before["MLFLOW_TRACKING_URI"])  # None: unset again
        mlflow.set_registry_uri(before["MLFLOW_REGISTRY_URI"])
        if before["MLFLOW_REGISTRY_URI"] is None:
            os.environ.pop("MLFLOW_REGISTRY_URI", None)


def client(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ui_command(flag: str | None, port: int) -> tuple[list[str], str]:
    """`mlflow server` on 127.0.0.1 for a store, without the background job workers a UI does not need."""
    import sys

    uri = resolve_tracking_uri(flag)
    if not is_local_store(uri):
        raise UserError(f"--tracking-uri {uri}: a tracking server already serves its own UI; open it in a browser")
    check_store_exists(uri)
    os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
    return command, uri


@dataclass(frozen=True)
class Tracking:
    """Where a search logs; picklable, so it travels with every trial to any node."""

    uri: str
    experiment_id: str
    parent_run_id: str
    patience_s: float  # budget.tracking_patience_s: how long an unreachable server is waited for


# --- names and tags ---------------------------------------------------------------------------


def run_name(config: TrainConfig, number: str) -> str:
    """Readable and unique within a search: `beta_vae-dense-z16-b2-#17`, `denoising-conv-z8-gaussian0.3-#4`."""
    family, architecture = variant_family(config), config.model.architecture
    parts = [family] if family == architecture else [family, architecture]
    parts.append(f"z{config.model.latent_dim}")
    if config.model.latent == "gaussian":
        parts.append(f"b{config.objective.kl.beta:.3g}")
    if config.corruption.kind != "none":
        parts.append(f"{config.corruption.kind}{config.corruption.level:.3g}")
    return "-".join(parts) + f"-#{number}"


def objective_summary(config: TrainConfig) -> str:
    """The loss as a formula of named terms, e.g. `mse + 2*kl(linear)` or `bce + 0.001*sparsity_kl`."""
    objective = config.objective
    terms = [objective.reconstruction]
    if config.model.latent == "gaussian":
        terms.append(f"{objective.kl.beta:g}*kl({objective.kl.schedule})")
    if objective.sparsity.kind != "none":
        terms.append(f"{objective.sparsity.weight:g}*sparsity_{objective.sparsity.kind}")
    if objective.contractive_weight > 0:
        terms.append(f"{objective.contractive_weight:g}*contractive")
    return " + ".join(terms)


def trial_tags(config: TrainConfig) -> dict[str, str]:
    noise = config.corruption.kind
    return {
        "family": variant_family(config),
        "architecture": config.model.architecture,
        "latent": config.model.latent,
        "noise": noise if noise == "none" else f"{noise}:{config.corruption.level:g}",
        "objective": objective_summary(config),
        "dataset": config.data.name,
    }


def as_param(value: Any) -> str:
    return "null" if value is None else str(value)


# --- when the tracking server does not answer -------------------------------------------------


def is_unreachable(error: BaseException) -> bool:
    """The tracking server did not answer (down, restarting, overloaded): worth trying again later.
    MLflow wraps the HTTP client's error in an MlflowException; its cause or context names it."""
    import requests

    transient = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.RetryError,
                 ConnectionError, TimeoutError)
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, transient) or "Max retries exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def describe_error(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


class Outbox:
    """What is sent to the tracking server, delivered in order. While the server does not answer,
    everything is kept (files copied aside) and training goes on; each later send tries again (at
    most every `retry_every_s`), and `deliver` waits for it, up to a patience, at the end. What could
    not be delivered is named by `undelivered`, never dropped in silence."""

    def __init__(self, retry_every_s: float = 5.0, on_error: Any = None):
        self.pending: list[tuple[str, Any]] = []  # (what, a call that delivers it)
        self.on_error = on_error  # given: other errors are handed to it (and the item dropped), not raised
        self.spool = tempfile.TemporaryDirectory(prefix="aesearch-outbox-")
        self.retry_every_s = retry_every_s
        self.failed_at: float | None = None  # when the server last did not answer
        self.last_error = ""
        self.seconds = 0.0  # time spent delivering (and waiting for the server)

    def send(self, what: str, deliver: Any) -> None:
        self.pending.append((what, deliver))
        self.flush()

    def send_file(self, path: Path | str, artifact_path: str, client: MlflowClient, run_id: str) -> None:
        """An artifact: a copy waits in the spool until the server has it."""
        import shutil

        kept = Path(tempfile.mkdtemp(dir=self.spool.name)) / Path(path).name
        shutil.copyfile(path, kept)

        def deliver() -> None:
            client.log_artifact(run_id, str(kept), artifact_path)
            shutil.rmtree(kept.parent, ignore_errors=True)

        self.send(f"{artifact_path}/{kept.name}", deliver)

    def flush(self, force: bool = False) -> bool:
        """Deliver what waits, in order; False if the server still does not answer."""
        if not force and self.failed_at is not None and time.monotonic() - self.failed_at < self.retry_every_s:
            return False
        started = time.perf_counter()
        try:
            return self._deliver_pending()
        finally:
            self.seconds += time.perf_counter() - started

    def _deliver_pending(self) -> bool:
        while self.pending:
            try:
                self.pending[0][1]()
            except Exception as error:
                if is_unreachable(error):
                    self.failed_at, self.last_error = time.monotonic(), describe_error(error)
                    return False
                if self.on_error is None:
                    raise
                self.on_error(self.pending[0][0], error)
            self.pending.pop(0)
        self.failed_at = None
        return True

    def deliver(self, patience_s: float) -> bool:
        """Wait (up to `patience_s`) until everything is delivered."""
        deadline = time.monotonic() + patience_s
        while not self.flush(force=True):
            if time.monotonic() >= deadline:
                return False
            pause = min(self.retry_every_s, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)
            self.seconds += pause
        return True

    def undelivered(self) -> str:
        """'' when everything arrived, else what did not and why."""
        if not self.pending:
            return ""
        names = ", ".join(what for what, _ in self.pending[:5]) + (", ..." if len(self.pending) > 5 else "")
        return f"{len(self.pending)} records not delivered ({names}): {self.last_error}"


def patiently(call: Any, patience_s: float, retry_every_s: float = 5.0) -> Any:
    """`call()`, tried again while the tracking server does not answer, up to `patience_s`."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return call()
        except Exception as error:
            if not is_unreachable(error) or time.monotonic() >= deadline:
                raise
            time.sleep(min(retry_every_s, max(0.0, deadline - time.monotonic())))


# --- inside a trial ---------------------------------------------------------------------------


def image_epochs(epochs: int) -> set[int]:
    """A few epochs to draw reconstructions at during training (the end is drawn anyway)."""
    return {e for e in (1, math.ceil(epochs / 4), math.ceil(epochs / 2), math.ceil(3 * epochs / 4)) if e < epochs}


def find_trial_run(mlflow: MlflowClient, experiment_id: str, trial_id: str) -> Any:
    """The run a Ray trial already has (it is being retried or resumed), or None."""
    found = mlflow.search_runs([experiment_id], filter_string=f"tags.`{TRIAL_ID_TAG}` = '{trial_id}'", max_results=1)
    return found[0] if found else None


def training_tags(config: TrainConfig, data: Data) -> dict[str, str]:
    """What a reproduction must match: the dataset's fingerprint and how the arithmetic ran
    (on the CPU, the thread count changes the order of float sums, and so the results)."""
    from aesearch.train import resolve_device

    device = resolve_device(config.runtime.device)
    described = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    return {"dataset_fingerprint": data.fingerprint, "device": f"{device.type}:{described}",
            "torch_threads": str(torch.get_num_threads())}


def create_run(mlflow: MlflowClient, experiment_id: str, name: str, tags: dict[str, str], config: TrainConfig) -> str:
    """A new run holding the resolved config: as flattened params (the same names for every
    variant) and as `config.yaml`."""
    from mlflow.entities import Param

    run_id = mlflow.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    params = [Param(k, as_param(v)) for k, v in flatten(config.model_dump(mode="json")).items()]
    for start in range(0, len(params), MLFLOW_BATCH):
        mlflow.log_batch(run_id, params=params[start : start + MLFLOW_BATCH], synchronous=True)
    mlflow.log_text(run_id, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), "config.yaml")
    return run_id


class TrialRun:
    """The MLflow run of one training: per-epoch metrics, images, the test suite, the best
    checkpoint. A search trial writes it from inside the trial (`for_trial`, which a restored
    trial continues); a local reproduction writes one the same way. Everything goes through an
    `Outbox`: a tracking server that stops answering delays the records, not the training."""

    def __init__(self, mlflow: MlflowClient, run_id: str, config: TrainConfig, data: Data, logged_through: int = 0,
                 attempt: int = 1, patience_s: float = 60.0):
        self.client, self.run_id, self.config, self.data = mlflow, run_id, config, data
        self.logged_through = logged_through  # epochs already in the run (a restored trial)
        self.attempt = attempt  # 1, then 2, 3... each time the trial is retried or resumed
        self.patience_s = patience_s  # how long `finish` waits for an unreachable server (a search: its budget's)
        self.draw_at = image_epochs(config.epochs)
        self.outbox = Outbox()
        self.open_seconds = 0.0  # finding or creating the run

    @property
    def seconds(self) -> float:
        """Time spent on the tracking server (not drawing pictures): benchmarks/ reads it."""
        return self.open_seconds + self.outbox.seconds

    @classmethod
    def for_trial(
        cls, tracking: Tracking, trial_id: str, number: str, config: TrainConfig, data: Data, node: str
    ) -> TrialRun:
        """The run of a Ray trial: found again by its trial id (a retry or a resumed search), else new.
        A trial that starts while the server does not answer waits for it (up to the patience)."""
        started = time.perf_counter()
        run = patiently(lambda: cls._open(tracking, trial_id, number, config, data, node), tracking.patience_s)
        run.open_seconds = time.perf_counter() - started
        return run

    @classmethod
    def _open(cls, tracking: Tracking, trial_id: str, number: str, config: TrainConfig, data: Data, node: str) -> TrialRun:
        mlflow = client(tracking.uri)
        tags = {"node": node, **training_tags(config, data)}
        existing = find_trial_run(mlflow, tracking.experiment_id, trial_id)
        if existing is None:
            from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

            tags |= {MLFLOW_PARENT_RUN_ID: tracking.parent_run_id, ROLE_TAG: "trial", TRIAL_ID_TAG: trial_id,
                     TRIAL_NUMBER_TAG: number, ATTEMPT_TAG: "1", **trial_tags(config)}
            run_id = create_run(mlflow, tracking.experiment_id, run_name(config, number), tags, config)
            return cls(mlflow, run_id, config, data, patience_s=tracking.patience_s)
        run_id = existing.info.run_id
        attempt = int(existing.data.tags.get(ATTEMPT_TAG, "1")) + 1
        mlflow.update_run(run_id, status="RUNNING")
        logged = mlflow.get_metric_history(run_id, "val/recon_mse")
        for key, value in {**tags, ATTEMPT_TAG: str(attempt)}.items():
            mlflow.set_tag(run_id, key, value)
        return cls(mlflow, run_id, config, data, logged_through=max((m.step for m in logged), default=0),
                   attempt=attempt, patience_s=tracking.patience_s)

    def set_tag(self, key: str, value: str) -> None:
        self.outbox.send(f"tag {key}", lambda: self.client.set_tag(self.run_id, key, value))

    def log_epoch(self, end: EpochEnd) -> None:
        """One batch of metrics per epoch (step = epoch); reconstructions at a few epochs."""
        if end.epoch <= self.logged_through:  # logged before the trial was restored
            return
        self.log_metrics(end.metrics, end.epoch)
        if end.epoch in self.draw_at:
            training = end.model.training
            with tempfile.TemporaryDirectory() as folder:
                picture = Path(folder) / f"epoch_{end.epoch:04d}.png"
                self._draw(end.model, self.data.val_x, picture)
                self.outbox.send_file(picture, "images/reconstructions", self.client, self.run_id)
            end.model.train(training)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Timestamped now: metrics that wait out an outage arrive with the time they were measured."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        for start in range(0, len(batch), 1000):
            part = batch[start : start + 1000]
            self.outbox.send(f"metrics of step {step}",
                             lambda part=part: self.client.log_batch(self.run_id, metrics=part, synchronous=True))

    def finish(self, result: TrainResult, best_checkpoint: Path | None, drawn: Path | None = None) -> str:
        """The test suite, the final pictures, the best checkpoint; then waits (up to the patience)
        until the server has everything. Returns what it could not deliver ('' if nothing).
        `drawn`: a local run folder whose pictures are already drawn (they are logged as they are)."""
        from aesearch.images import save_images

        self.log_metrics(result.metrics, len(result.history))
        with tempfile.TemporaryDirectory() as folder:
            if drawn is None:
                device = next(result.model.parameters()).device
                save_images(result.model, self.data.test_x.to(device), self.config, folder, self.data.test_y)
            for picture in sorted(Path(drawn or folder).glob("*.png")):
                self.outbox.send_file(picture, "images", self.client, self.run_id)
        if best_checkpoint is not None and best_checkpoint.is_file():
            self.outbox.send_file(best_checkpoint, Path(BEST_CHECKPOINT).parent.as_posix(), self.client, self.run_id)
        return self.wait_for_server()

    def wait_for_server(self) -> str:
        """Deliver what waits (up to the patience); returns what could not be delivered ('' if nothing)."""
        self.outbox.deliver(self.patience_s)
        return self.outbox.undelivered()

    def _draw(self, model: Any, x: torch.Tensor, path: Path) -> None:
        from torchvision.utils import save_image

        from aesearch.images import reconstruction_grid

        sample = x[: self.config.evaluation.image_count].to(next(model.parameters()).device)
        save_image(reconstruction_grid(model, sample, self.config.corruption.kind, self.config.corruption.level), path)


def log_invalid_trial(tracking: Tracking, trial_id: str, number: str, params: dict[str, Any], error: str) -> str:
    """A trial whose sampled parameters make no valid config still gets its run (with the reason)."""
    from mlflow.entities import Param
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    mlflow = client(tracking.uri)
    existing = find_trial_run(mlflow, tracking.experiment_id, trial_id)
    if existing is not None:
        return existing.info.run_id
    tags = {MLFLOW_PARENT_RUN_ID: tracking.parent_run_id, ROLE_TAG: "trial", TRIAL_ID_TAG: trial_id, "error": error[:5000]}
    run_id = mlflow.create_run(tracking.experiment_id, run_name=f"invalid-#{number}", tags=tags).info.run_id
    mlflow.log_batch(run_id, params=[Param(k, as_param(v)) for k, v in params.items()], synchronous=True)
    return run_id


# --- the driver -------------------------------------------------------------------------------


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("aesearch", "torch", "torchvision", "ray", "optuna", "mlflow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "missing"
    return versions


def git_commit() -> str:
    """The commit of the code that ran ("unknown" outside a git checkout; "+dirty" if edited)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


class SearchRun:
    """The driver's side: the experiment, the parent run, and every trial run's ending."""

    def __init__(self, uri: str, name: str = "", tracking: Tracking | None = None):
        self.uri, self.name, self.client = uri, name, client(uri)
        self.tracking = tracking  # set by `start`
        self.export_warmup: threading.Thread | None = None

    def prepare_model_export(self) -> None:
        """Load, in the background while the trials run, what `register_best` needs: MLflow's PyTorch
        flavour and torch.export (torch._dynamo and friends take seconds to import and to export a
        first model), so that the search's end does not wait for them."""

        def warm_up() -> None:
            import mlflow.pytorch  # noqa: F401
            import torch.export

            with contextlib.suppress(Exception):  # register_best then pays for it itself
                torch.export.export(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sigmoid()), (torch.zeros(1, 2),))

        self.export_warmup = threading.Thread(target=warm_up, name="aesearch-export-warmup", daemon=True)
        self.export_warmup.start()

    def check_new(self) -> None:
        """Refuse a second search of the same name in one tracking store (before anything starts)."""
        from mlflow.exceptions import MlflowException

        try:
            experiment = self.client.get_experiment_by_name(self.name)
        except MlflowException as error:  # e.g. a server that refuses our credentials
            first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            raise UserError(f"--tracking-uri {self.uri}: the tracking store refused us: {first}") from None
        if experiment is not None and self.client.search_runs([experiment.experiment_id], max_results=1):
            raise UserError(
                f"--name {self.name}: the tracking store {self.uri} already holds an experiment of that name "
                "with runs; pick another --name, or --resume that search"
            )

    def start(self, resume: bool, describe: dict[str, Any], space_yaml: str, patience_s: float) -> Tracking:
        experiment = self.client.get_experiment_by_name(self.name)
        if experiment is None:
            location = embedded_artifacts(self.uri, self.name)
            experiment_id = self.client.create_experiment(self.name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        # MLflow's UI opens an experiment of this kind on its training runs (not GenAI traces).
        self.client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
        parents = self.client.search_runs([experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'search'", max_results=1)
        if resume and parents:
            run_id = parents[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=self.name, tags={ROLE_TAG: "search", **describe["tags"]})
            run_id = run.info.run_id
            from mlflow.entities import Param

            params = [Param(k, as_param(v)) for k, v in describe["params"].items()]
            self.client.log_batch(run_id, params=params, synchronous=True)
            self.client.log_text(run_id, space_yaml, "space.yaml")
        self.tracking = Tracking(self.uri, experiment_id, run_id, patience_s)
        return self.tracking

    def trial_runs(self) -> dict[str, Any]:
        """Ray trial id -> its MLflow run, for every trial run of this search."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        found, token = {}, None
        while True:
            page = self.client.search_runs(
                [self.tracking.experiment_id],
                filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.tracking.parent_run_id}'",
                max_results=1000, page_token=token,
            )
            found |= {run.data.tags.get(TRIAL_ID_TAG): run for run in page}
            token = page.token
            if not token:
                return found

    def close_trial(self, trial_id: str, outcome: str, run_id: str | None = None, epochs: int = 0,
                    undelivered: str = "") -> None:
        """Give a trial's run its outcome and a terminal status (FINISHED, or FAILED if it errored), and
        say so on the run (tag `tracking`) if records of its `epochs` never reached the server."""
        if run_id is None:  # it errored before its first report
            run = self.trial_runs().get(trial_id)
            if run is None:  # ... or before it could open its run
                return
            run_id = run.info.run_id
        logged = {m.step for m in self.client.get_metric_history(run_id, "epoch")}
        missing = sorted(set(range(1, epochs + 1)) - logged)
        gaps = [undelivered] if undelivered else []
        if missing:
            gaps.append(f"no metrics for epoch(s) {', '.join(map(str, missing))}")
        if gaps:
            self.client.set_tag(run_id, INCOMPLETE_TAG, "incomplete: " + "; ".join(gaps))
        self.client.set_tag(run_id, OUTCOME_TAG, outcome)
        self.client.set_terminated(run_id, status="FAILED" if outcome.startswith("errored") else "FINISHED")

    def log_errors(self, run_id: str, tracebacks: str, attempts: int) -> None:
        """What a failed trial raised, each failed attempt's traceback (Tune's error file), as an artifact."""
        self.client.log_text(run_id, tracebacks, "errors/tracebacks.txt")
        self.client.set_tag(run_id, "failed_attempts", str(attempts))

    def log_best_checkpoint(self, run_id: str, checkpoint: Any) -> None:
        """For a trial ASHA stopped between epochs: its best checkpoint, from its last Tune checkpoint."""
        with checkpoint.as_directory() as folder:
            best = Path(folder) / Path(BEST_CHECKPOINT).name
            if best.is_file():
                self.client.log_artifact(run_id, str(best), Path(BEST_CHECKPOINT).parent.as_posix())

    def remove_checkpoints(self, run_id: str) -> None:
        """A trial's checkpoints leave its run (once it is out of the search's best K)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        run = self.client.get_run(run_id)
        if any(a.path == Path(BEST_CHECKPOINT).parent.as_posix() for a in self.client.list_artifacts(run_id)):
            # With the store's URI: an `mlflow-artifacts:` location is reached through that server.
            repository = get_artifact_repository(run.info.artifact_uri, tracking_uri=self.uri)
            repository.delete_artifacts(Path(BEST_CHECKPOINT).parent.as_posix())
        self.client.set_tag(run_id, "checkpoints", "removed: not among the search's best budget.keep_checkpoints")

    def finish(self, status: str, leaderboard_csv: str | None = None, trial_ids: set[str] | None = None) -> None:
        """End the search run with `status`. Trial runs Tune left unfinished become KILLED; runs of
        trials Tune no longer knows (started after a killed driver last saved its state, and so
        sampled afresh by the resumed search) are closed and deleted (soft: MLflow can restore them)."""
        for trial_id, run in self.trial_runs().items():
            if trial_ids is not None and trial_id not in trial_ids:
                self.client.set_tag(run.info.run_id, OUTCOME_TAG, "lost: the search state was saved before this trial began")
                self.client.set_terminated(run.info.run_id, status="KILLED")
                self.client.delete_run(run.info.run_id)
            elif run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, status="KILLED")
        if leaderboard_csv is not None:
            self.client.log_text(self.tracking.parent_run_id, leaderboard_csv, "leaderboard.csv")
        self.client.set_terminated(self.tracking.parent_run_id, status=status)

    def register_best(self, trial_id: str, metrics: dict[str, float]) -> str | None:
        """Log the best trial's model (best weights, with a signature) and register it as `<search name>`."""
        import mlflow
        from mlflow.models import infer_signature

        from aesearch.checkpoints import load_checkpoint
        from aesearch.config import parse_config
        from aesearch.data import DATASETS
        from aesearch.models import build_model

        run = self.trial_runs().get(trial_id)
        if run is None:
            return None
        if self.export_warmup is not None:  # one torch.export at a time
            self.export_warmup.join()
        with tempfile.TemporaryDirectory() as folder:
            try:
                path = self.client.download_artifacts(run.info.run_id, BEST_CHECKPOINT, folder)
            except Exception:  # noqa: BLE001 - a trial that ended before its first best epoch
                return None
            state = load_checkpoint(path)
        config = parse_config(state["config"], source=f"{BEST_CHECKPOINT} of run {run.info.run_id}")
        shape = DATASETS[config.data.name].shape
        model = Reconstruction(build_model(config.model, shape))
        model.autoencoder.load_state_dict(state["model"])
        example = torch.rand(2, *shape)
        with torch.no_grad():
            signature = infer_signature(example.numpy(), model(example).numpy())
        quiet = contextlib.redirect_stderr(io.StringIO())  # MLflow prints its own notes on the registry
        with fluent_api_on(self.uri), mlflow.start_run(run_id=self.tracking.parent_run_id), quiet:
            logging.getLogger("mlflow.utils.environment").setLevel(logging.ERROR)  # pip version guessing
            info = mlflow.pytorch.log_model(
                model, name="best_model", signature=signature, input_example=example.numpy(),
                registered_model_name=self.name,
                pip_requirements=[f"torch=={metadata.version('torch')}", f"aesearch=={metadata.version('aesearch')}"],
                metadata={"trial_id": trial_id, "trial_run_id": run.info.run_id,
                          **{k: float(v) for k, v in metrics.items()}},
            )
            mlflow.set_tag("best_trial_run", run.info.run_id)
            mlflow.log_metrics({f"best/{k}": float(v) for k, v in metrics.items()})
        return info.model_uri


class Reconstruction(torch.nn.Module):
    """What the registered model serves: images (N, C, H, W) in [0, 1] in, reconstructions out."""

    def __init__(self, autoencoder: torch.nn.Module):
        super().__init__()
        self.autoencoder = autoencoder.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder(x, sample=False).x_hat
