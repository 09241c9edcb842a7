"""The MLflow tracking store: where it is, whether it answers, a client for it, its UI.

Where: `--tracking-uri`, else MLFLOW_TRACKING_URI, else an embedded SQLite store in the working
directory (`mlflow.db`, artifacts in `mlartifacts/`). An `mlflow server` over HTTP with proxied
artifacts lets trials on any node log without shared disk. Credentials go in MLflow's own
variables (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD), never in the URI.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aesearch.errors import UserError

if TYPE_CHECKING:
    from mlflow import MlflowClient

EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlartifacts"
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
