"""Shared fixtures: real datasets (scikit-learn's digits; MNIST copied from ../shared/datasets), the
environment of Ray processes, and one small search that several test modules read."""

import os
import secrets
import shutil
from pathlib import Path

import pytest
import torch

from aesearch import settings
from aesearch.config import parse_config
from aesearch.parts.data import load_data

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
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


@pytest.fixture(scope="session")
def small_search(tmp_path_factory, ray_env):
    """One small search (8 trials: completed, stopped early, diverged; checkpoints kept for the best 5)
    run as `make quickstart` runs it, logged to an embedded MLflow store: (experiment folder, the
    finished process)."""
    from tests.searching import DIVERGING_START, run, uv_run_command, write_space

    folder = tmp_path_factory.mktemp("search")
    space = write_space(folder, "small", trials=8, epochs=3, grace=1, extra=DIVERGING_START, keep=KEPT_CHECKPOINTS)
    done = run(uv_run_command(space, folder / "results"), ray_env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "results" / "small", done
