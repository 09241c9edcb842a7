"""The user's own parts (`plugins:`), as a user runs them: the command line in a process of its own
(a plug-in registers into aesearch's registries for the rest of the process), from a folder that is
not the plug-in's."""

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.searching import TOGETHER, on_shared_ray, run, trial_reports

pytestmark = pytest.mark.slow  # each test runs aesearch in a process of its own, as a user does

EXAMPLE = REPO / "examples" / "plugins"
PENALTY = '''
import torch
from aesearch.parts.objectives import SPARSITY_PENALTIES


@SPARSITY_PENALTIES.register("log")
def log_sparsity(code, rho, units=None):
    """sum_j log(1 + h_j^2) per sample, averaged over the batch."""
    penalty = torch.log1p(code.pow(2))
    return (penalty if units is None else penalty * units).sum(1).mean()
'''


def aesearch(*arguments: str, cwd: Path, env: dict | None = None) -> "subprocess.CompletedProcess":  # noqa: F821
    return run([sys.executable, "-m", "aesearch.cli", *arguments], {**os.environ, **(env or {})}, cwd=cwd, timeout=300)


def test_a_config_trains_a_part_of_the_users_own_named_relative_to_the_config(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "my_penalty.py").write_text(PENALTY)
    (tmp_path / "parts" / "sparse.yaml").write_text(
        "name: sparse-log\nplugins: [my_penalty.py]\nepochs: 2\ndata: {name: digits}\n"
        "model: {hidden_dims: [32], latent_dim: 8}\nobjective: {sparsity: {kind: log, weight: 0.01}}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = aesearch("train", str(tmp_path / "parts" / "sparse.yaml"), "--out", str(elsewhere / "run"), cwd=elsewhere)
    assert done.returncode == 0, done.stderr[-2000:]
    epochs = [json.loads(line) for line in (elsewhere / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 2 and all(epoch["train/sparsity"] > 0 for epoch in epochs)  # the plug-in's term
    saved = yaml.safe_load((elsewhere / "run" / "config.yaml").read_text())
    assert saved["plugins"] == [str(tmp_path / "parts" / "my_penalty.py")]  # absolute: readable from anywhere
    # The checkpoint names its plug-in: a new process, from another folder, evaluates it.
    evaluated = aesearch("evaluate", str(elsewhere / "run" / "best.pt"), cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads(evaluated.stdout)["epoch"] >= 1


def test_the_example_plugin_trains_its_architecture_on_images_read_as_sequences(tmp_path):
    config = tmp_path / "conv1d.yaml"
    config.write_text(f"name: conv1d\nplugins: [{EXAMPLE / 'sequences.py'}]\nepochs: 2\ndata: {{name: digits}}\n"
                      "model: {architecture: conv1d, conv_channels: [8, 16], latent_dim: 8}\n")
    done = aesearch("train", str(config), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "best.pt").is_file()


@pytest.mark.parametrize(("plugin", "source", "message"), [
    ("missing.py", None, r"plugins: missing\.py: no such file \(.*/missing\.py\)$"),
    ("broken.py", "import torch\nraise RuntimeError('the weights are not here')\n",
     r"plugins: broken\.py: does not import: RuntimeError: the weights are not here$"),
    ("taken.py", "from aesearch.parts.models import ARCHITECTURES, Architecture\n"
                 "ARCHITECTURES.add('dense', ARCHITECTURES['dense'])\n",
     r"plugins: taken\.py: architecture 'dense' is registered twice: choose another name$"),
    ("no_such_package.parts", None,
     r"plugins: no_such_package\.parts: no module 'no_such_package\.parts' can be imported here"),
])
def test_a_plugin_that_cannot_be_used_is_one_line_and_exit_2_before_anything_is_written(tmp_path, plugin, source,
                                                                                      message):
    if source is not None:
        (tmp_path / plugin).write_text(source)
    space = tmp_path / "space.yaml"
    space.write_text(f"name: plugged\nplugins: [{plugin}]\n"
                     "space: {model.latent_dim: {type: categorical, choices: [4, 8]}}\n")
    done = aesearch("search", str(space), "--storage", str(tmp_path / "results"), "--tracking-uri",
                    f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    import re

    assert re.search(message, lines[0].removeprefix("aesearch: error: ")), lines[0]
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()


def test_an_entry_is_a_file_relative_to_its_document_or_a_module_and_ships_as_one(tmp_path):
    import aesearch
    from aesearch.plugins import Plugin, absolute_entries, plugin, shipped_modules

    mine = (tmp_path / "parts" / "mine.py").resolve()
    assert plugin("parts/mine.py", tmp_path) == Plugin("parts/mine.py", "mine", mine)
    assert plugin("my_package.parts", tmp_path) == Plugin("my_package.parts", "my_package.parts", None)
    assert absolute_entries({"plugins": ["parts/mine.py", "my_package.parts"]}, tmp_path)["plugins"] == [
        str(mine), "my_package.parts"]
    mine.parent.mkdir()
    mine.write_text("")
    # a file ships as itself; a module of a package, as the package's top folder
    assert shipped_modules([plugin("parts/mine.py", tmp_path), plugin("aesearch.parts.models", tmp_path)]) == [
        str(mine), str(Path(aesearch.__file__).parent)]


PACKED_PLUGGED = """
name: packed-plugged
plugins: [my_penalty.py]
data: {name: digits}
base:
  model: {hidden_dims: [32], latent_dim: 8}
  objective: {sparsity: {kind: log, weight: 0.01}}
  optimizer: {batch_size: 64}
  evaluation: {iwae_samples: 5, kmeans_restarts: 1}
space:
  objective.sparsity.weight: {type: float, low: 0.001, high: 0.1, log: true}
  optimizer.lr: {type: float, low: 0.001, high: 0.01, log: true}
objective: {metric: val/recon_mse, mode: min}
budget: {num_samples: 4, max_epochs: 2, grace_period: 2}
resources: {cpu: 1}
seed: 0
"""


def packed_plugged_space(folder: Path) -> Path:
    (folder / "my_penalty.py").write_text(PENALTY)
    space = folder / "packed-plugged.yaml"
    space.write_text(PACKED_PLUGGED)
    return space


TOGETHER["packed-plugged"] = on_shared_ray(packed_plugged_space, "--pack", "4")  # with other modules' searches


def test_a_packed_search_trains_the_users_own_loss_term_in_its_pack_servers(together):
    """The plug-in reaches the pack servers too: its term is trained there, fused across the members."""
    folder, done = together["packed-plugged"]
    assert done.returncode == 0, done.stderr[-3000:]
    reports = trial_reports(folder / "results" / "packed-plugged")
    assert len(reports) == 4
    last = [lines[-1] for lines in reports.values()]
    assert all(report["epoch"] == 2 and report["train/sparsity"] > 0 for report in last)  # the plug-in's term
    assert any(report.get("pack/members", 0) >= 2 for lines in reports.values() for report in lines), \
        "no epoch was trained fused with another trial"
