"""The search's driver and Ray: a local instance, or a cluster at `--address` under the cluster's own
authentication, proven able to run this driver's work before anything is written.

Ray 2.60 clusters run with token authentication or without it, and a driver must do as its cluster
does: a driver in token mode connects to a cluster without it, but the cluster's workers cannot call
back into the driver, so every trial's actor is cancelled before it starts. So aesearch asks the
cluster which mode it uses (one unauthenticated call to its GCS: refused means token) and follows
it, unless RAY_AUTH_MODE is set here (Ray's own rule: an explicit mode is respected); then one tiny
actor proves, within seconds, that the cluster runs what this driver sends it.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

import ray

from aesearch.errors import UserError
from aesearch.search import ray_api

AUTH_MODE = "RAY_AUTH_MODE"  # "token" or "disabled": Ray reads it from the environment only
PROBE_TIMEOUT_S = 60.0  # a worker's start on a busy 2-core node takes a few seconds
# The runtime env Ray Tune gives every trial actor (ray/tune/execution/class_cache.py): env vars, so a
# worker of its own, set up by the node's runtime-env agent. The probe asks for the same.
TRIAL_RUNTIME_ENV = {"env_vars": {"PL_DISABLE_FORK": "1"}}
QUIET = {"log_to_driver": False, "logging_level": logging.WARNING, "configure_logging": True}


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at a cluster address (Ray retries)."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address}: expected HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise UserError(f"--address {address}: no Ray cluster answers there ({error.strerror or error})") from None


def cluster_auth_mode(address: str, timeout_s: float = 5.0) -> str:
    """'token' or 'disabled': what the cluster's GCS at HOST:PORT asks of a client, learnt by asking
    it something without a token (a cluster with token authentication refuses)."""
    import grpc

    try:
        return "token" if ray_api.gcs_needs_token(address, timeout_s) else "disabled"
    except grpc.RpcError as error:
        raise UserError(f"--address {address}: the Ray cluster's GCS does not answer "
                        f"({error.code().name}: {error.details()})") from None


def auth_in_force() -> str:
    """The driver's authentication, in words (where the token comes from, never the token)."""
    if os.environ.get(AUTH_MODE, "").lower() != "token":
        return "no authentication"
    if os.environ.get("RAY_AUTH_TOKEN"):
        where = "RAY_AUTH_TOKEN"
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        where = f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}"
    else:
        where = "~/.ray/auth_token"
    return f"token authentication (the token from {where})"


def use_auth_mode(mode: str) -> None:
    """This process's authentication mode, for Ray's C++ core too (it caches its config)."""
    os.environ[AUTH_MODE] = mode
    ray_api.reload_core_config()


def connect(address: str | None, py_modules: list[str] | None = None) -> None:
    """Start a local Ray instance (no address), or join the cluster at `address` as it asks and prove
    that it can run this driver's work; a cluster that cannot is one line (UserError). `py_modules`
    (the user's plug-ins) reach every worker of the search, on every node."""
    job = {"runtime_env": {"py_modules": py_modules}} if py_modules else {}
    if not address:
        ray.init(include_dashboard=False, **job, **QUIET)
        return
    explicit = AUTH_MODE in os.environ
    if not explicit and address != "auto" and not address.startswith("ray://"):
        use_auth_mode(cluster_auth_mode(address))
    # A cluster that refuses us (a wrong token) is otherwise retried for ~20 s, once a second.
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "3")
    try:
        ray.init(address=address, **job, **QUIET)
    except (ConnectionError, RuntimeError, ray.exceptions.RayError) as error:
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise UserError(
            f"--address {address}: cannot connect to the Ray cluster with {auth_in_force()} (does the cluster "
            f"use token authentication, and is its token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
            f"~/.ray/auth_token here?): {reason}"
        ) from None
    print(f"aesearch: Ray cluster at {address}, {auth_in_force()}"
          + (f" ({AUTH_MODE} set here)" if explicit else ""), file=sys.stderr)
    try:
        check_cluster_runs_our_work(address, explicit)
    except BaseException:
        ray.shutdown()
        raise


@ray.remote(num_cpus=0)
class Probe:
    """The smallest work a trial needs of the cluster: a worker process started for this driver, with
    the trials' runtime env, that imports aesearch and answers it."""

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def check_cluster_runs_our_work(address: str, explicit_auth: bool, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    probe = Probe.options(runtime_env=TRIAL_RUNTIME_ENV).remote()
    try:
        ray.get(probe.node.remote(), timeout=timeout_s)
    except (ray.exceptions.RayError, TimeoutError) as error:
        if isinstance(error, ray.exceptions.GetTimeoutError):
            what = f"no worker answered within {timeout_s:g} s"
        else:
            what = type(error).__name__ + (", it never started" if "never ran" in str(error) else "")
        if explicit_auth:  # the mode was ours to choose, not the cluster's: the usual suspect
            cause = (f"the driver ({AUTH_MODE}={os.environ[AUTH_MODE]} set here) and the cluster's nodes disagree on "
                     f"token authentication: unset {AUTH_MODE} here so that aesearch follows the cluster, or give "
                     f"every node and this driver {AUTH_MODE}=token and the same token (RAY_AUTH_TOKEN_PATH)")
        else:
            cause = ("the cluster's nodes cannot start workers for this driver (do they run the same aesearch, Ray "
                     "and Python as this machine?)")
        raise UserError(f"--address {address}: the Ray cluster accepted this driver but cannot run its trials "
                        f"(a test actor: {what}); likely cause: {cause}") from None
    finally:
        ray.kill(probe)
