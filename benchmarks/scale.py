"""The control plane at scale: simulated trials through the whole platform, beside Ray Tune's own bounds.

    uv run python benchmarks/scale.py --quick                       # a small run of each workload (minutes)
    uv run python benchmarks/scale.py --workload bookkeeping        # Ray's sizes: 10,000 trials x 1 s, 16 at a time
    uv run python benchmarks/scale.py --workload throughput --concurrent 64 --seconds 0.1
    uv run python benchmarks/scale.py --quick --stack sqlite-server --stack production  # side by side
    uv run python benchmarks/scale.py --workload bookkeeping --trials 1000 --nodes 32    # 32 Ray nodes
    uv run python benchmarks/scale.py --workload bookkeeping --trials 200 --autoscale 8  # nodes come and go
    uv run python benchmarks/scale.py --workload bookkeeping --kill-at 5000              # the driver killed, resumed
    uv run python benchmarks/scale.py --workload bookkeeping --trials 600 --trace-memory # where its memory is
    uv run python benchmarks/scale.py --workload throughput --trials 64 --concurrent 16 --epochs 100 --seconds 0.01 \
        --tracking-batch-s 1 --checkpoint-every-s 1 --bare-tune   # results per second, beside bare Tune

Every trial is simulated (`simulate:` in the search space, aesearch.training.simulated): the same
trial function, reports, checkpoints, MLflow writes and driver callbacks as a real trial, but an
epoch is `--seconds` of sleep. What is left is the platform's own cost, measured here by calling
`aesearch.search.driver.search` in this process (so this process is the driver) and printed beside
the bounds Ray Tune's release tests assert for bare Tune (random search, no tracking):

- bookkeeping: many one-epoch trials, TPE + ASHA (ray: release/tune_tests/scalability_tests/workloads/
  test_bookkeeping_overhead.py: 10,000 trials x 1 s, 16 at a time, minimum 625 s, bound 800 s;
  observed 715 s in doc/source/tune/tutorials/tune-scalability.rst);
- throughput: every trial running at once, reporting every `--seconds`, no early stopping (ray:
  tune-scalability.rst, "around 500 total results/second ... when logging and synchronization are
  disabled. With logging enabled, around 50-100"; test_result_throughput_single_node.py: 96 trials x
  50 results/s x 100 s, bound 120 s).

Per workload: wall against the theoretical minimum (trials x epochs x seconds / concurrency), the
driver's CPU per trial and per result (getrusage of this process, less this script's sampling thread;
and in the trials phase alone, beside the whole machine's busy CPU then: what each further trial
costs), results per second, Optuna's ask latency by the number of finished trials, the driver's time
in Python's garbage collector, the ramp-up to full concurrency (the trials' MLflow run
start times), the driver's memory growth per finished trial, the size of Tune's experiment-state
snapshot, every result counted in MLflow's store (its metric rows), a trial actor's memory, and the
search's quality against the curve's known optimum.

`--stack` says what the search runs on, each in a temporary folder, started and stopped here:

- embedded (the default, the control): MLflow in the processes themselves on a SQLite file, storage a
  local folder;
- production: cluster/services.py's stack, as `make cluster-demo` runs it: an MLflow server (basic
  auth, the trials' own account) with its backend store in PostgreSQL and its artifacts in SeaweedFS's
  S3 server, the search's storage in the same bucket (s3://aesearch/searches);
- sqlite-server: the same with the server's backend store in SQLite, the control for PostgreSQL.

`--nodes N` runs the search on a Ray cluster of N nodes on this machine (Ray's `cluster_utils.Cluster`:
a head with no CPU for trials, as a real head, and N - 1 worker nodes with logical CPUs enough for
`concurrent` trials); `--autoscale N` on a cluster that starts with the head alone and an autoscaler
(Ray's fake multi-node provider, the one Ray tests its autoscaler with) allowed N worker nodes: the
trials wait while nodes come up, and the cluster is watched after the search until it has scaled back.
Each cluster has token authentication on, its own token and its own session folder, and is stopped
through its own handles.

`--kill-at N` runs the driver as `aesearch search` in a process of its own, on a Ray head of its own
(which outlives it, as a cluster does), kills it (SIGKILL) once N trial runs are FINISHED in MLflow,
resumes it with `--resume`, and checks that every trial ended once: in the leaderboard, as a FINISHED
run, with its results once. `--trace-memory` runs the driver under tracemalloc and prints where its
memory is held per trial at the end of the trials (slow: for a few hundred trials).

On a server stack it also prints the MLflow requests' latency (p50/p99) and errors, timed by their
clients: every process of the search (driver, trial actors) runs benchmarks/request_timer/
sitecustomize.py, which times each `requests` call to the server; and the bucket's traffic, in and
out, by the S3 server's own counters. Given more than one stack, each workload runs on each, and a
table puts their figures side by side.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import io
import json
import math
import os
import secrets
import signal
import subprocess
import platform
import re
import resource
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from aesearch import settings

settings.apply()  # before Ray is imported, as the CLI does
# Every node and driver on 127.0.0.1: Ray reads this when imported, and would otherwise turn a loopback
# address into the machine's outward one when a driver joins a cluster (--nodes, --autoscale).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pandas as pd  # noqa: E402
import ray  # noqa: E402
import sqlalchemy  # noqa: E402
import yaml  # noqa: E402

from aesearch.locations import sqlite_uri  # noqa: E402
from aesearch.search.driver import SearchOptions, search  # noqa: E402
from aesearch.search.phases import Phases  # noqa: E402
from aesearch.search.ray_api import MarkingOptunaSearch, reload_core_config  # noqa: E402
from aesearch.search.space import parse_space, sample_params, trial_config  # noqa: E402
from aesearch.search.storage import SearchFolder  # noqa: E402
from aesearch.training.simulated import curve, distance  # noqa: E402

CPUS = os.cpu_count() or 1
REPO = Path(__file__).resolve().parents[1]
TIMER = Path(__file__).with_name("request_timer")  # its sitecustomize.py times MLflow's requests
CHECKPOINT = re.compile(r".*/checkpoint_[^/]+(?=/)")  # a trial's checkpoint folder in Tune's experiment


@dataclass(frozen=True)
class Workload:
    name: str
    trials: int
    epochs: int
    seconds: float  # per epoch
    concurrent: int
    early_stopping: str
    ray: str  # Ray Tune's figure for bare Tune, and its source

    @property
    def minimum(self) -> float:
        return self.trials * self.epochs * self.seconds / self.concurrent

    @property
    def title(self) -> str:
        stops = "TPE + ASHA" if self.early_stopping == "asha" else "TPE, no early stopping"
        return (f"{self.name}: {self.trials} trials x {self.epochs} epoch(s) x {self.seconds:g} s, "
                f"{self.concurrent} at a time, {stops}")


WORKLOADS = {
    "bookkeeping": Workload("bookkeeping", 10_000, 1, 1.0, 16, "asha",
                            "Ray: 10,000 x 1 s, 16 at a time: bound 800 s = 1.28x the 625 s minimum, observed 715 s = "
                            "1.14x (test_bookkeeping_overhead.py, tune-scalability.rst)"),
    "throughput": Workload("throughput", 96, 100, 0.1, 96, "none",
                           "Ray: ~500 results/s without logging, 50-100 with (tune-scalability.rst); "
                           "96 trials x 50 results/s: bound 1.2x the minimum (test_result_throughput_single_node.py)"),
}
QUICK = {  # sized for a 2-core machine: a few minutes in all
    "bookkeeping": replace(WORKLOADS["bookkeeping"], trials=160, concurrent=8),
    "throughput": replace(WORKLOADS["throughput"], trials=8, epochs=100, seconds=0.05, concurrent=8),
}


STACKS = {
    "embedded": "MLflow: embedded SQLite, storage: local folder",
    "sqlite-server": "MLflow: server on SQLite, artifacts in S3 (SeaweedFS); storage: S3",
    "production": "MLflow: server on PostgreSQL, artifacts in S3 (SeaweedFS); storage: S3",
}


@dataclass
class Stack:
    """Where a search logs and stores, and how to read its figures back."""

    name: str
    tracking_uri: str
    storage: str
    store_uri: str  # MLflow's backend store, read directly for the figures
    store_args: dict = field(default_factory=dict)  # the database's password, never in the URI
    s3: object | None = None  # cluster/services.py's S3Server
    requests: Path | None = None  # the request timer's files
    servers: dict = field(default_factory=dict)  # name -> cluster/services.py's Service

    def server_cpu(self) -> dict[str, float]:
        """CPU seconds each server has used so far: its process group's processes, and the children
        they have reaped (PostgreSQL's backends)."""
        ticks, used = os.sysconf("SC_CLK_TCK"), {}
        for name, service in self.servers.items():
            total = 0
            for entry in Path("/proc").iterdir():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except (OSError, IndexError):
                    continue
                if entry.name.isdigit() and int(fields[2]) == service.process.pid:  # its process group
                    total += sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
            used[name] = total / ticks
        return used


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """These variables in this process's environment (inherited by the Ray it starts), then as before."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def timed_requests() -> Iterator[None]:
    """The request timer in this process too (it started before the timer was on its PYTHONPATH)."""
    import requests

    original = requests.Session.request
    spec = importlib.util.spec_from_file_location("aesearch_request_timer", TIMER / "sitecustomize.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # installs itself: the variables are set
    try:
        yield
    finally:
        requests.Session.request = original


@contextmanager
def stack(name: str, folder: Path, server_workers: int, auth_cache_s: int) -> Iterator[Stack]:
    """The stack NAME (see STACKS) in FOLDER: its servers started, this process a client of them (the S3
    and MLflow credentials the trials use, in its environment before Ray starts), all stopped after."""
    if name == "embedded":
        uri = sqlite_uri(folder / "mlflow.db")
        yield Stack(name, uri, str(folder / "results"), uri)
        return
    if str(REPO / "cluster") not in sys.path:
        sys.path.insert(0, str(REPO / "cluster"))
    from services import MLflowServer, PostgreSQL, S3Server

    with ExitStack() as started:
        database = None
        if name == "production":
            database = started.enter_context(PostgreSQL(folder / "postgres", databases=MLflowServer.DATABASES))
        s3 = started.enter_context(S3Server(folder / "s3"))
        server = started.enter_context(MLflowServer(folder / "mlflow", database, s3, workers=server_workers,
                                                    auth_cache_s=auth_cache_s))
        requests = folder / "requests"
        requests.mkdir()
        python_path = os.pathsep.join(filter(None, (str(TIMER), os.environ.get("PYTHONPATH"))))
        started.enter_context(environment({
            **s3.client_env(s3.trials), **server.client_env(), "PYTHONPATH": python_path,
            "AESEARCH_SCALE_REQUESTS": server.uri, "AESEARCH_SCALE_REQUEST_LOG": str(requests)}))
        started.enter_context(timed_requests())
        store_args = {"password": database.passwords[database.role]} if database is not None else {}
        servers = {"MLflow": server.service, "PostgreSQL": database and database.service, "S3": s3.service}
        yield Stack(name, server.uri, s3.uri("searches"), server.store_uri(), store_args, s3, requests,
                    {name: service for name, service in servers.items() if service is not None})


def space_document(workload: Workload, cpu: float | None = None, budget: dict | None = None) -> dict:
    """The simulated search; each trial asks for `cpu` logical CPUs (default: `concurrent` trials fill
    this machine's); `budget`: settings of the budget section besides the workload's (tracking_batch_s,
    checkpoint_every_s)."""
    return {
        "name": f"scale-{workload.name}",
        "data": {"name": "digits"},
        "base": {"model": {"hidden_dims": [16]}},
        "space": {
            "optimizer.lr": {"type": "float", "low": 0.0001, "high": 0.1, "log": True},
            "model.latent_dim": {"type": "categorical", "choices": [2, 4, 8, 16, 32, 64]},
        },
        "budget": {"num_samples": workload.trials, "max_epochs": workload.epochs, "grace_period": 1,
                   **(budget or {})},
        "resources": {"cpu": cpu or CPUS / workload.concurrent},  # logical CPUs: `concurrent` trials fit at once
        "max_concurrent": workload.concurrent,
        "early_stopping": workload.early_stopping,
        "simulate": {"seconds_per_epoch": workload.seconds},
    }


# --- Ray clusters of many nodes on this machine --------------------------------------------------------


@contextmanager
def ray_environment(values: dict[str, str]) -> Iterator[None]:
    """`environment`, and Ray's C++ core made to read it (it caches RAY_AUTH_MODE when Ray is imported)."""
    try:
        with environment(values):
            reload_core_config()
            yield
    finally:
        reload_core_config()


class RayNodes:
    """A Ray cluster on 127.0.0.1 for the search (--nodes, --autoscale): the address it joins, its nodes
    alive now, the most seen alive. Token authentication on, with a token of its own in FOLDER."""

    def __init__(self, folder: Path, autoscaling: bool = False):
        self.folder, self.autoscaling = folder, autoscaling
        self.token = folder / "ray_token"
        self.token.write_text(secrets.token_hex(32))
        self.token.chmod(0o600)
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token),
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # Ray's address detection answers 127.0.0.1
        self.address = ""
        self.most_alive = 0

    def alive(self) -> int:
        """Nodes alive now, as the GCS tells this driver (it must be connected)."""
        alive = sum(node["Alive"] for node in ray.nodes())
        self.most_alive = max(self.most_alive, alive)
        return alive


IDLE_S = 20.0  # how long idle nodes are watched before the search


@contextmanager
def fixed_nodes(folder: Path, nodes: int, cpus_per_node: int) -> Iterator[RayNodes]:
    """A head with no CPU (the driver's and GCS's node, as a real cluster's head) and `nodes - 1` worker
    nodes of `cpus_per_node` logical CPUs, each with its own raylet and object store (Ray's
    cluster_utils.Cluster, in this process)."""
    from ray.cluster_utils import Cluster

    cluster = RayNodes(folder)
    with ray_environment(cluster.env):
        started = time.perf_counter()
        where = {"temp_dir": str(folder / "ray"), "object_store_memory": 75 * 2**20}
        ray_cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, **where})
        try:
            for _ in range(nodes - 1):
                ray_cluster.add_node(num_cpus=cpus_per_node, **where)
            ray_cluster.wait_for_nodes()
            cluster.address = ray_cluster.address
            up = time.perf_counter() - started
            time.sleep(10)  # settled: what the idle nodes cost the machine
            busy = machine_busy_seconds()
            time.sleep(IDLE_S)
            print(f"  {nodes} Ray nodes up in {up:.0f} s (the head with 0 CPUs, {nodes - 1} x {cpus_per_node} logical "
                  f"CPU(s)); idle, they keep {(machine_busy_seconds() - busy) / IDLE_S:.2f} of {CPUS} cores busy; "
                  f"{used_memory() / 2**30:.1f} GiB of this machine's memory in use", flush=True)
            yield cluster
        finally:
            ray_cluster.shutdown()


@contextmanager
def ray_head(folder: Path, cluster: RayNodes, cpus: int, port: int, *options: str,
             env: dict[str, str] | None = None) -> Iterator[None]:
    """`ray start --head --block` on PORT with `cpus` logical CPUs, as a process of its own (a cluster's
    head the driver joins by address and does not own). Stopped by its own process: SIGTERM (Ray drains
    the head, then stops the processes it started), then anything of its process group still there."""
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}",
               f"--num-cpus={cpus}", "--node-ip-address=127.0.0.1", f"--temp-dir={folder / 'ray'}",
               "--include-dashboard=false", *options]
    with open(folder / "head.log", "wb") as log:
        head = subprocess.Popen(command, env={**os.environ, **cluster.env, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with ray_environment(cluster.env):
            cluster.address = f"127.0.0.1:{port}"
            wait_for_port(port, head, folder / "head.log")
            yield
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
        for pid in process_group(head.pid):  # what the head's own shutdown left
            os.kill(pid, signal.SIGKILL)


@contextmanager
def autoscaling_nodes(folder: Path, most: int, cpus_per_node: int) -> Iterator[RayNodes]:
    """A head alone (no CPU) whose autoscaler may start up to `most` worker nodes of `cpus_per_node`
    logical CPUs when work waits, and stops them idle for 15 s: Ray's fake multi-node provider (nodes
    are processes on this machine)."""
    cluster = RayNodes(folder, autoscaling=True)
    port = free_port()
    config = {
        "cluster_name": "aesearch-scale", "max_workers": most,
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{port}", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "nobody"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "trials": {"resources": {"CPU": cpus_per_node, "object_store_memory": 75 * 2**20}, "node_config": {},
                       "min_workers": 0, "max_workers": most}},
        "head_node_type": "ray.head.default", "upscaling_speed": 1.0, "idle_timeout_minutes": 0.25,
        **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                               "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                               "cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "docker": {}, "file_mounts": {}, "file_mounts_sync_continuously": False,
    }
    (folder / "autoscaling.json").write_text(json.dumps(config))
    started = time.perf_counter()
    with ray_head(folder, cluster, 0, port, f"--autoscaling-config={folder / 'autoscaling.json'}",
                  env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}):
        print(f"  a Ray head (0 CPUs) up in {time.perf_counter() - started:.0f} s; its autoscaler may start up "
              f"to {most} worker nodes of {cpus_per_node} logical CPU(s)", flush=True)
        yield cluster


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout_s: float = 120.0) -> None:
    """Until something listens on 127.0.0.1:PORT; the process's log if it exits first."""
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the Ray head exited ({process.returncode}): {log.read_text()[-2000:]}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the Ray head did not listen on {port} within {timeout_s:g} s")


def process_group(pgid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                found.append(int(entry.name))
        except (OSError, IndexError):
            pass
    return found


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def meminfo() -> dict[str, int]:
    return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()}


def used_memory() -> int:
    """This machine's memory in use (MemTotal - MemAvailable), in bytes."""
    info = meminfo()
    return info["MemTotal"] - info["MemAvailable"]



# --- what this process (the driver) does while the search runs ---------------------------------------


def memory(pid: int | str = "self") -> dict[str, int]:
    """Rss and Anonymous (private) memory of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value) * 1024
    return {"rss": fields["Rss"], "private": fields["Anonymous"]}


def resident_bytes() -> int:
    """This process's RSS, cheaply (/proc/self/statm): read at every ask, where smaps_rollup's 30 ms
    for a 1 GB driver would be the benchmark's own cost in the driver's loop."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trial_actors() -> list[int]:
    """This machine's processes running a Tune trial (Ray titles them `ray::ImplicitFunc...`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::ImplicitFunc"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


SAMPLED_CPU_S = [0.0]  # the CPU the Probe's sampling thread spent so far (the benchmark's, not the driver's)


def driver_cpu_seconds() -> float:
    """This process's CPU, but for the Probe's sampling thread (reading 16 actors' smaps_rollup every 5 s
    is ~10% of a core: it was counted as the driver's until 2026-12-06, a later session)."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime - SAMPLED_CPU_S[0]


def machine_busy_seconds() -> float:
    """CPU seconds every process of this machine has used (/proc/stat: all but idle and iowait)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal, *_ = map(int, Path("/proc/stat").read_text().split()[1:11])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class CpuPhases(Phases):
    """The search's phases, with the driver's CPU and the whole machine's at each mark: the trials
    phase's share is what each further trial costs, without the start and the end of a search."""

    def __init__(self, trace_memory: bool = False):
        super().__init__()
        self.cpu = [(driver_cpu_seconds(), machine_busy_seconds())]
        self.memory_at_end_of_trials: tracemalloc.Snapshot | None = None
        if trace_memory:
            tracemalloc.start(TRACED_FRAMES)

    def mark(self, phase: str) -> None:
        super().mark(phase)
        self.cpu.append((driver_cpu_seconds(), machine_busy_seconds()))
        if phase == "trials" and tracemalloc.is_tracing():  # every trial ended, the Tuner and its trials still held
            self.memory_at_end_of_trials = tracemalloc.take_snapshot()
            tracemalloc.stop()

    def used_in(self, phase: str) -> tuple[float, float]:
        """(driver, machine) CPU seconds in `phase`."""
        at = [name for name, _ in self.marks].index(phase)
        return self.cpu[at][0] - self.cpu[at - 1][0], self.cpu[at][1] - self.cpu[at - 1][1]


class GcTimes:
    """The driver's time in Python's garbage collector, by generation (gc.callbacks): a full collection
    walks every object the driver holds, which grow with the trials."""

    def __init__(self):
        self.seconds, self.counts, self.longest = [0.0] * 3, [0] * 3, 0.0
        self.started_at: float | None = None

    def __enter__(self) -> GcTimes:
        gc.callbacks.append(self.callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self.callback)

    def callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started_at = time.perf_counter()
        elif self.started_at is not None:
            took = time.perf_counter() - self.started_at
            self.seconds[info["generation"]] += took
            self.counts[info["generation"]] += 1
            self.longest = max(self.longest, took)

    def line(self) -> str:
        return (", ".join(f"generation {g}: {n:,} collections, {t:.1f} s" for g, (n, t) in
                          enumerate(zip(self.counts, self.seconds))) + f"; the longest {self.longest * 1e3:.0f} ms")


TRACED_FRAMES = 12  # deep enough to reach, from an allocation in a library, the code that holds it


def memory_sites(snapshot: tracemalloc.Snapshot, trials: int, top: int = 12) -> list[str]:
    """The driver's live Python memory at the end of the trials, by the allocating line nearest to Ray
    Tune, Optuna, MLflow or aesearch (what holds it), per trial: where memory per trial goes."""
    sizes: Counter[str] = Counter()
    for stat in snapshot.statistics("traceback"):
        frames = [f"{Path(frame.filename).name}:{frame.lineno}" for frame in stat.traceback
                  if any(part in frame.filename for part in ("ray/tune", "ray/train", "optuna", "mlflow", "aesearch"))]
        sizes[frames[-1] if frames else f"{Path(stat.traceback[-1].filename).name}:{stat.traceback[-1].lineno}"] += stat.size
    total = sum(sizes.values())
    lines = [f"{total / trials / 1024:.1f} KB per trial traced in all; the largest sites:"]
    lines += [f"  {size / trials / 1024:7.1f} KB/trial  {site}" for site, size in sizes.most_common(top)]
    return lines


SAMPLE_EVERY_S = 5.0  # reading a 800 MiB actor's smaps_rollup costs ~30 ms of this (the driver's) CPU


class Probe:
    """Times every Optuna ask (the searcher's `suggest`, with the number of finished trials and this
    process's RSS at that moment) and samples the trial actors' memory every `SAMPLE_EVERY_S`, the
    machine's memory in use, and on a cluster of many nodes how many are alive (and when first more
    than the head)."""

    def __init__(self, cluster: RayNodes | None = None):
        self.asks: list[tuple[int, float, int]] = []  # (finished trials, seconds, driver RSS)
        self.actors: dict[int, dict[str, int]] = {}  # pid -> its largest memory seen
        self.cluster, self.first_worker_node, self.most_memory = cluster, None, used_memory()
        self.started = time.perf_counter()
        self.stopping = threading.Event()
        self.sampled_before = SAMPLED_CPU_S[0]

    def __enter__(self) -> Probe:
        original = self.original = MarkingOptunaSearch.suggest
        asks = self.asks

        def timed(searcher, trial_id):
            started = time.perf_counter()
            suggested = original(searcher, trial_id)
            if isinstance(suggested, dict):
                asks.append((len(searcher._completed_trials), time.perf_counter() - started, resident_bytes()))
            return suggested

        MarkingOptunaSearch.suggest = timed
        self.sampler = threading.Thread(target=self.sample, daemon=True)
        self.sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        MarkingOptunaSearch.suggest = self.original
        self.stopping.set()
        self.sampler.join()

    @property
    def cpu_seconds(self) -> float:
        """The CPU its sampling thread spent (the benchmark's own, left out of the driver's)."""
        return SAMPLED_CPU_S[0] - self.sampled_before

    def sample(self) -> None:
        before = self.sampled_before
        while not self.stopping.wait(SAMPLE_EVERY_S):
            SAMPLED_CPU_S[0] = before + time.thread_time()
            self.most_memory = max(self.most_memory, used_memory())
            if self.cluster is not None and ray.is_initialized():
                try:
                    if self.cluster.alive() > 1 and self.first_worker_node is None:
                        self.first_worker_node = time.perf_counter() - self.started
                except Exception:  # the driver is connecting or leaving: the next sample tells
                    pass
            for pid in trial_actors():
                try:
                    now = memory(pid)
                except OSError:
                    continue
                seen = self.actors.setdefault(pid, now)
                self.actors[pid] = {k: max(seen[k], now[k]) for k in now}
        SAMPLED_CPU_S[0] = before + time.thread_time()


# --- after the search ----------------------------------------------------------------------------------


def store_figures(uri: str, experiment: str, connect_args: dict | None = None) -> dict[str, object]:
    """From MLflow's store itself: metric rows, result rows (`epoch`, one per report), their timestamps,
    and the trial runs' start and end times (ms)."""
    engine = sqlalchemy.create_engine(uri, connect_args=connect_args or {})
    of_experiment = ("JOIN runs r ON m.run_uuid = r.run_uuid JOIN experiments e ON r.experiment_id = e.experiment_id "
                     "WHERE e.name = :name")
    with engine.connect() as connection:
        def rows(query: str) -> list:
            return list(connection.execute(sqlalchemy.text(query), {"name": experiment}))

        metric_rows = rows(f"SELECT COUNT(*) FROM metrics m {of_experiment}")[0][0]
        epochs = [t for (t,) in rows(f"SELECT m.timestamp FROM metrics m {of_experiment} AND m.key = 'epoch'")]
        runs = rows("SELECT r.start_time, r.end_time FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
                    "JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'aesearch.role' AND t.value = 'trial' "
                    "WHERE e.name = :name")
    engine.dispose()
    return {"metric_rows": metric_rows, "epoch_times": sorted(epochs), "starts": sorted(start for start, _ in runs),
            "ends": sorted(end for _, end in runs if end is not None)}


def storage_figures(experiment_folder: str) -> dict[str, object]:
    """What the search left in its storage (a folder or the bucket, through pyarrow's filesystem as Tune
    writes it): its checkpoints (folders, bytes), how many the trials' reports stored (their result files
    name each), and its experiment-state snapshots (name, bytes)."""
    from pyarrow.fs import FileSelector, FileType

    folder = SearchFolder(experiment_folder)
    files = [f for f in folder.fs.get_file_info(FileSelector(folder.path, recursive=True)) if f.type == FileType.File]
    checkpoints = {f.path: CHECKPOINT.search(f.path) for f in files}
    checkpoints = {path: found.group(0) for path, found in checkpoints.items() if found}  # file -> its folder
    reported = 0
    for f in files:
        if f.base_name == "result.json":
            with folder.fs.open_input_stream(f.path) as stream:
                reported += len(re.findall(rb'"checkpoint_dir_name": "', stream.readall()))
    return {"checkpoints": len(set(checkpoints.values())), "reported": reported,
            "checkpoint_bytes": sum(f.size for f in files if f.path in checkpoints),
            "snapshots": {f.base_name: f.size for f in files if f.base_name.startswith("experiment_state-")}}


def request_figures(folder: Path) -> dict[str, object]:
    """The MLflow requests the request timer saw, from every process of the search."""
    rows = [line.split("\t") for log in folder.glob("*.tsv") for line in log.read_text().splitlines()]
    seconds = sorted(float(row[1]) for row in rows)
    cuts = statistics.quantiles(seconds, n=100, method="inclusive") if len(seconds) > 1 else seconds * 99
    statuses = Counter(row[4] for row in rows)
    failed = Counter(f"{row[2]} {row[3]} {row[4]}" for row in rows if not row[4].startswith(("2", "3")))
    busiest = Counter(f"{row[2]} {row[3]}" for row in rows).most_common(3)
    return {"count": len(rows), "processes": len(list(folder.glob("*.tsv"))), "p50": cuts[49] if cuts else 0.0,
            "p99": cuts[98] if cuts else 0.0, "max": seconds[-1] if seconds else 0.0, "statuses": statuses,
            "failed": failed, "busiest": busiest,
            "span": (max(float(r[0]) for r in rows) - min(float(r[0]) for r in rows)) if rows else 0.0}


def ask_latencies(asks: list[tuple[int, float, int]]) -> str:
    """Median ask time by finished trials: up to 100, up to 1,000, up to 10,000, beyond."""
    parts, low = [], -1
    for high in (100, 1_000, 10_000, float("inf")):
        times = [seconds for finished, seconds, _ in asks if low < finished <= high]
        if times:
            label = f"<= {high:,.0f}" if high != float("inf") else f"> {low:,}"
            parts.append(f"p50 {statistics.median(times) * 1e3:.1f} ms, max {max(times) * 1e3:.0f} ms at {label} "
                         f"finished ({len(times)} asks)")
        low = high
    return "; ".join(parts) or "no asks recorded"


def growth_per_trial(asks: list[tuple[int, float, int]]) -> str:
    """The driver's RSS growth per finished trial, from the quarter of the asks onwards (start-up done)."""
    if len(asks) < 8:
        return "too few trials to tell"
    (n0, _, rss0), (n1, _, rss1) = asks[len(asks) // 4], asks[-1]
    if n1 <= n0:
        return "no trial finished in between"
    return f"{(rss1 - rss0) / (n1 - n0) / 1024:+.0f} KB per finished trial (RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB)"


def quality(space, board) -> str:
    """The best trial's distance to the curve's optimum, beside that of the best of as many random trials
    (best by the same noisy curve at the last epoch, as a random search would rank them)."""
    optimum, noise, epochs = space.simulate.optimum, space.simulate.noise, space.budget.max_epochs
    best = board[board["rank"] == 1].iloc[0]
    params = dict(part.split("=") for part in best["params"].split(", "))
    config = trial_config(space, {"optimizer.lr": float(params["optimizer.lr"]),
                                  "model.latent_dim": int(params["model.latent_dim"])})
    drawn = [trial_config(space, p) for p in sample_params(space, len(board), seed=1)]
    randomly = min(drawn, key=lambda c: curve(c, optimum, noise, epochs))
    return (f"best trial {best['params']}: distance {distance(config, optimum):.3g} to the optimum "
            f"({', '.join(f'{k}={v}' for k, v in optimum.items())}); random search's best of {len(board)}: "
            f"{distance(randomly, optimum):.3g}")


def bare_trial(config: dict) -> None:
    """The control for a trial actor's memory: a Tune trial that imports what a trial needs but torch."""
    import mlflow  # noqa: F401
    import optuna  # noqa: F401
    import pydantic  # noqa: F401

    from ray import tune

    for step in range(6):
        time.sleep(0.5)
        tune.report({"step": step})


def bare_actor_memory(folder: Path) -> None:
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
    try:
        with Probe() as probe:
            results = tune.Tuner(bare_trial, tune_config=tune.TuneConfig(num_samples=CPUS),
                                 run_config=tune.RunConfig(storage_path=str(folder), verbose=0,
                                                           callbacks=[JsonLoggerCallback()])).fit()
    finally:
        ray.shutdown()
    if results.errors:
        raise results.errors[0]
    actors = probe.actors.values()
    if not actors:  # the probe samples every few seconds; a busy machine can miss 3-s trials
        print("\ncontrol: a bare Tune trial actor: not sampled (its trials ended between the probe's samples)")
        return
    print(f"\ncontrol: a bare Tune trial actor (ray.tune, mlflow, optuna, pydantic; no torch): RSS "
          f"{max(a['rss'] for a in actors) / 2**20:.0f} MiB, private {max(a['private'] for a in actors) / 2**20:.0f} MiB")


def sleeping_trial(config: dict) -> None:
    """Ray's release test's trial: sleep, report, `epochs` times (no aesearch, no tracking)."""
    from ray import tune

    for epoch in range(config["epochs"]):
        time.sleep(config["seconds"])
        tune.report({"epoch": epoch + 1, "score": config["x"]})


def bare_tune(workload: Workload, folder: Path) -> None:
    """The control on this machine: the workload's sizes on bare Tune, as Ray's release tests run it
    (random search, no early stopping, actors reused; no aesearch, no MLflow, and no result files: Ray
    2.60 writes none by default, so its ResultGrid warns that it finds no metrics, harmlessly)."""
    from ray import tune

    ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
    try:
        trainable = tune.with_resources(sleeping_trial, {"cpu": CPUS / workload.concurrent})
        space = {"epochs": workload.epochs, "seconds": workload.seconds, "x": tune.uniform(0, 1)}
        tuner = tune.Tuner(trainable, param_space=space,
                           tune_config=tune.TuneConfig(num_samples=workload.trials, max_concurrent_trials=workload.concurrent,
                                                       reuse_actors=True),  # as aesearch's searches
                           run_config=tune.RunConfig(storage_path=str(folder), verbose=0))
        cpu, machine, started = driver_cpu_seconds(), machine_busy_seconds(), time.perf_counter()
        results = tuner.fit()
        wall = time.perf_counter() - started
        cpu, machine = driver_cpu_seconds() - cpu, machine_busy_seconds() - machine
    finally:
        ray.shutdown()
    if results.errors:
        raise results.errors[0]
    print(f"\ncontrol: bare Tune, the same {workload.trials} trials x {workload.epochs} x {workload.seconds:g} s, "
          f"{workload.concurrent} at a time (random search, no tracking)")
    print(f"  wall           {wall:.1f} s in Tuner.fit: {wall / workload.minimum:.2f}x the theoretical minimum "
          f"{workload.minimum:.1f} s; {workload.trials / wall:.1f} trials/s, "
          f"{workload.trials * workload.epochs / wall:.1f} results/s (the actors' start included)")
    print(f"  driver CPU     {cpu:.1f} s = {cpu / workload.trials * 1e3:.0f} ms per trial; the machine's {machine:.1f} s = "
          f"{machine / workload.trials * 1e3:.0f} ms per trial ({machine / wall:.2f} of {os.cpu_count()} cores busy)")


def measure(workload: Workload, stack: Stack, cluster: RayNodes | None = None, budget: dict | None = None,
            trace_memory: bool = False) -> dict[str, str]:
    """Runs the workload on the stack (on `cluster`, else a local Ray instance), prints its figures,
    returns the main ones for the side-by-side table."""
    space = parse_space(space_document(workload, cpu=1 if cluster else None, budget=budget))
    name = space.name
    options = SearchOptions(name=name, storage=stack.storage, tracking_uri=stack.tracking_uri,
                            address=cluster.address if cluster else None)
    phases = CpuPhases(trace_memory)
    servers_before = stack.server_cpu()
    memory_before = used_memory()
    before, started = driver_cpu_seconds(), time.perf_counter()
    with Probe(cluster) as probe, GcTimes() as collected:
        board = search(space, options, phases)
    wall, cpu = time.perf_counter() - started, driver_cpu_seconds() - before
    scaled_back = scale_back(cluster) if cluster else None
    print(f"  (the search ended {'and the cluster scaled back ' if scaled_back is not None else ''}"
          f"{time.perf_counter() - started:.0f} s after it began)", flush=True)
    servers_cpu = {name: used - servers_before[name] for name, used in stack.server_cpu().items()}
    results = int(board["epochs"].sum())
    store = store_figures(stack.store_uri, name, stack.store_args)
    stored = storage_figures(options.experiment_folder)
    spent = phases.seconds()
    trials_phase = spent["trials"]
    tune_time = spent["to the first trial report"] + trials_phase  # what Ray's release tests time: tune.run
    times = store["epoch_times"]
    sustained = (len(times) - 1) / ((times[-1] - times[0]) / 1e3) if len(times) > 1 and times[-1] > times[0] else 0.0
    starts = store["starts"]
    full = min(workload.concurrent, len(starts))
    ramp = (starts[full - 1] - starts[0]) / 1e3 if starts else float("nan")
    actors = probe.actors.values()
    outcomes = board["state"].value_counts().to_dict()

    print(f"\n{workload.title}; {STACKS[stack.name]}"
          + "".join(f"; {name} {value:g}" for name, value in (budget or {}).items() if value))
    print(f"  wall           {tune_time:.1f} s in Tune (the trials, from the wait for the first to the end of the last): "
          f"{tune_time / workload.minimum:.2f}x the theoretical minimum {workload.minimum:.1f} s")
    print(f"                 {workload.ray}")
    print(f"  search()       {wall:.1f} s: {phases.line()}")
    print(f"  outcomes       {', '.join(f'{n} {state}' for state, n in outcomes.items())}")
    print(f"  driver CPU     {cpu:.1f} s: {cpu / len(board) * 1e3:.0f} ms per trial, {cpu / results * 1e3:.0f} ms per result "
          f"(not counted: this script's sampling thread, {probe.cpu_seconds:.1f} s)")
    driver_cpu, machine_cpu = phases.used_in("trials")
    marks = dict(phases.marks)
    ended = sum(marks["to the first trial report"] * 1e3 <= end <= marks["trials"] * 1e3 for end in store["ends"])
    print(f"  trials phase   {trials_phase:.1f} s, {ended} trials ended in it: the driver's CPU {driver_cpu:.1f} s = "
          f"{driver_cpu / max(ended, 1) * 1e3:.0f} ms per trial; the machine's {machine_cpu:.1f} s = "
          f"{machine_cpu / max(ended, 1) * 1e3:.0f} ms per trial ({machine_cpu / trials_phase:.2f} of {os.cpu_count()} cores busy)")
    inside = board[["time/trial_seconds", "time/tracking_seconds"]].median()
    print(f"  in a trial     median {inside['time/trial_seconds']:.2f} s from its start to its last report, of which "
          f"{inside['time/tracking_seconds']:.2f} s MLflow (its run opened, every record delivered; "
          f"{workload.epochs * workload.seconds:g} s simulated)")
    print(f"  results        {results} reported, {len(times)} in MLflow ('epoch' rows); {results / tune_time:.1f}/s "
          f"from the first trial's start, {sustained:.1f}/s from the first logged to the last")
    print(f"  Optuna ask     {ask_latencies(probe.asks)}")
    print(f"  driver's GC    {collected.line()} (wall time, all of search())")
    print(f"  ramp-up        {full} trials started {ramp:.1f} s after the first (MLflow run start times)")
    print(f"  driver memory  {growth_per_trial(probe.asks)}")
    if phases.memory_at_end_of_trials is not None:
        print("\n".join(f"                 {line}" for line in memory_sites(phases.memory_at_end_of_trials, len(board))))
    snapshots = ", ".join(f"{n} {size / 1024:.0f} KB" for n, size in stored["snapshots"].items())
    print(f"  state snapshot {snapshots or 'none'}")
    print(f"  MLflow rows    {store['metric_rows']:,} metric rows ({store['metric_rows'] / max(results, 1):.1f} per result)")
    if actors:
        print(f"  trial actor    RSS {max(a['rss'] for a in actors) / 2**20:.0f} MiB, private "
              f"{max(a['private'] for a in actors) / 2**20:.0f} MiB (the largest of {len(actors)} actors)")
    print(f"  search quality {quality(space, board)}")
    print(f"  memory         {(probe.most_memory - memory_before) / 2**30:+.1f} GiB at most during the search "
          f"(this machine's in use then: {probe.most_memory / 2**30:.1f} GiB of {meminfo()['MemTotal'] / 2**30:.0f})")
    if cluster is not None:
        print(f"  Ray nodes      {cluster.most_alive} alive at most, the head included"
              + (f"; the first worker node up {probe.first_worker_node:.0f} s after search() began"
                 if probe.first_worker_node is not None else "")
              + (f"; back to the head alone {scaled_back:.0f} s after the search ended" if scaled_back is not None
                 else "; not back to the head alone within 300 s" if cluster.autoscaling else ""))
    each = stored["checkpoint_bytes"] / max(stored["checkpoints"], 1)
    print(f"  checkpoints    {stored['checkpoints']} kept in the storage ({stored['checkpoint_bytes'] / 2**20:.1f} MiB, "
          f"{each / 1024:.0f} KB each); written: {stored['reported']:,} ({stored['reported'] / results:.2f} per result), "
          f"~{stored['reported'] * each / 2**20:.1f} MiB")
    figures = {"wall in Tune": f"{tune_time:.1f} s ({tune_time / workload.minimum:.2f}x min)",
               "search()": f"{wall:.1f} s", "results/s sustained": f"{sustained:.1f}",
               "driver CPU": f"{cpu / len(board) * 1e3:.0f} ms/trial, {cpu / results * 1e3:.0f} ms/result",
               "checkpoints kept": f"{stored['checkpoint_bytes'] / 2**20:.1f} MiB"}
    if stack.requests is not None:
        asked = request_figures(stack.requests)
        statuses = ", ".join(f"{n} x {status}" for status, n in sorted(asked["statuses"].items()))
        print(f"  MLflow calls   {asked['count']:,} requests from {asked['processes']} processes "
              f"({asked['count'] / max(results, 1):.1f} per result, {asked['count'] / max(asked['span'], 1e-9):.0f}/s): "
              f"p50 {asked['p50'] * 1e3:.1f} ms, p99 {asked['p99'] * 1e3:.0f} ms, max {asked['max'] * 1e3:.0f} ms "
              f"(timed by the clients); {statuses}")
        print(f"                 most: {'; '.join(f'{call} {n:,}' for call, n in asked['busiest'])}")
        if asked["failed"]:
            failed = "; ".join(f"{call} x {n}" for call, n in asked["failed"].most_common(5))
            print(f"                 not 2xx: {failed}")
        print(f"  server CPU     {', '.join(f'{name} {used:.1f} s' for name, used in servers_cpu.items())} "
              f"during search()'s {wall:.0f} s; MLflow's {servers_cpu['MLflow'] / results * 1e3:.0f} ms per result")
        traffic = stack.s3.traffic()
        print(f"  bucket traffic {traffic['received'] / 2**20:.1f} MiB written, {traffic['sent'] / 2**20:.1f} MiB read "
              f"(every client: checkpoints, Tune's results and state, MLflow's artifacts; the S3 server's counters)")
        failures = sum(n for status, n in asked["statuses"].items() if not status.startswith(("2", "3", "4")))
        figures |= {"MLflow p50 / p99": f"{asked['p50'] * 1e3:.1f} / {asked['p99'] * 1e3:.0f} ms",
                    "MLflow requests": f"{asked['count']:,} ({failures} 5xx or failed)",
                    "MLflow server CPU": f"{servers_cpu['MLflow']:.0f} s",
                    "bucket written / read": f"{traffic['received'] / 2**20:.1f} / {traffic['sent'] / 2**20:.1f} MiB"}
    assert len(times) == results, f"{results} results reported, {len(times)} in MLflow"
    return figures


TRIAL_RUNS = ("FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
              "JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'aesearch.role' AND t.value = 'trial' "
              "WHERE e.name = :name")


def ended_trials(stack: Stack, experiment: str) -> dict[str, int]:
    """The search's trial runs in MLflow's store by status, and those deleted ('FINISHED': 9, 'deleted': 2,
    ...), and the results ('epoch' rows) of the runs not deleted; read from the database itself."""
    engine = sqlalchemy.create_engine(stack.store_uri, connect_args=stack.store_args)
    try:
        with engine.connect() as connection:
            rows = list(connection.execute(sqlalchemy.text(
                f"SELECT r.status, r.lifecycle_stage, COUNT(*) {TRIAL_RUNS} GROUP BY r.status, r.lifecycle_stage"),
                {"name": experiment}))
            results = connection.execute(sqlalchemy.text(
                f"SELECT COUNT(*) FROM metrics m WHERE m.key = 'epoch' AND m.run_uuid IN "
                f"(SELECT r.run_uuid {TRIAL_RUNS} AND r.lifecycle_stage = 'active')"), {"name": experiment}).scalar()
    except sqlalchemy.exc.OperationalError:  # the store is not made yet
        return {}
    finally:
        engine.dispose()
    counts: Counter[str] = Counter({"results": results})
    for status, stage, n in rows:
        counts["deleted" if stage == "deleted" else status] += n
    return dict(counts)


def kill_and_resume(workload: Workload, stack: Stack, folder: Path, at: int) -> None:
    """The search's driver killed the hard way (SIGKILL: no handler runs) once `at` trials have ended,
    on a Ray head of its own that outlives it, then `aesearch search --resume`d: the resumed search
    must end with every trial once (in Tune's leaderboard and in MLflow, each with its one result) and
    the trials the killed driver started after its last save deleted from MLflow (restorable)."""
    document = space_document(workload, cpu=1)
    name = document["name"]
    space = folder / "space.yaml"
    space.write_text(yaml.safe_dump(document, sort_keys=False))
    cluster = RayNodes(folder)
    with ray_head(folder, cluster, workload.concurrent, free_port()):
        command = [sys.executable, "-m", "aesearch.cli", "search", str(space), "--storage", stack.storage,
                   "--tracking-uri", stack.tracking_uri, "--address", cluster.address]
        env = {**os.environ, **cluster.env}
        started = time.perf_counter()
        with open(folder / "killed.log", "w") as log:
            driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while ended_trials(stack, name).get("FINISHED", 0) < at:
                if driver.poll() is not None:
                    raise RuntimeError(f"the search ended before {at} trials: {(folder / 'killed.log').read_text()[-3000:]}")
                time.sleep(2)
        finally:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver, the hard way
            driver.wait()
        killed_at, before = time.perf_counter() - started, ended_trials(stack, name)
        state = storage_figures(f"{stack.storage}/{name}")["snapshots"]
        resumed_at = time.perf_counter()
        with open(folder / "resumed.log", "w") as log:
            resumed = subprocess.run([*command, "--resume"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        took = time.perf_counter() - resumed_at
    output = (folder / "resumed.log").read_text()
    if resumed.returncode != 0:
        raise RuntimeError(f"the resumed search exited {resumed.returncode}: {output[-3000:]}")
    after = ended_trials(stack, name)
    board = pd.read_csv(io.StringIO(SearchFolder(f"{stack.storage}/{name}").read("leaderboard.csv")),
                        dtype={"trial": str})
    times = [line for line in output.splitlines() if line.startswith("aesearch: time:")]
    print(f"\n{workload.title}; {STACKS[stack.name]}: the driver killed, then resumed")
    print(f"  killed         SIGKILL {killed_at:.0f} s after the start, {before.get('FINISHED', 0)} trial runs finished, "
          f"{before.get('RUNNING', 0)} running; the last saved state: "
          f"{', '.join(f'{n} {size / 1024:.0f} KB' for n, size in state.items()) or 'none'}")
    print(f"  resumed        --resume took {took:.0f} s to the end ({times[-1] if times else 'no time line'})")
    print(f"  every trial    leaderboard {len(board)} rows, {board['trial'].nunique()} distinct trials, "
          f"{(board['state'] == 'completed').sum()} completed; MLflow: {after.get('FINISHED', 0)} trial runs "
          f"finished, {after.get('RUNNING', 0)} running, {after.get('KILLED', 0)} killed, {after.get('FAILED', 0)} "
          f"failed, {after.get('deleted', 0)} deleted (started after the last save, sampled afresh); "
          f"{after.get('results', 0)} results in them for {workload.trials * workload.epochs} reported once each")
    assert len(board) == board["trial"].nunique() == workload.trials, "a trial missing or twice in the leaderboard"
    assert after.get("FINISHED", 0) == workload.trials and not after.get("RUNNING"), after
    assert after.get("results") == workload.trials * workload.epochs, after


def scale_back(cluster: RayNodes, timeout_s: float = 300.0) -> float | None:
    """Seconds until an autoscaling cluster has its head alone again (it stops nodes idle for 15 s); None
    for a cluster of fixed nodes, or one that has not within `timeout_s`."""
    if not cluster.autoscaling:
        return None
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        started = time.perf_counter()
        while time.perf_counter() - started < timeout_s:
            if cluster.alive() == 1:
                return time.perf_counter() - started
            time.sleep(1)
        return None
    finally:
        ray.shutdown()


def side_by_side(workload: Workload, columns: dict[str, dict[str, str]]) -> None:
    """One workload's main figures, a column per stack."""
    rows = list(dict.fromkeys(row for figures in columns.values() for row in figures))
    width = max(24, *(len(v) + 2 for figures in columns.values() for v in figures.values()))
    print(f"\n{workload.title}: side by side")
    print(f"  {'':24}" + "".join(f"{name:<{width}}" for name in columns))
    for row in rows:
        print(f"  {row:24}" + "".join(f"{figures.get(row, '-'):<{width}}" for figures in columns.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run of each workload (minutes on 2 cores)")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), action="append", help="default: all")
    parser.add_argument("--trials", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seconds", type=float, help="per epoch")
    parser.add_argument("--concurrent", type=int)
    parser.add_argument("--stack", action="append", choices=sorted(STACKS),
                        help="what the search runs on (repeatable: side by side; default: embedded)")
    parser.add_argument("--server-workers", type=int, default=1,
                        help="the MLflow server's worker processes (default 1, as make cluster-demo's; "
                             "cluster/mlflow/compose.yaml runs 4)")
    parser.add_argument("--auth-cache-s", type=int, default=60,
                        help="the MLflow server's auth cache (default 60 s, as cluster/services.py's; 0: off, "
                             "MLflow's default, a password check on every request)")
    parser.add_argument("--keep", type=Path, metavar="FOLDER",
                        help="run the (embedded) stack in FOLDER, an empty or new folder, and leave it there: its "
                             "store and storage, e.g. for `aesearch report NAME --tracking-uri sqlite:///FOLDER/mlflow.db`")
    parser.add_argument("--tracking-batch-s", type=float, default=0.0,
                        help="budget.tracking_batch_s: each trial sends its epochs' metrics this often (0: each at once)")
    parser.add_argument("--checkpoint-every-s", type=float, default=0.0,
                        help="budget.checkpoint_every_s: each trial stores a checkpoint with a report this often "
                             "(0: with every report)")
    parser.add_argument("--nodes", type=int, help="run on a Ray cluster of this many nodes on this machine (>= 2)")
    parser.add_argument("--autoscale", type=int, metavar="NODES",
                        help="run on an autoscaling Ray cluster (the head alone at first) of at most NODES worker nodes")
    parser.add_argument("--kill-at", type=int, metavar="TRIALS",
                        help="kill the search's driver (SIGKILL) once TRIALS trials have ended, resume it, and check "
                             "that every trial ends once (the driver on a Ray head of its own, in a process of its own)")
    parser.add_argument("--trace-memory", action="store_true",
                        help="trace the driver's Python memory (tracemalloc, slower) and print where it is held per "
                             "trial at the end of the trials")
    parser.add_argument("--bare-tune", action="store_true",
                        help="after each workload, the same sizes on bare Tune (Ray's release tests' setting) here: "
                             "the control for the platform's own cost on this machine")
    args = parser.parse_args()
    if args.keep is not None and (args.keep.exists() and any(args.keep.iterdir()) or len(args.stack or []) > 1
                                  or len(args.workload or WORKLOADS) > 1):
        parser.error(f"--keep {args.keep}: needs an empty or new folder, one workload and one stack")
    if args.nodes is not None and args.nodes < 2 or args.autoscale is not None and args.autoscale < 1:
        parser.error("--nodes: at least 2 (the head and a worker node); --autoscale: at least 1 worker node")
    if args.nodes and args.autoscale:
        parser.error("--nodes or --autoscale, not both")
    if args.kill_at is not None and (args.nodes or args.autoscale or args.kill_at < 1):
        parser.error("--kill-at: at least 1 trial, on a Ray head of its own (not with --nodes or --autoscale)")
    sizes = QUICK if args.quick else WORKLOADS
    print(f"{platform.machine()}, {CPUS} cores, Ray {ray.__version__}; {'quick run' if args.quick else 'full sizes'}")
    if set(args.stack or []) - {"embedded"}:
        import mlflow

        print(f"MLflow server {mlflow.__version__}: {args.server_workers} worker(s), basic auth, auth cache "
              f"{args.auth_cache_s} s")
    for name in args.workload or sorted(WORKLOADS):
        changes = {k: v for k, v in (("trials", args.trials), ("epochs", args.epochs), ("seconds", args.seconds),
                                     ("concurrent", args.concurrent)) if v is not None}
        workload, columns = replace(sizes[name], **changes), {}
        for stack_name in args.stack or ["embedded"]:
            with ExitStack() as kept:
                folder = args.keep or Path(kept.enter_context(tempfile.TemporaryDirectory(prefix="aesearch-scale-")))
                folder.mkdir(parents=True, exist_ok=True)
                running = kept.enter_context(stack(stack_name, folder, args.server_workers, args.auth_cache_s))
                cluster = None
                if args.kill_at is not None:
                    kill_and_resume(workload, running, folder, args.kill_at)
                    continue
                if args.nodes:
                    per_node = math.ceil(workload.concurrent / (args.nodes - 1))
                    cluster = kept.enter_context(fixed_nodes(folder, args.nodes, per_node))
                elif args.autoscale:
                    per_node = math.ceil(workload.concurrent / args.autoscale)
                    cluster = kept.enter_context(autoscaling_nodes(folder, args.autoscale, per_node))
                budget = {"tracking_batch_s": args.tracking_batch_s, "checkpoint_every_s": args.checkpoint_every_s}
                columns[stack_name] = measure(workload, running, cluster, budget, args.trace_memory)
        if len(columns) > 1:
            side_by_side(workload, columns)
        if args.bare_tune:
            with tempfile.TemporaryDirectory(prefix="aesearch-scale-") as folder:
                bare_tune(workload, Path(folder))
    if not (args.nodes or args.autoscale or args.kill_at):  # Ray's core keeps the cluster's token: no local Ray after it
        with tempfile.TemporaryDirectory(prefix="aesearch-scale-") as folder:
            bare_actor_memory(Path(folder))


if __name__ == "__main__":
    main()
