"""Helpers for tests that run searches: a small search space, the commands, their outputs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from aesearch.locations import sqlite_uri
from tests.conftest import KEPT_CHECKPOINTS, REPO

SEARCH_SPACE = """
name: {name}
data: {{name: digits}}
base:
  model: {{hidden_dims: [32]}}
  optimizer: {{batch_size: 64}}
  evaluation: {{iwae_samples: 5, kmeans_restarts: 1}}
space:
  model.latent: {{type: categorical, choices: [deterministic, gaussian]}}
  model.latent_dim: {{type: categorical, choices: [4, 16]}}
  objective.kl.beta: {{type: float, low: 0.5, high: 4, log: true, when: {{model.latent: gaussian}}}}
  optimizer.lr: {{type: float, low: 0.00001, high: 1.0, log: true}}
objective: {{metric: val/recon_mse, mode: min}}
budget: {{num_samples: {trials}, max_epochs: {epochs}, grace_period: {grace}, reduction_factor: 2, keep_checkpoints: {keep}}}
resources: {{cpu: 1}}
max_concurrent: 2
seed: 0
{extra}
"""
# A VAE at this learning rate turns NaN in its first epoch (a diverged trial).
DIVERGING_START = "start_with: [{model.latent: gaussian, model.latent_dim: 16, optimizer.lr: 1.0}]"


def write_space(folder: Path, name: str, trials: int, epochs: int, grace: int, extra: str = "", keep: int = 10) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(SEARCH_SPACE.format(name=name, trials=trials, epochs=epochs, grace=grace, extra=extra, keep=keep))
    return path


def tracking_uri(storage: Path) -> str:
    """The embedded MLflow store of a test's search: beside its storage folder, never in the repo."""
    return sqlite_uri(storage.parent / "mlflow.db")


def search_command(space: Path, storage: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "aesearch.cli", "search", str(space), "--storage", str(storage),
            "--tracking-uri", tracking_uri(storage), *extra]


def uv_run_command(space: Path, storage: Path, *extra: str) -> list[str]:
    """The search as `make quickstart` runs it: under `uv run` (which Ray treats specially)."""
    uv = shutil.which("uv") or str(REPO / ".tools" / "bin" / "uv")
    return [uv, "run", "--no-sync", "aesearch", "search", str(space), "--storage", str(storage),
            "--tracking-uri", tracking_uri(storage), *extra]


def run(command: list[str], env: dict, timeout: float = 300, **options) -> subprocess.CompletedProcess:
    """Run a command in a process group of its own; on timeout, stop the whole group."""
    process = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(command[:4])} ... did not finish in {timeout} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_at_once(commands: dict[str, list[str]], env: dict, logs: Path, timeout: float = 600,
                besides: dict[str, dict[str, str]] | None = None, cwds: dict[str, Path] | None = None,
                at_most: int | None = None, **options) -> dict[str, subprocess.CompletedProcess]:
    """Run independent commands at the same time (each in a process group of its own, its output in files
    under `logs`, never in a pipe that could fill); name -> its finished process. `besides`: name -> the
    variables that command has on top of `env`; `cwds`: name -> the folder it runs in; `at_most`: how many
    run at a time (the next starts as one ends). On timeout, every group still running is stopped."""
    logs.mkdir(parents=True, exist_ok=True)
    waiting, started = list(commands), {}
    deadline = time.monotonic() + timeout
    try:
        while waiting or any(process.poll() is None for process in started.values()):
            running = sum(process.poll() is None for process in started.values())
            for name in waiting[:max(0, (at_most or len(commands)) - running)]:
                waiting.remove(name)
                where = {"cwd": cwds[name]} if cwds and name in cwds else {}
                with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
                    started[name] = subprocess.Popen(commands[name], env={**env, **(besides or {}).get(name, {})},
                                                     start_new_session=True, stdout=out, stderr=err, text=True,
                                                     **options, **where)
            if time.monotonic() > deadline:
                late = [name for name, process in started.items() if process.poll() is None] + waiting
                pytest.fail(f"{late[0]}: {' '.join(commands[late[0]][:4])} ... did not finish in {timeout} s:\n"
                            f"{(logs / f'{late[0]}.err').read_text()[-3000:] if late[0] in started else ''}")
            time.sleep(0.2)
    finally:
        for process in started.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return {name: subprocess.CompletedProcess(commands[name], process.returncode, (logs / f"{name}.out").read_text(),
                                              (logs / f"{name}.err").read_text())
            for name, process in started.items()}


def trial_reports(experiment: Path) -> dict[str, list[dict]]:
    """Every trial's reports, from the JSON log Tune writes in each trial folder."""
    reports = {}
    for log in experiment.glob("*/result.json"):
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        if lines:
            reports[lines[0]["trial_id"]] = lines
    return reports


@dataclass
class Together:
    """A command run with the others in TOGETHER: in `cwd`, its environment the tests' Ray environment
    with `env` on top (a variable set to None is left out)."""

    command: list[str]
    env: dict[str, str | None] = field(default_factory=dict)
    cwd: Path = REPO


# Commands of several test modules that only need to run, then be read (searches, mostly): name -> a
# function of (its own folder, the address of the Ray instance the tests share) that writes what it
# needs there and gives its Together. Each module adds its own as it is collected; the first test that
# asks for one (the `together` fixture) runs them all, AT_ONCE at a time, so that one's fixed costs
# (imports, connecting to Ray, each trial worker's imports) overlap the others' trials. More at once
# only queue their trials for the shared instance's CPUs, their drivers spending CPU while they wait.
TOGETHER: dict[str, Callable[[Path, str], Together]] = {}
AT_ONCE = 4


def on_shared_ray(write: Callable[[Path], Path], *extra: str, env: dict[str, str] | None = None):
    """The search of the space `write(folder)` writes, its storage and embedded store in that folder, run
    with `extra` options on the Ray instance the tests share."""
    return lambda folder, address: Together(
        search_command(write(folder), folder / "results", *extra, "--address", address), env or {})


def run_together(folders: Callable[[str], Path], env: dict, address: str,
                 logs: Path) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Every command in TOGETHER, AT_ONCE at a time: name -> (its folder, its finished process)."""
    where = {name: folders(name) for name in TOGETHER}
    started = {name: make(where[name], address) for name, make in TOGETHER.items()}
    envs = {name: {key: value for key, value in {**env, **s.env}.items() if value is not None}
            for name, s in started.items()}
    done = run_at_once({name: s.command for name, s in started.items()}, {}, logs, timeout=900, besides=envs,
                       cwds={name: s.cwd for name, s in started.items()}, at_most=AT_ONCE)
    return {name: (where[name], finished) for name, finished in done.items()}


def quickstart_search(folder: Path, address: str) -> Together:
    """The small search several modules read (conftest's `small_search`), run as `make quickstart` runs
    it: under `uv run`, on a local Ray instance of its own (not the shared one)."""
    space = write_space(folder, "small", trials=8, epochs=3, grace=1, extra=DIVERGING_START, keep=KEPT_CHECKPOINTS)
    return Together(uv_run_command(space, folder / "results"))


TOGETHER["small"] = quickstart_search


def wait_until(condition, what: str, process: subprocess.Popen | None = None, timeout: float = 240, every: float = 0.5):
    """Poll `condition` until it returns something true (which is returned); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(every)
    status = f" (search exit status: {process.poll()})" if process is not None else ""
    pytest.fail(f"{what} did not happen within {timeout} s{status}")
