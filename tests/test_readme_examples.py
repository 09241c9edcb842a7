"""The README's examples work when copied: run from an empty folder, as a user who installed aesearch
runs them (no repository at hand), the shipped spaces and configs are found by name, and the blocks
marked as run by this file do what they say.

A marked `sh` block runs line by line in bash (see tests/readme.py); a marked `python` block runs
as written, in a fresh interpreter. The own-data block (a search of your own table, its scores) runs
as an ordinary user, not root: tests/test_unprivileged.py.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aesearch.cli import main
from aesearch.errors import ConfigError
from aesearch.shipped import CONFIGS, SPACES, resolve
from tests.conftest import REPO
from tests.readme import IN_THE_REPOSITORY, PLACEHOLDERS, code_blocks, commands, marked, run_in
from tests.searching import TOGETHER, Together


def user_shell(home: Path) -> dict[str, str | None]:
    """A user's shell, on top of the tests' Ray environment: the installed `aesearch` on PATH, nothing of
    the repository on the import path, no Ray address (None: left out)."""
    return {"PYTHONPATH": None, "RAY_ADDRESS": None, "HOME": str(home),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture()
def user_env(ray_env, tmp_path):
    return {key: value for key, value in {**ray_env, **user_shell(tmp_path)}.items() if value is not None}


# --- names ----------------------------------------------------------------------------------------


def test_shipped_spaces_and_configs_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"quickstart", "compression", "wine_anomaly", "digits_images"} <= set(SPACES.names())
    assert resolve("quickstart", SPACES) == REPO / "aesearch" / "spaces" / "quickstart.yaml"
    assert main(["validate", "quickstart", "compression", "vae"]) == 0
    # a file of that name in the working folder is read as the file it is
    (tmp_path / "quickstart").write_text("name: mine\nspace: {model.latent_dim: {type: int, low: 2, high: 4}}\n")
    from aesearch.search.space import load_space

    assert load_space("quickstart").name == "mine"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "quickstart.yaml").write_text("")
    assert resolve("sub/quickstart.yaml", SPACES) == Path("sub/quickstart.yaml")  # a path stays a path
    assert resolve("missing.yaml", SPACES) == Path("missing.yaml")  # and its reader says it cannot read it


def test_an_unknown_name_is_one_line_listing_the_shipped_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["search", "quickstrt"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "quickstrt: no such file" in error
    assert all(name in error for name in SPACES.names())
    assert main(["train", "vea"]) == 2
    error = capsys.readouterr().err
    assert all(name in error for name in CONFIGS.names())
    # the old repository path names the shipped space to use instead
    with pytest.raises(ConfigError, match=r"search_spaces/quickstart.yaml: cannot read.*: quickstart\)$"):
        resolve("search_spaces/quickstart.yaml", SPACES)


def test_example_list_names_every_shipped_file_and_dataset_with_what_it_is(capsys):
    assert main(["example", "--list"]) == 0
    listed = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines() if line.startswith("  "))
    assert set(listed) == {*SPACES.names(), *CONFIGS.names(), "wine", "digits-images"}
    assert listed["quickstart"].startswith("Quickstart: every autoencoder family")
    assert all(len(line) > 20 for line in listed.values())


def test_every_search_and_train_in_the_readme_names_what_an_empty_folder_finds(tmp_path, monkeypatch):
    """`aesearch search X` / `train X` / load_space("X") in any block of the README or the docs: a shipped
    name, a file the reader is shown writing (not `compression.yaml`, never shown; not search_spaces/...),
    or an example of the repository run from its root."""
    monkeypatch.chdir(tmp_path)
    named = []
    for _, text in code_blocks():
        for line in text.splitlines():
            for verb, registry in (("search", SPACES), ("train", CONFIGS)):
                named += [(m[1], registry) for m in re.finditer(rf"aesearch {verb} (\S+)", line)]
            named += [(m[1], SPACES) for m in re.finditer(r"load_space\(\"([^\"]+)\"", line)]
            named += [(m[1], CONFIGS) for m in re.finditer(r"load_config\(\"([^\"]+)\"", line)]
    assert len(named) >= 10
    for argument, registry in named:
        if argument in IN_THE_REPOSITORY:
            assert (REPO / argument).is_file(), f"{argument}: not in the repository"
        elif argument not in PLACEHOLDERS:
            assert resolve(argument, registry).is_file(), f"{argument}: not found from an empty folder"


# --- the marked blocks, run ---------------------------------------------------------------------------


def test_readme_shipped_files_block_runs_as_written(tmp_path, user_env):
    block = marked("sh", "aesearch example --list")
    outputs = [run_in(tmp_path, command, user_env).stdout for command in commands(block)]
    assert "quickstart" in outputs[0] and "wine" in outputs[0]
    assert (tmp_path / "mine.yaml").read_text() == SPACES["quickstart"].read_text()
    assert outputs[-1].count(": ok (") == 2


# What the block made, printed after it runs: it must search, report, reproduce, train and load alike.
SEEN = """
import json, torch
x = torch.rand(2, 1, 8, 8)
print(json.dumps({"trials": len(board), "states": board["state"].tolist(), "board_run": board.iloc[0]["mlflow_run_id"],
                  "report_best": report.board.iloc[0]["run_id"], "reproduced": check.reproduced,
                  "epochs": len(result.history), "reconstructed": list(trained.model(x).x_hat.shape),
                  "same_weights": all(torch.equal(a, b) for a, b in zip(trained.model.state_dict().values(),
                                                                        result.model.state_dict().values())),
                  "shown": [repr(report), report._repr_html_(), repr(check), check._repr_html_()]}))
"""


def python_example(folder: Path, address: str) -> Together:
    """The README's Python block, run in an empty folder (HOME there) on the Ray instance the tests share,
    as a notebook beside a running Ray finds it: through RAY_ADDRESS."""
    code = marked("python", "aesearch.load_space(")
    return Together([sys.executable, "-c", code + SEEN], {**user_shell(folder), "RAY_ADDRESS": address}, folder)


TOGETHER["readme-python"] = python_example  # run with other modules' searches


def test_readme_python_example_runs_as_written_from_an_empty_folder(together):
    """The notebook's path through the API alone."""
    folder, done = together["readme-python"]
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["trials"] == 4 and seen["states"][0] in ("completed", "stopped")
    assert seen["report_best"] == seen["board_run"]  # the report ranks as the search did
    assert seen["reproduced"] is True, seen
    assert seen["epochs"] == 3 and seen["reconstructed"] == [2, 1, 8, 8] and seen["same_weights"]
    # What a notebook shows of them: a line or a short page each, not the figures' bytes.
    report_line, report_page, check_line, check_page = seen["shown"]
    assert report_line.startswith("<Report of notebook: 4 trials") and len(report_line) < 400, report_line
    assert seen["board_run"] in report_page and report_page.count("<tr") >= 2 and len(report_page) < 20_000
    assert check_line.startswith("<Reproduction of trial ") and "REPRODUCED: every value" in check_line, check_line
    assert "<table" in check_page and "REPRODUCED" in check_page and len(check_page) < 20_000
    assert (folder / "reports" / "notebook" / "index.html").is_file()
    assert (folder / "runs" / "vae" / "best.pt").is_file()
    assert (folder / "ray_results" / "notebook" / "leaderboard.csv").is_file()  # the command line's default storage


def test_an_installed_wheel_finds_its_shipped_files_by_name(tmp_path):
    """As a user's `pip install aesearch` would: the wheel, unpacked first on the import path, from an
    empty folder."""
    uv = shutil.which("uv") or str(REPO / ".tools" / "bin" / "uv")
    built = subprocess.run([uv, "build", "--wheel", "--offline", "-o", str(tmp_path / "dist"), str(REPO)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("aesearch-*.whl")
    shutil.unpack_archive(wheel, tmp_path / "site", format="zip")
    (tmp_path / "empty").mkdir()
    code = ("import aesearch, aesearch.shipped as s; print(s.__file__); "
            "print(aesearch.load_space('quickstart').name, aesearch.load_config('vae').name)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "empty", capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(tmp_path / "site" / "aesearch" / "shipped.py"), "quickstart", "vae"]
