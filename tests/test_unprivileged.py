"""A new user's first hour, as an ordinary user: not root, in a fresh folder of their own, `HOME`
there, the README's own-data block as written (`aesearch example wine`, `search wine_anomaly`,
`score`, `encode`; the search made small, see tests/readme.py), then `report` and `reproduce`, with
the defaults they would meet (the embedded store `./mlflow.db`, results in `./ray_results`).

Root can write anywhere, so a search run as root (as CI runs) hides a file written in the wrong
place: an earlier aesearch put every artifact under `/` (see aesearch.locations) and every test
passed. Here each command runs under a throwaway uid, and afterwards every file that uid owns must
be in the user's folder or in the system's temp folder: nothing at the filesystem root, nothing in
another user's home. Run by a developer who is not root, the commands run as that developer.
"""

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from tests.readme import commands, marked, shrunk
from tests.searching import run, run_at_once

pytestmark = pytest.mark.slow  # a user's whole session: search, report, reproduce

def shared_temp() -> Path:
    """The temp folder every user may write in: this process's (TMPDIR may name a private one), else /tmp."""
    mine = Path(tempfile.gettempdir())
    return mine if mine.stat().st_mode & 0o1777 == 0o1777 else Path("/tmp")


def throwaway_uid() -> int:
    """A uid no account has, so no file on the machine is its before the test."""
    while True:
        uid = 50000 + secrets.randbelow(10000)
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid


class User:
    """Runs commands as an ordinary user in `folder`. As root: under a throwaway uid (util-linux's
    setpriv), allowed to read and traverse every folder (CAP_DAC_READ_SEARCH, since this checkout's
    Python may live under root's home) but to write only where that uid may: its folder and the
    world-writable temp folders."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.uid = throwaway_uid() if os.getuid() == 0 else os.getuid()
        folder.mkdir(parents=True, exist_ok=True)
        if os.getuid() == 0:
            os.chown(folder, self.uid, self.uid)
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
        self.env = {"PATH": path, "HOME": str(folder), "USER": "newcomer",
                    "LOGNAME": "newcomer", "LANG": "C.UTF-8", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                    "TMPDIR": str(shared_temp()),
                    "RAY_AUTH_MODE": "token"}  # Ray keeps its token in ~/.ray/auth_token: the user's own

    def shell(self, command: str) -> list[str]:
        """A shell command line as the user runs it, `aesearch` the script the environment installs."""
        shell = ["bash", "-c", command]
        if os.getuid() == 0:
            shell = ["setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups",
                     "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", *shell]
        return shell

    def run(self, command: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """A shell command line in the user's folder."""
        done = run(self.shell(command), self.env, timeout, cwd=self.folder)
        assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stderr[-3000:]}"
        return done

    def run_at_once(self, commands: list[str], logs: Path) -> list[subprocess.CompletedProcess]:
        """Independent command lines in the user's folder at the same time (their output in `logs`)."""
        named = {f"command-{i}": command for i, command in enumerate(commands)}  # names of their log files
        done = run_at_once({name: self.shell(command) for name, command in named.items()}, self.env, logs,
                           timeout=300, cwd=self.folder)
        for name, command in named.items():
            assert done[name].returncode == 0, f"{command}: exit {done[name].returncode}\n{done[name].stderr[-3000:]}"
        return [done[name] for name in named]

    def files_elsewhere(self, since: Path) -> list[str]:
        """Every file or folder the user wrote since `since` outside their folder and the temp folder."""
        allowed = (str(self.folder) + os.sep, self.env["TMPDIR"].rstrip(os.sep) + os.sep)
        found = subprocess.run(
            ["find", "/", "-xdev", "(", "-path", "/proc", "-o", "-path", "/sys", ")", "-prune", "-o",
             "-user", str(self.uid), "-newer", str(since), "-print"],
            capture_output=True, text=True, check=False).stdout.splitlines()
        return [path for path in found if not (path + os.sep).startswith(allowed)]

    def processes(self) -> list[int]:
        """The user's processes still alive (none after a command has ended)."""
        return [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _owner(pid) == self.uid
                and int(pid) != os.getpid()] if os.getuid() == 0 else []


def _owner(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


@pytest.fixture
def newcomer(tmp_path):
    """An ordinary user's folder (in a fresh folder under the temp folder, as `mktemp -d` gives one);
    whatever of theirs is left running at the end is stopped, and the test fails on it."""
    user = User(Path(tempfile.mkdtemp(prefix="aesearch-newcomer-", dir=shared_temp())))
    yield user
    left = user.processes()
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(user.folder, ignore_errors=True)
    assert not left, f"processes of the user still running after their commands: {left}"


def test_a_new_user_runs_the_readme_on_their_own_data_in_their_own_folder(newcomer, tmp_path):
    since = tmp_path / "started"
    since.touch()
    folder = newcomer.folder
    lines = commands(marked("sh", "aesearch example wine"))
    assert [line.split()[1] for line in lines] == ["example", "search", "score", "encode"]
    outputs = [newcomer.run(shrunk(line)).stdout for line in lines[:2]]
    assert f"sqlite:///{folder / 'mlflow.db'}" in outputs[1]  # the embedded store, in the user's folder
    # What reads the search, at the same time (each takes seconds of imports): the block's score and
    # encode, the report; then the reproduction, which logs a run of its own.
    newcomer.run_at_once([*lines[2:], "aesearch report wine_anomaly"], tmp_path / "logs")
    assert "REPRODUCED" in newcomer.run("aesearch reproduce wine_anomaly").stdout

    # what the user meets: each in their folder
    rows = len(pd.read_csv(folder / "data" / "wine.csv"))
    assert len(pd.read_csv(folder / "scores.csv")) == rows == len(pd.read_parquet(folder / "codes.parquet"))
    assert (folder / "mlflow.db").is_file() and (folder / "ray_results" / "wine_anomaly").is_dir()
    assert list((folder / "mlartifacts" / "wine_anomaly").glob("*/artifacts/checkpoints/best.pt"))
    assert list((folder / "mlartifacts" / "wine_anomaly").glob("*/artifacts/images/*.png"))
    assert (folder / "reports" / "wine_anomaly" / "index.html").is_file()
    assert list((folder / "runs").glob("reproduce-*"))
    # and nothing anywhere else but the temp folder: not at the filesystem root, not in another home
    assert newcomer.files_elsewhere(since) == []
    assert not newcomer.processes()
