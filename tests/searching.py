"""Helpers for tests that run searches: a small search space, the commands, their outputs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aesearch.locations import sqlite_uri
from tests.conftest import REPO

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
                besides: dict[str, dict[str, str]] | None = None, **options) -> dict[str, subprocess.CompletedProcess]:
    """Run independent commands at the same time (each in a process group of its own, its output in files
    under `logs`, never in a pipe that could fill); name -> its finished process. `besides`: name -> the
    variables that command has on top of `env`. On timeout, every group still running is stopped."""
    logs.mkdir(parents=True, exist_ok=True)
    started = {}
    for name, command in commands.items():
        with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
            started[name] = subprocess.Popen(command, env={**env, **(besides or {}).get(name, {})},
                                             start_new_session=True, stdout=out, stderr=err, text=True, **options)
    deadline = time.monotonic() + timeout
    try:
        for name, process in started.items():
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name}: {' '.join(commands[name][:4])} ... did not finish in {timeout} s:\n"
                            f"{(logs / f'{name}.err').read_text()[-3000:]}")
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


def run_searches_at_once(spaces: dict[str, Path], folders: dict[str, Path], env: dict, address: str,
                     logs: Path) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Searches of their own (each its space, its storage under its folder, its embedded store) run at
    the same time on the Ray instance at `address`, so that one's start overlaps another's trials:
    name -> (its folder, its finished process)."""
    commands = {name: search_command(space, folders[name] / "results", "--address", address)
                for name, space in spaces.items()}
    done = run_at_once(commands, env, logs, timeout=600, cwd=REPO)
    return {name: (folders[name], finished) for name, finished in done.items()}


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
