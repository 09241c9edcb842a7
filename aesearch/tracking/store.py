"""The MLflow tracking store: where it is, whether it answers, a client for it, its UI.

Where: `--tracking-uri`, else MLFLOW_TRACKING_URI, else an embedded SQLite store in the working
directory (`mlflow.db`, artifacts in `mlartifacts/`). An `mlflow server` over HTTP with proxied
artifacts lets trials on any node log without shared disk. Credentials go in MLflow's own
variables (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD), never in the URI.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aesearch.errors import UserError
from aesearch.locations import file_uri, local_path, misplaced_artifacts, sqlite_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient

EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlartifacts"
DATABASES = ("postgresql", "mysql", "mssql")  # backend stores MLflow reaches through SQLAlchemy
MLFLOW_BATCH = 100  # MLflow takes at most 100 params (and 1000 metrics) per log_batch call


def resolve_tracking_uri(flag: str | None) -> str:
    """`--tracking-uri`, else MLFLOW_TRACKING_URI, else the embedded store in the working directory."""
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or sqlite_uri(EMBEDDED_DB)
    parts = urlsplit(uri)
    is_database = parts.scheme.split("+")[0] in DATABASES  # a user name is part of its address
    if parts.password or (parts.username and not is_database):  # it would reach logs, tags and Ray's job config
        where = ("the database client's environment (PGPASSWORD for PostgreSQL)" if is_database else
                 "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
        raise UserError(
            f"--tracking-uri {parts.scheme}://***@{parts.hostname}: credentials in the URI are refused; "
            f"put them in {where}"
        )
    if not is_database and parts.scheme not in ("sqlite", "http", "https", "file", "databricks", ""):
        raise UserError(
            f"--tracking-uri {uri}: unsupported scheme {parts.scheme!r} (sqlite, http(s), file, postgresql, mysql)"
        )
    database = local_path(uri) if parts.scheme == "sqlite" and not parts.query else None
    return uri if database is None else sqlite_uri(database)  # absolute: trials may run in another folder


def check_store_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when no tracking server or database answers (MLflow retries)."""
    import urllib.error
    import urllib.request

    scheme = urlsplit(uri).scheme
    if scheme.split("+")[0] in DATABASES:
        check_database_reachable(uri, timeout_s)
    if scheme not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        return  # something answers (a proxy or auth may guard /health): MLflow's client says more
    except OSError as error:
        reason = getattr(error, "reason", None) or error
        raise UserError(f"--tracking-uri {uri}: no MLflow tracking server answers there ({reason})") from None


def check_database_reachable(uri: str, timeout_s: float) -> None:
    """A backend store given as a database URI (postgresql://USER@HOST:PORT/DB, the password in
    PGPASSWORD): it answers, and lets us in."""
    import sqlalchemy

    def refused(error: Exception) -> UserError:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines() or [type(error).__name__]
        return UserError(f"--tracking-uri {uri}: cannot connect to the database ({reason[0]})")

    timeout = {"connect_timeout": max(1, round(timeout_s))} if uri.startswith("postgresql") else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=timeout)
    except Exception as error:  # no driver for it, a malformed URI
        raise refused(error) from None
    try:
        with engine.connect():
            pass
    except Exception as error:  # the driver's own errors: no answer, a wrong password, no such database
        raise refused(error) from None
    finally:
        engine.dispose()


def check_store_exists(uri: str) -> None:
    """Reading a store that is not there must not create one (opening SQLite would)."""
    local = local_path(uri)
    if local is not None and not local.exists():
        raise UserError(f"--tracking-uri {uri}: no such store yet (run a search first)")
    check_store_reachable(uri)


def is_local_store(uri: str) -> bool:
    """A store only this machine (or a shared disk) can reach."""
    return urlsplit(uri).scheme in ("sqlite", "file", "")


def embedded_artifacts(uri: str, experiment: str) -> str | None:
    """For a SQLite store, artifacts live beside the database file; other stores decide themselves."""
    database = local_path(uri) if urlsplit(uri).scheme == "sqlite" else None
    return None if database is None else file_uri(database.parent / EMBEDDED_ARTIFACTS / experiment)


def misplaced_artifacts_note(experiment) -> str | None:
    """One line on an experiment whose artifacts an earlier aesearch misplaced (see
    `aesearch.locations`): where they really are, and how to move them beside the store."""
    location = experiment.artifact_location
    misplaced = misplaced_artifacts(location)
    if misplaced is None:
        return None
    real, _ = misplaced
    where = (f"they are in {real}" if real.exists() else
             f"they were to be written to {real}, which does not exist (written by another user, or lost)")
    return (f"experiment {experiment.name!r}: an earlier aesearch gave it the artifact location {location}, "
            f"which MLflow reads as {real}: {where}; `aesearch relocate {experiment.name}` moves them beside the store")


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
    uri = resolve_tracking_uri(flag)
    if not is_local_store(uri):
        raise UserError(f"--tracking-uri {uri}: a tracking server already serves its own UI; open it in a browser")
    check_store_exists(uri)
    with socket.socket() as probe:  # MLflow's server would say so, and exit 0
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise UserError(f"--port {port}: 127.0.0.1:{port} is in use ({error.strerror}); give another port") from None
    os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--registry-store-uri", uri,
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    return command, uri


# MLflow's startup lines that name flags `aesearch ui` does not have (it serves on 127.0.0.1 only).
FOREIGN_HINTS = ("use --host 0.0.0.0",)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def serve_ui(command: list[str], grace_s: float = 10.0) -> int:
    """Run the UI's server until it ends or this process is told to stop (Ctrl-C, SIGTERM, SIGHUP); then
    0, else the server's status. The server (MLflow's process and its uvicorn worker) runs in a process
    group of its own, which is stopped as a whole on any way out: SIGTERM, `grace_s` to finish, then
    SIGKILL. So no worker outlives the command, holding its port. Its output passes through on
    stderr, less the hints in FOREIGN_HINTS."""

    def pass_through(lines: Iterator[str]) -> None:
        for line in lines:
            if not any(hint in line for hint in FOREIGN_HINTS):
                sys.stderr.write(line)
                sys.stderr.flush()

    stopped: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, _: stopped.append(signum)) for signum in STOP_SIGNALS}
    try:
        server = subprocess.Popen(command, start_new_session=True, stderr=subprocess.PIPE, text=True)
        pump = threading.Thread(target=pass_through, args=(server.stderr,), daemon=True)
        pump.start()
        try:
            while server.poll() is None and not stopped:
                time.sleep(0.2)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            pump.join(grace_s)  # the pipe closes when the group's last process has ended
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            status = server.wait()
            pump.join(1.0)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if stopped:
        return 0
    return 128 - status if status < 0 else status  # killed by signal N: 128 + N, as a shell says


@dataclass(frozen=True)
class Tracking:
    """Where a search logs; picklable, so it travels with every trial to any node."""

    uri: str
    experiment_id: str
    parent_run_id: str
    patience_s: float  # budget.tracking_patience_s: how long an unreachable server is waited for
    batch_s: float = 0.0  # budget.tracking_batch_s: how often a trial sends its epochs' metrics
