"""A search against a Ray cluster that aesearch did not start, as a new user meets one: clusters
started by cluster/ray_nodes.py on a machine where Ray never ran (an empty TMPDIR, no /tmp/ray
for Ray to find), one with token authentication and one without, and drivers on both settings.

The driver follows the cluster's authentication unless RAY_AUTH_MODE is set in its environment;
a cluster that cannot run the driver's work is one line and exit status 2 before anything is
written; a search whose every trial errored exits 1.
"""

import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO
from tests.searching import run, run_at_once, search_command, tracking_uri, write_space

sys.path.insert(0, str(REPO / "cluster"))
from services import BIN, Service, free_port, write_secret  # noqa: E402

pytestmark = pytest.mark.slow  # Ray clusters started here, with and without tokens


def clean_env(**extra: str) -> dict[str, str]:
    """This machine's environment without any Ray authentication or temp-folder setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH_", "RAY_TMPDIR"))}
    env.update({"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "PYTHONUNBUFFERED": "1", **extra})
    return env


class Nodes:
    """Two Ray nodes (1 CPU each) started by cluster/ray_nodes.py, as a user starts their cluster."""

    def __init__(self, folder: Path, env: dict[str, str]):
        self.fresh_tmp = folder / "tmp"  # the machine's TMPDIR: empty, as where Ray never ran
        self.fresh_tmp.mkdir(parents=True)
        # Ray's socket paths must fit in 107 bytes: a short folder of its own
        self.temp_dir = Path(subprocess.check_output(["mktemp", "-d", "/tmp/aesearch-auth-XXXXXX"], text=True).strip())
        self.address = f"127.0.0.1:{free_port()}"
        log = folder / "ray-nodes.log"
        command = [sys.executable, str(REPO / "cluster" / "ray_nodes.py"), "2", "--port", self.address.split(":")[1],
                   "--dashboard-port", str(free_port()), "--temp-dir", str(self.temp_dir)]
        with open(log, "w") as output:
            process = subprocess.Popen(command, env={**env, "TMPDIR": str(self.fresh_tmp)}, start_new_session=True,
                                       stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
        self.service = Service("ray-nodes", process, log)

    def wait(self) -> None:
        """Until the nodes are up (started by __init__, so that two clusters come up at the same time)."""
        log = self.service.log
        deadline = time.monotonic() + 180
        while "Ray nodes, head at" not in log.read_text():
            if not self.service.alive() or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"cluster/ray_nodes.py did not start its nodes:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        self.service.stop()
        subprocess.run(["rm", "-rf", str(self.temp_dir)], check=False)


@pytest.fixture(scope="module")
def token(tmp_path_factory) -> Path:
    return write_secret(tmp_path_factory.mktemp("token") / "ray_token", secrets.token_hex(32))


@pytest.fixture(scope="module")
def clusters(tmp_path_factory, token):
    """Two clusters, started at the same time: one with Ray's defaults (no RAY_AUTH_MODE on the nodes, so
    no token authentication), one with token authentication."""
    started = {"open": Nodes(tmp_path_factory.mktemp("open-cluster"), clean_env())}
    try:
        started["token"] = Nodes(tmp_path_factory.mktemp("token-cluster"),
                                 clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token)))
        for nodes in started.values():
            nodes.wait()
        yield started
    finally:
        for nodes in started.values():
            nodes.stop()


@pytest.fixture(scope="module")
def open_cluster(clusters):
    return clusters["open"]


@pytest.fixture(scope="module")
def token_cluster(clusters):
    return clusters["token"]


def search_space(folder: Path, trials: int = 2, **space_options) -> Path:
    space = write_space(folder, "first-contact", trials=trials, epochs=1, grace=1)
    for key, value in space_options.items():  # a budget setting of the test's own
        space.write_text(space.read_text().replace("keep_checkpoints: 10", f"keep_checkpoints: 10, {key}: {value}"))
    return space


def search_on(folder: Path, nodes: Nodes, **space_options) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    return search_command(search_space(folder, **space_options), folder / "results", "--address", nodes.address)


def search(folder: Path, nodes: Nodes, env: dict[str, str], **space_options):
    return run(search_on(folder, nodes, **space_options), env, cwd=folder, timeout=400)


PLUGGED_SPACE = """
name: plugged
plugins: [seqparts.conv1d]
data: {name: digits}
base: {model: {architecture: conv1d, conv_channels: [8], latent_dim: 4}, optimizer: {batch_size: 64}}
space: {optimizer.lr: {type: float, low: 0.001, high: 0.01, log: true}}
budget: {num_samples: 2, max_epochs: 1, keep_checkpoints: 10}
resources: {cpu: 1}
max_concurrent: 2
"""


def plugged_search(folder: Path, nodes: Nodes) -> tuple[list[str], dict[str, str]]:
    """A search of the example plug-in's architecture, as a package only the driver can import (its
    PYTHONPATH): the cluster's nodes were started without it, so the trials find it only because the
    search ships it to them."""
    package = folder / "driver_only" / "seqparts"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    shutil.copy(REPO / "examples" / "plugins" / "sequences.py", package / "conv1d.py")
    (folder / "plugged.yaml").write_text(PLUGGED_SPACE)
    command = search_command(folder / "plugged.yaml", folder / "results", "--address", nodes.address)
    return command, {"PYTHONPATH": str(folder / "driver_only")}


@pytest.fixture(scope="module")
def searches(clusters, token, tmp_path_factory):
    """The module's searches that run trials, at the same time (one's start overlaps another's trials):
    name -> (its folder, the finished process). A driver follows each cluster's authentication (a token at
    hand, RAY_AUTH_MODE not set), and a search on the token cluster whose every trial errors."""
    faults = '[{"trial": 1, "epoch": 1}, {"trial": 2, "epoch": 1}]'
    planned = {"open": (clusters["open"], {}), "token": (clusters["token"], {}),
               "errored": (clusters["token"], {"max_failures": 0})}
    folders = {name: tmp_path_factory.mktemp(name) for name in planned}
    commands = {name: search_on(folders[name], nodes, **options) for name, (nodes, options) in planned.items()}
    folders["plugged"] = tmp_path_factory.mktemp("plugged")
    commands["plugged"], plugged_env = plugged_search(folders["plugged"], clusters["open"])
    done = run_at_once(commands, clean_env(RAY_AUTH_TOKEN_PATH=str(token)), tmp_path_factory.mktemp("logs"),
                       timeout=400, besides={"errored": {"AESEARCH_FAULTS": faults}, "plugged": plugged_env},
                       cwd=tmp_path_factory.mktemp("cwd"))
    return {name: (folders[name], finished) for name, finished in done.items()}


def finished_trials(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "results" / "first-contact" / "leaderboard.csv")


def test_ray_nodes_start_where_ray_never_ran_and_write_only_into_their_own_folder(open_cluster):
    assert (open_cluster.temp_dir / "ray" / "ray_current_cluster").read_text() == open_cluster.address
    assert not (open_cluster.fresh_tmp / "ray").exists()  # Ray's default folder neither needed nor made


def test_a_driver_follows_a_cluster_without_authentication(searches, open_cluster):
    # A token is at hand (as on a machine that also uses token clusters), RAY_AUTH_MODE not set.
    folder, done = searches["open"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"aesearch: Ray cluster at {open_cluster.address}, no authentication" in done.stderr
    board = finished_trials(folder)
    assert len(board) == 2 and (board["outcome"] == "completed").all()


def test_a_driver_follows_a_cluster_with_token_authentication(searches, token_cluster, token):
    folder, done = searches["token"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert (f"aesearch: Ray cluster at {token_cluster.address}, token authentication (the token from "
            f"RAY_AUTH_TOKEN_PATH={token})") in done.stderr
    assert token.read_text() not in done.stderr + done.stdout
    board = finished_trials(folder)
    assert len(board) == 2 and (board["outcome"] == "completed").all()


def test_a_search_ships_the_users_plugin_to_nodes_that_cannot_import_it_and_its_winner_reproduces(
        searches, token, tmp_path):
    folder, done = searches["plugged"]
    assert done.returncode == 0, done.stderr[-3000:]
    board = pd.read_csv(folder / "results" / "plugged" / "leaderboard.csv")
    assert len(board) == 2 and (board["outcome"] == "completed").all()
    assert board["node"].nunique() == 2  # one trial on each node, each importing the shipped package
    # Here, as on the driver, the package is on PYTHONPATH: the winner trains again from its MLflow config.
    env = clean_env(RAY_AUTH_TOKEN_PATH=str(token), PYTHONPATH=str(folder / "driver_only"))
    reproduced = run([sys.executable, "-m", "aesearch.cli", "reproduce", "plugged", "--rank", "1", "--tracking-uri",
                      tracking_uri(folder / "results"), "--out", str(tmp_path / "again")], env, cwd=tmp_path,
                     timeout=400)
    assert reproduced.returncode == 0, reproduced.stderr[-3000:]
    again = yaml.safe_load((tmp_path / "again" / "config.yaml").read_text())
    assert again["model"]["architecture"] == "conv1d" and again["plugins"] == ["seqparts.conv1d"]
    # The registered model carries the plug-in: it loads and answers where the package is not installed.
    served = run([sys.executable, "-c", "import mlflow, numpy; model = mlflow.pyfunc.load_model('models:/plugged@champion'); "
                  "print(model.predict(numpy.zeros((3, 1, 8, 8), dtype='float32'))['code'].shape)"],
                 clean_env(MLFLOW_TRACKING_URI=tracking_uri(folder / "results")), cwd=tmp_path, timeout=300)
    assert served.returncode == 0, served.stderr[-3000:]
    assert served.stdout.strip().splitlines()[-1] == "(3, 4)"


def assert_refused_in_one_line(done: subprocess.CompletedProcess, folder: Path, starts: str) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(starts), line
    assert not (folder / "results").exists() and not (folder / "mlflow.db").exists()  # nothing written
    return line


def test_a_driver_set_to_token_on_a_cluster_without_it_is_refused_before_anything_is_written(
        open_cluster, token, tmp_path):
    # The failure a user met: the driver connects, but Ray cancels every trial's actor.
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    started = time.monotonic()
    done = search(tmp_path, open_cluster, env)
    line = assert_refused_in_one_line(
        done, tmp_path, f"aesearch: error: --address {open_cluster.address}: the Ray cluster accepted this driver "
                        "but cannot run its trials")
    assert "RAY_AUTH_MODE=token set here" in line and "unset RAY_AUTH_MODE here" in line
    assert time.monotonic() - started < 60  # the probe answers in seconds (imports included)


def test_a_driver_without_the_clusters_token_is_refused_in_one_line(token_cluster, tmp_path):
    other = write_secret(tmp_path / "other_token", secrets.token_hex(32))
    # another token: the cluster's mode followed; no token, and told not to use one (both at once)
    envs = {"another-token": {"RAY_AUTH_TOKEN_PATH": str(other)}, "disabled": {"RAY_AUTH_MODE": "disabled"}}
    commands = {name: search_on(tmp_path / name, token_cluster) for name in envs}
    for name, done in run_at_once(commands, clean_env(), tmp_path / "logs", timeout=400, besides=envs,
                                  cwd=tmp_path).items():
        assert_refused_in_one_line(
            done, tmp_path / name,
            f"aesearch: error: --address {token_cluster.address}: cannot connect to the Ray cluster")
        assert other.read_text() not in done.stderr


def test_a_search_whose_every_trial_errored_exits_1_with_a_one_line_summary(searches, tmp_path):
    folder, done = searches["errored"]
    assert done.returncode == 1, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("aesearch: error: search 'first-contact': no trial ran to an end (2 errored)"), line
    board = finished_trials(folder)  # the leaderboard is still written: it names each trial's fate
    assert (board["outcome"] == "errored").all() and len(board) == 2
    # So is a report, which lists both trials as not ranked, each with what ended it.
    from aesearch.cli import main

    report = tmp_path / "report"
    assert main(["report", "first-contact", "--tracking-uri", tracking_uri(folder / "results"),
                 "--out", str(report)]) == 0
    unranked = (report / "report.md").read_text().split("Trials not ranked")[1].split("\n#")[0]
    assert unranked.count("errored after 1 attempt") == 2 and "InjectedFault" in unranked
