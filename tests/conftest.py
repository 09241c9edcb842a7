"""Shared fixtures: real datasets (scikit-learn's digits; MNIST copied from ../shared/datasets), the
environment of Ray processes, one Ray instance that most searches share, and one small search that
several test modules read."""

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from aesearch import settings
from aesearch.config import parse_config
from aesearch.parts.data import load_data

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "aesearch" / "configs").glob("*.yaml"))  # the shipped configs
# The offline copies of MNIST and Fashion-MNIST (torchvision's layout) that CI has beside the
# clone. The project never needs them at run time; tests copy them into a temporary data dir.
SHARED_DATASETS = Path(os.environ.get("AESEARCH_TEST_DATASETS", REPO.parent / "shared" / "datasets"))

KEPT_CHECKPOINTS = 5  # the small search keeps the checkpoints of its best 5 trials (of 8)

settings.apply()  # as the entry points do, for the tests that call the search's parts directly
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def make_config(**sections):
    """A validated config from keyword sections, e.g. make_config(model={'latent': 'gaussian'})."""
    return parse_config(sections)


@pytest.fixture(scope="session")
def digits():
    return load_data(make_config().data)


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    """A writable data directory holding the original MNIST .gz files (md5 as torchvision expects)."""
    source = SHARED_DATASETS / "MNIST" / "raw"
    if not source.is_dir():
        raise FileNotFoundError(
            f"MNIST files expected under {source} (set AESEARCH_TEST_DATASETS to the folder that has MNIST/raw)"
        )
    root = tmp_path_factory.mktemp("datasets")
    shutil.copytree(source, root / "MNIST" / "raw")
    return root


# Every Ray instance and search the tests start runs in ray_env (the tests' own token); servers are started by
# the modules that mark themselves `slow`.
SLOW_FIXTURES = {"ray_env"}


def pytest_collection_modifyitems(items):
    """`slow` on every test that needs a Ray instance: `make test-fast` runs the others in a couple of minutes."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_env(tmp_path_factory):
    """The environment of every Ray process here: our own token, loopback addresses."""
    folder = tmp_path_factory.mktemp("ray")
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    return {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "PYTHONUNBUFFERED": "1",
    }


class RayInstance:
    """One Ray instance on 127.0.0.1 (`ray start --head`, token authentication, this machine's CPUs) for the
    tests whose searches need *a* Ray cluster, not a fresh one: given as `--address`, it spares each of them
    the start of a local instance (seconds of CPU on 2 cores). The tests of that start (`small_search`, as
    `make quickstart` runs it; a trial bigger than the machine) still start their own.

    Started when first asked for; every port it listens on is a free one, none of Ray's defaults (a head
    node started meanwhile, as cluster/rehearsal.py's, takes those), and it writes only into its own temp
    folder. Stopped through its own process group at the end of the session, and before a test that needs
    this machine to have no other Ray (`ray job submit`'s driver takes any Ray it finds here for its own
    cluster); asked for again, it starts again."""

    def __init__(self, env: dict[str, str], tmp_path_factory):
        sys.path.insert(0, str(REPO / "cluster"))
        from services import BIN, Service, free_port

        self.env, self.tmp_path_factory = env, tmp_path_factory
        self.ray, self.service_type, self.free_port = BIN / "ray", Service, free_port
        self.service = self.temp_dir = self.gcs_address = None

    def address(self) -> str:
        if self.service is None:
            self.start()
        return self.gcs_address

    def start(self) -> None:
        folder = self.tmp_path_factory.mktemp("ray-instance")
        self.temp_dir = Path(tempfile.mkdtemp(prefix="aesearch-rt-"))  # Ray's socket paths must fit in 107 bytes
        port = self.free_port()
        ports = (f"--{name}-port={self.free_port()}" for name in (
            "dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent", "metrics-export",
            "ray-client-server"))
        command = [str(self.ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                   f"--num-cpus={os.cpu_count() or 1}", "--include-dashboard=false", "--disable-usage-stats",
                   f"--temp-dir={self.temp_dir}", *ports]
        log = folder / "ray-start.log"
        with open(log, "w") as output:
            process = subprocess.Popen(command, env={**self.env, "RAY_TMPDIR": str(self.temp_dir)}, cwd=folder,
                                       start_new_session=True, stdin=subprocess.DEVNULL, stdout=output,
                                       stderr=subprocess.STDOUT)
        self.service = self.service_type("ray-instance", process, log)
        deadline = time.monotonic() + 180
        while "will now block forever" not in log.read_text():
            if not self.service.alive() or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"ray start did not start its node:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        self.gcs_address = f"127.0.0.1:{port}"

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.service = self.temp_dir = self.gcs_address = None


@pytest.fixture(scope="session")
def ray_instance(ray_env, tmp_path_factory):
    instance = RayInstance(ray_env, tmp_path_factory)
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def ray_address(ray_instance) -> str:
    """HOST:PORT of the Ray instance the tests share (see RayInstance)."""
    return ray_instance.address()


@pytest.fixture(scope="session")
def together(tmp_path_factory, ray_env, ray_instance):
    """Every command in tests.searching.TOGETHER (the searches several modules only read), a few at a
    time: name -> (its folder, its finished process)."""
    from tests.searching import run_together

    return run_together(tmp_path_factory.mktemp, ray_env, ray_instance.address(),
                        tmp_path_factory.mktemp("together-logs"))


@pytest.fixture(scope="session")
def small_search(together):
    """One small search (8 trials: completed, stopped early, diverged; checkpoints kept for the best 5)
    run as `make quickstart` runs it, logged to an embedded MLflow store: (experiment folder, the
    finished process)."""
    folder, done = together["small"]
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "results" / "small", done
