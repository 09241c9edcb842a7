"""The process settings aesearch's entry points apply before Ray and MLflow start.

Ray's and MLflow's behaviour is set through environment variables, which their worker processes
inherit. Nothing sets them at import time: `apply()` is called by the entry points (the CLI, the
public API) before they import Ray or MLflow. A value the user set already is kept.
"""

from __future__ import annotations

import logging
import os

# Ray's own terminal output, loggers and working-directory changes, off: aesearch prints its own
# progress, writes its own leaderboard, and trials keep the driver's working directory. And
# workers run in this very Python environment: under `uv run`, Ray would otherwise start them with
# `uv run` in a copy of the working directory that has no virtual environment.
RAY_SETTINGS = {
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_DEDUP_LOGS": "0",
    # A local raylet would start idle workers at once, which Tune never uses (its trial actors ask for
    # a runtime env of their own): on a small machine they only slow the start of the real ones.
    "RAY_enable_worker_prestart": "0",
}

# No download progress bars or INFO chatter in the search's output, no usage reports sent home
# from every trial process.
MLFLOW_SETTINGS = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # a line per closed run on a server; aesearch says where
}

# MLflow's client retries a failed request for about four minutes, and a trial would stop training
# meanwhile: a search's processes give up on a request in seconds and retry on their own terms
# (a trial's records wait in its outbox, see aesearch.tracking.outbox).
MLFLOW_RETRY_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


# Every local Ray instance logs that token authentication is on by default ("... Set RAY_AUTH_MODE=
# disabled to opt out"): a notice on every search, not a warning, and it invites turning the
# authentication off. Only that message is dropped; Ray's other authentication warnings are kept.
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
RAY_AUTH_NOTICE = "RAY_AUTH_MODE=disabled to opt out"


def without_ray_auth_notice(record: logging.LogRecord) -> bool:
    return RAY_AUTH_NOTICE not in record.getMessage()


def apply(environ: dict[str, str] | None = None) -> None:
    """Sets each setting the environment does not set already (in `os.environ` by default), and
    filters Ray's notice out of this process's logs (once, however often it is called)."""
    environ = os.environ if environ is None else environ
    for key, value in (RAY_SETTINGS | MLFLOW_SETTINGS | MLFLOW_RETRY_SETTINGS).items():
        environ.setdefault(key, value)
    logging.getLogger(RAY_AUTH_LOGGER).addFilter(without_ray_auth_notice)
