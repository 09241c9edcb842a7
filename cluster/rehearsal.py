"""`make cluster-demo`: the cluster of cluster/README.md, rehearsed on this machine.

Everything on 127.0.0.1, with secrets made for this rehearsal only:

- an MLflow tracking server: a database backend store (SQLite here, PostgreSQL on a cluster),
  artifacts proxied through the server into a folder (the S3 bucket on a cluster), its basic-auth
  app on, the admin password random;
- a Ray head node and WORKERS worker nodes (cluster/ray_nodes.py), token authentication on, the
  token in a 0600 file named by RAY_AUTH_TOKEN_PATH;
- the search submitted through the Ray Jobs API with `ray job submit`, from an empty folder, and
  waited for; the credentials reach the driver and the trials through the nodes' environment
  (as the Kubernetes secrets do), never through the command line, the job's runtime env or a log;
- the report built from the tracking server;

then every process it started is stopped by its own pid. `LocalCluster` is the same set-up as a
context manager, for tests/test_cluster.py.

    python cluster/rehearsal.py [--workdir DIR] [--workers N] [--space FILE] [-- SEARCH FLAGS...]

The last line it prints is a JSON summary (where everything is, the job's status).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass, field
from pathlib import Path

from aesearch.locations import file_uri, sqlite_uri

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # this environment's `ray`, `mlflow` and `aesearch`
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def write_secret(path: Path, text: str) -> Path:
    """A file only its owner reads."""
    path.touch(mode=0o600)
    path.write_text(text, encoding="utf-8")
    return path


@dataclass
class Service:
    """A process this rehearsal started, in a process group of its own."""

    name: str
    process: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = 30) -> None:
        """SIGTERM to the process (the Ray nodes and MLflow shut their children down on it), then SIGKILL
        to what is left of its group: only ever processes this rehearsal started."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until no process of its group is left, zombies included
            self.process.poll()  # reaps our own child once it has exited
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name}: processes of group {self.process.pid} outlived SIGKILL")


@dataclass
class LocalCluster:
    """A Ray cluster and an MLflow server on 127.0.0.1, as cluster/README.md sets them up on a cluster."""

    workdir: Path
    workers: int = 1
    cpus_per_node: int = 1
    services: list[Service] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = self.workdir.absolute()
        self.secrets = self.workdir / "secrets"
        self.mlflow_port, self.gcs_port, self.dashboard_port = free_port(), free_port(), free_port()
        self.tracking_uri = f"http://{LOOPBACK}:{self.mlflow_port}"
        self.gcs_address = f"{LOOPBACK}:{self.gcs_port}"
        self.dashboard = f"http://{LOOPBACK}:{self.dashboard_port}"
        self.storage = file_uri(self.workdir / "shared-storage")
        # Ray's session folders (logs, sockets) for this rehearsal only, removed when it stops; a short
        # path, because Ray's socket paths must fit in 107 bytes.
        self.ray_temp = Path(tempfile.mkdtemp(prefix="aesearch-ray-"))
        self.nodes_file = self.workdir / "logs" / "nodes.json"  # node ids and raylet pids

    def nodes(self) -> list[dict]:
        return json.loads(self.nodes_file.read_text())

    # --- the environment every node, the driver and the trials see -----------------------------

    def make_secrets(self) -> None:
        self.secrets.mkdir(parents=True, exist_ok=True)
        self.ray_token = write_secret(self.secrets / "ray_token", secrets.token_hex(32))
        self.mlflow_password = secrets.token_urlsafe(24)
        self.auth_config = write_secret(self.secrets / "mlflow_auth.ini", (
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{self.workdir / 'mlflow' / 'auth.db'}\n"
            "admin_username = admin\n"
            f"admin_password = {self.mlflow_password}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        ))

    def env(self, *, ray_token: bool = True) -> dict[str, str]:
        """What a Kubernetes pod gets from the secrets: Ray's token, the MLflow credentials."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH_", "MLFLOW_TRACKING_"))}
        env.update({
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's address detection answers 127.0.0.1
            # Under `make` (`uv run`), Ray would run each job in a copy of its working directory with its own
            # `uv run`; the nodes of a real cluster run the image's environment, as these run this one.
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": self.mlflow_password,
            "PYTHONUNBUFFERED": "1",
        })
        if ray_token:
            env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.ray_token)})
        return env

    # --- starting and stopping -------------------------------------------------------------------

    def start(self, name: str, command: list[str], env: dict[str, str]) -> Service:
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as output:
            process = subprocess.Popen(command, env=env, cwd=self.workdir, start_new_session=True,
                                       stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
        service = Service(name, process, log)
        self.services.append(service)
        return service

    def __enter__(self) -> LocalCluster:
        try:
            self.make_secrets()
            self.start_mlflow()
            self.start_ray()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        for service in reversed(self.services):  # Ray before MLflow
            service.stop()
        self.services.clear()
        shutil.rmtree(self.ray_temp, ignore_errors=True)

    def stop_mlflow(self, grace: float = 30) -> None:
        """Take the tracking server down (tests/test_faults.py: a server restarted during a search)."""
        server = next(service for service in self.services if service.name == "mlflow-server")
        server.stop(grace)
        self.services.remove(server)

    def start_mlflow(self) -> None:
        """The tracking server, on the same port and store each time it is started."""
        store = self.workdir / "mlflow"
        store.mkdir(parents=True, exist_ok=True)
        env = {**self.env(), "MLFLOW_AUTH_CONFIG_PATH": str(self.auth_config),
               "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job workers
        server = self.start("mlflow-server", [
            str(BIN / "mlflow"), "server", "--host", LOOPBACK, "--port", str(self.mlflow_port), "--workers", "1",
            "--app-name", "basic-auth", "--backend-store-uri", sqlite_uri(store / "mlflow.db"),
            "--artifacts-destination", str(store / "artifacts"),
        ], env)
        self.wait(lambda: self.http_ok(f"{self.tracking_uri}/health"), "the MLflow server", server)

    def start_ray(self) -> None:
        """The head and the worker nodes (cluster/ray_nodes.py: `ray start` cannot put two nodes of one
        cluster on 127.0.0.1). Every node's processes inherit the token from this environment."""
        nodes = self.start("ray-nodes", [
            sys.executable, str(Path(__file__).with_name("ray_nodes.py")), str(1 + self.workers),
            "--port", str(self.gcs_port), "--dashboard-port", str(self.dashboard_port),
            "--cpus-per-node", str(self.cpus_per_node), "--temp-dir", str(self.ray_temp),
            "--describe", str(self.nodes_file),
        ], self.env())
        self.wait(lambda: self.alive_nodes() == 1 + self.workers and self.nodes_file.is_file(),
                  f"the Ray head and {self.workers} worker node(s)", nodes)

    def wait(self, ready, what: str, service: Service, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not service.alive():
                raise RuntimeError(f"{what}: {service.name} exited ({service.process.returncode}); see {service.log}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{what} not ready within {timeout:.0f} s; see {service.log}")

    # --- talking to the servers --------------------------------------------------------------------

    def http_ok(self, url: str, headers: dict[str, str] | None = None) -> bool:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as answer:
                return answer.status == 200
        except OSError:
            return False

    def ray_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.ray_token.read_text().strip()}"}

    def alive_nodes(self) -> int:
        """Alive nodes, as the dashboard's state API lists them (with the token)."""
        try:
            request = urllib.request.Request(f"{self.dashboard}/api/v0/nodes", headers=self.ray_headers())
            with urllib.request.urlopen(request, timeout=5) as answer:
                nodes = json.load(answer)["data"]["result"]["result"]
        except (OSError, KeyError, ValueError):
            return 0
        return sum(1 for node in nodes if node.get("state") == "ALIVE")

    def mlflow_headers(self) -> dict[str, str]:
        credentials = b64encode(f"admin:{self.mlflow_password}".encode()).decode()
        return {"Authorization": f"Basic {credentials}"}

    def submit(self, entrypoint: list[str], folder: Path, *, ray_token: bool = True, echo: bool = False,
               timeout: float = 1800) -> subprocess.CompletedProcess:
        """`ray job submit` from FOLDER, waiting for the job: its output (shown as it comes with echo),
        exit status 0 if the job succeeded."""
        command = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--", *entrypoint]
        lines = []
        with subprocess.Popen(command, env=self.env(ray_token=ray_token), cwd=folder, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) as job:
            watchdog = threading.Timer(timeout, job.kill)
            watchdog.start()
            try:
                for line in job.stdout:
                    lines.append(line)
                    if echo:
                        sys.stdout.write(line)
                        sys.stdout.flush()
            finally:
                watchdog.cancel()
        return subprocess.CompletedProcess(command, job.returncode, "".join(lines), "")


def search_entrypoint(cluster: LocalCluster, space: Path, name: str, extra: list[str]) -> list[str]:
    """The job: `aesearch search` on the cluster, logging to the tracking server, keeping trial results
    and checkpoints in shared storage given as a URI, as s3://BUCKET/PREFIX is on a cluster (file:// here:
    every node of this machine sees the folder; both are read and written through pyarrow's filesystems)."""
    return ["aesearch", "search", str(space.absolute()), "--name", name,
            "--storage", cluster.storage, "--tracking-uri", cluster.tracking_uri, *extra]


def say(message: str) -> None:
    print(f"cluster-demo: {message}", file=sys.stderr, flush=True)


def rehearse(cluster: LocalCluster, space: Path, name: str, report: Path, search_flags: list[str]) -> dict:
    """Submit the search from an empty folder, wait for it, report it from the tracking server."""
    submit_from = cluster.workdir / "submit"  # where `ray job submit` runs: it must stay empty
    submit_from.mkdir(parents=True, exist_ok=True)
    say(f"ray job submit --address {cluster.dashboard} -- aesearch search {space} --name {name} ...")
    job = cluster.submit(search_entrypoint(cluster, space, name, search_flags), submit_from, echo=True)
    (cluster.workdir / "logs" / "job.log").write_text(job.stdout)
    summary = {"name": name, "job_exit_status": job.returncode, "report_exit_status": None,
               "tracking_uri": cluster.tracking_uri, "mlflow_store": str(cluster.workdir / "mlflow"),
               "storage": cluster.storage, "submitted_from": str(submit_from),
               "report": str(report), "logs": str(cluster.workdir / "logs")}
    if job.returncode != 0:
        say(f"the job failed (exit status {job.returncode}); its output: {cluster.workdir / 'logs' / 'job.log'}")
        return summary
    say(f"aesearch report {name} --tracking-uri {cluster.tracking_uri} --out {report}")
    reported = subprocess.run([str(BIN / "aesearch"), "report", name, "--tracking-uri", cluster.tracking_uri,
                               "--out", str(report)], env=cluster.env(), cwd=submit_from)
    summary["report_exit_status"] = reported.returncode
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="where the servers keep their state and logs "
                        "(default: cluster-demo/NAME)")
    parser.add_argument("--workers", type=int, default=1, help="Ray worker nodes besides the head (default: 1)")
    parser.add_argument("--space", type=Path, default=REPO / "aesearch" / "spaces" / "quickstart.yaml")
    parser.add_argument("--name", default=f"cluster-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--report", type=Path, help="report folder (default: reports/NAME)")
    parser.add_argument("search_flags", nargs="*", help="more flags for aesearch search, after --")
    args = parser.parse_args(argv)
    workdir = args.workdir or REPO / "cluster-demo" / args.name
    report = (args.report or REPO / "reports" / args.name).absolute()
    with LocalCluster(workdir, workers=args.workers) as cluster:
        say(f"MLflow server {cluster.tracking_uri} (basic auth), Ray head {cluster.gcs_address} and "
            f"{args.workers} worker node(s), dashboard {cluster.dashboard} (token auth); logs in {workdir / 'logs'}")
        summary = rehearse(cluster, args.space, args.name, report, args.search_flags)
    say("stopped every process it started")
    print(json.dumps(summary))
    return 0 if summary["report_exit_status"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
