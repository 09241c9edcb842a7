"""`make cluster-demo`: the cluster of cluster/README.md, rehearsed on this machine.

Everything on 127.0.0.1, with secrets made for this rehearsal only:

- PostgreSQL (Debian's package, run by an unprivileged user) and SeaweedFS's S3 server with the
  shipped stack's two buckets, `mlflow` and `aesearch-results` (cluster/services.py);
- an MLflow tracking server: its backend store in PostgreSQL, its artifacts in bucket `mlflow` (proxied
  through the server), its basic-auth app on, the admin password random, the driver and the trials
  logging as an account of their own;
- a Ray head node and WORKERS worker nodes (cluster/ray_nodes.py), token authentication on, the
  token in a 0600 file named by RAY_AUTH_TOKEN_PATH;
- the search submitted through the Ray Jobs API with `ray job submit`, from an empty folder, its
  results and checkpoints in bucket `aesearch-results` (s3://aesearch-results/searches), and waited for; the credentials reach the driver and the trials through the nodes' environment
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
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from services import BIN, LOOPBACK, MLflowServer, PostgreSQL, S3Server, Service, Stack, free_port, write_secret

REPO = Path(__file__).resolve().parents[1]
TRIALS_USER = "aesearch-trials"  # the MLflow account the driver and the trials log with (not the admin)


@dataclass
class LocalCluster(Stack):
    """The production stack of cluster/README.md on 127.0.0.1: Ray nodes, an MLflow server on PostgreSQL
    with its artifacts in S3, the searches' storage in a bucket of its own."""

    workdir: Path
    workers: int = 1
    cpus_per_node: int = 1
    services: list[Service] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = self.workdir.absolute()
        self.secrets = self.workdir / "secrets"
        self.database = PostgreSQL(self.workdir / "postgres", databases=MLflowServer.DATABASES)
        self.s3 = S3Server(self.workdir / "s3")
        # its backend store in PostgreSQL, its artifacts in bucket mlflow, basic auth on (its config in secrets/)
        self.mlflow = MLflowServer(self.secrets, self.database, self.s3, trials_user=TRIALS_USER,
                                   log=self.workdir / "logs" / "mlflow-server.log")
        self.mlflow_password, self.trials_password = self.mlflow.admin_password, self.mlflow.trials_password
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.tracking_uri = self.mlflow.uri
        self.gcs_address = f"{LOOPBACK}:{self.gcs_port}"
        self.dashboard = f"http://{LOOPBACK}:{self.dashboard_port}"
        self.storage = self.s3.uri("searches")  # Ray Tune's results and checkpoints, in bucket aesearch-results
        self.artifacts = self.mlflow.artifacts  # MLflow's artifact store, proxied by its server
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

    def env(self, *, ray_token: bool = True) -> dict[str, str]:
        """What a Kubernetes pod gets from the secrets: Ray's token, the trials' MLflow account, the
        trials' keys to the bucket and its endpoint."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH_", "MLFLOW_TRACKING_", "AWS_"))}
        env.update({
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's address detection answers 127.0.0.1
            # Under `make` (`uv run`), Ray would run each job in a copy of its working directory with its own
            # `uv run`; the nodes of a real cluster run the image's environment, as these run this one.
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            **self.mlflow.client_env(),  # the trials' own account
            **self.s3.client_env(self.s3.trials),
            "PYTHONUNBUFFERED": "1",
        })
        if ray_token:
            env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.ray_token)})
        return env

    def secret_values(self) -> list[str]:
        """Every secret of this stack (tests/test_cluster.py looks for them where none may be)."""
        keys = [who.secret_key for who in (self.s3.admin, self.s3.mlflow, self.s3.trials)]
        return [self.ray_token.read_text().strip(), self.mlflow_password, self.trials_password,
                *self.database.passwords.values(), *keys]

    # --- starting and stopping -------------------------------------------------------------------

    def start(self, name: str, command: list[str], env: dict[str, str]) -> Service:
        service = Service.start(name, command, self.workdir / "logs" / f"{name}.log", env=env, cwd=self.workdir)
        self.services.append(service)
        return service

    def bring_up(self) -> None:
        self.make_secrets()
        self.database.bring_up()
        self.s3.bring_up()
        self.mlflow.bring_up()
        self.start_ray()

    def close(self) -> None:
        self.stop()

    def processes(self) -> list[Service]:
        """Every server process of the stack running now."""
        return [*self.services, *(s.service for s in (self.database, self.s3, self.mlflow) if s.service is not None)]

    def stop(self) -> None:
        for service in reversed(self.services):  # Ray before MLflow
            service.stop()
        self.services.clear()
        self.mlflow.close()
        self.s3.close()
        self.database.close()
        shutil.rmtree(self.ray_temp, ignore_errors=True)

    def stop_mlflow(self, grace: float = 30) -> None:
        """Take the tracking server down (tests/test_faults.py: a server restarted during a search)."""
        self.mlflow.stop(grace)

    def start_mlflow(self) -> None:
        """The tracking server again, on the same port and stores."""
        self.mlflow.start()

    def start_ray(self) -> None:
        """The head and the worker nodes (cluster/ray_nodes.py: `ray start` cannot put two nodes of one
        cluster on 127.0.0.1). Every node's processes inherit the token from this environment."""
        nodes = self.start("ray-nodes", [
            sys.executable, str(Path(__file__).with_name("ray_nodes.py")), str(1 + self.workers),
            "--port", str(self.gcs_port), "--dashboard-port", str(self.dashboard_port),
            "--cpus-per-node", str(self.cpus_per_node), "--temp-dir", str(self.ray_temp),
            "--describe", str(self.nodes_file),
        ], self.env())
        nodes.wait_until(lambda: self.alive_nodes() == 1 + self.workers and self.nodes_file.is_file(),
                         f"the Ray head and {self.workers} worker node(s)")

    # --- talking to the servers --------------------------------------------------------------------

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
        return self.mlflow.headers()

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
    and checkpoints in the bucket (s3://aesearch-results/searches: every node reads and writes it with pyarrow's S3
    filesystem, the keys and the endpoint from its environment). The cluster's address is given: the
    RAY_ADDRESS Ray gives a job is found by looking for Ray's processes on the machine, and where
    another Ray instance runs beside the demo's (a search running locally) it may be that one."""
    return ["aesearch", "search", str(space.absolute()), "--name", name, "--address", cluster.gcs_address,
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
    summary = {"name": name, "space": str(space.absolute()), "job_exit_status": job.returncode, "report_exit_status": None,
               "tracking_uri": cluster.tracking_uri, "backend_store": cluster.database.uri("mlflow"),
               "artifact_store": cluster.artifacts, "storage": cluster.storage, "submitted_from": str(submit_from),
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
        say(f"PostgreSQL {cluster.database.uri('mlflow')} (MLflow's backend store), SeaweedFS S3 server "
            f"{cluster.s3.endpoint} (buckets {cluster.s3.ARTIFACTS} and {cluster.s3.RESULTS})")
        say(f"MLflow server {cluster.tracking_uri} (basic auth; artifacts in {cluster.artifacts}), Ray head "
            f"{cluster.gcs_address} and {args.workers} worker node(s), dashboard {cluster.dashboard} (token auth); "
            f"search storage {cluster.storage}; logs in {workdir / 'logs'}")
        summary = rehearse(cluster, args.space, args.name, report, args.search_flags)
    say("stopped every process it started")
    print(json.dumps(summary))
    return 0 if summary["report_exit_status"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
