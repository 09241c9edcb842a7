"""Local paths and URIs (aesearch.locations), and the embedded store's artifacts: exactly beside it."""

import os
from pathlib import Path

import pytest

from aesearch.errors import UserError
from aesearch.locations import absolute, file_uri, local_or_uri, local_path, misplaced_artifacts, sqlite_uri
from aesearch.tracking.store import embedded_artifacts, misplaced_artifacts_note, resolve_tracking_uri

ODD_NAMES = ["plain", "with space", "ünïcödé 数据", "hash#and&amp"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A home folder of our own, so `~` paths land in the test's folder."""
    folder = tmp_path / "home"
    folder.mkdir()
    monkeypatch.setenv("HOME", str(folder))
    return folder


@pytest.mark.parametrize("name", ODD_NAMES)
def test_absolute_relative_and_home_paths_name_the_same_file(tmp_path, home, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    assert absolute(f"{name}/x.db") == tmp_path / name / "x.db"
    assert absolute(f"~/{name}/x.db") == home / name / "x.db"
    assert absolute(tmp_path / name / ".." / name / "x.db") == tmp_path / name / "x.db"
    assert local_path(file_uri(f"~/{name}")) == home / name
    assert local_path(sqlite_uri(f"{name}/x.db")) == tmp_path / name / "x.db"
    assert local_path(f"{name}/x.db") == tmp_path / name / "x.db"  # a plain path


@pytest.mark.parametrize("name", ODD_NAMES)
def test_the_embedded_store_keeps_its_artifacts_beside_it(tmp_path, monkeypatch, name):
    """The bug: `sqlite:////abs/mlflow.db` gave `file:////abs/mlartifacts/...`, which MLflow reads as
    host `abs` and writes under `/` without the first folder."""
    folder = tmp_path / name
    folder.mkdir()
    monkeypatch.chdir(folder)
    uri = resolve_tracking_uri(None)
    assert uri == f"sqlite:///{folder / 'mlflow.db'}"
    location = embedded_artifacts(uri, "search-1")
    assert location.startswith("file:///") and not location.startswith("file:////")
    assert local_path(location) == folder / "mlartifacts" / "search-1"
    assert misplaced_artifacts(location) is None


def test_mlflow_writes_the_artifacts_where_aesearch_says(tmp_path, monkeypatch):
    """A real MLflow store in a folder with a space and non-ASCII letters: the artifact is in that
    folder's mlartifacts/, and nowhere else."""
    from mlflow import MlflowClient

    folder = tmp_path / "my project ü"
    folder.mkdir()
    monkeypatch.chdir(folder)
    uri = resolve_tracking_uri(None)
    store = MlflowClient(uri)
    experiment = store.create_experiment("demo", artifact_location=embedded_artifacts(uri, "demo"))
    run = store.create_run(experiment)
    note = tmp_path / "note.txt"
    note.write_text("hello")
    store.log_artifact(run.info.run_id, str(note))
    written = [p for p in tmp_path.rglob("note.txt") if p != note]
    assert written == [folder / "mlartifacts" / "demo" / run.info.run_id / "artifacts" / "note.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my project ü", "note.txt"]  # no stray folder


def test_a_relative_or_home_store_is_made_absolute(tmp_path, home, monkeypatch):
    """Trials may run in another working directory: the store they log to is named absolutely."""
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///runs/m.db") == f"sqlite:///{tmp_path / 'runs' / 'm.db'}"
    assert resolve_tracking_uri("sqlite:///~/m.db") == f"sqlite:///{home / 'm.db'}"
    assert resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert local_or_uri("~/results") == str(home / "results")
    assert local_or_uri("s3://bucket/searches") == "s3://bucket/searches"


def test_a_store_path_mlflow_and_sqlalchemy_would_read_differently_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "a%41b"
    folder.mkdir()
    monkeypatch.chdir(folder)
    with pytest.raises(UserError, match=r"a%41b/mlflow.db: a SQLite tracking store's path may not contain"):
        resolve_tracking_uri(None)
    assert os.listdir(folder) == []


def test_misplaced_artifacts_are_found_where_mlflow_put_them(tmp_path):
    """Experiments written before the fix: their location, and their runs' (as MLflow rewrote them)."""
    assert misplaced_artifacts("file:////home/alice/proj/mlartifacts/e") == (
        Path("/alice/proj/mlartifacts/e"), Path("/home/alice/proj/mlartifacts/e"))
    assert misplaced_artifacts("file://home/alice/my%20proj/mlartifacts/e/run/artifacts") == (
        Path("/alice/my proj/mlartifacts/e/run/artifacts"), Path("/home/alice/my proj/mlartifacts/e/run/artifacts"))
    assert misplaced_artifacts("file:///home/alice/proj/mlartifacts/e") is None
    assert misplaced_artifacts("mlflow-artifacts:/1/abc") is None


def test_a_misplaced_experiment_is_named_in_one_line(tmp_path):
    from mlflow import MlflowClient

    store = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    broken = "file:/" + file_uri(tmp_path / "mlartifacts" / "old")[len("file:"):]  # file:////tmp/...: the old bug
    experiment = store.get_experiment(store.create_experiment("old", artifact_location=broken))
    note = misplaced_artifacts_note(experiment)
    real = Path("/", *(tmp_path / "mlartifacts" / "old").parts[2:])
    assert "\n" not in note and str(real) in note and "aesearch relocate old" in note
    assert misplaced_artifacts_note(store.get_experiment(store.create_experiment(
        "new", artifact_location=file_uri(tmp_path / "mlartifacts" / "new")))) is None


@pytest.fixture
def old_layout():
    """A store at /tmp/tmp/NAME/proj, so that the artifacts an earlier aesearch misplaced (its path less
    the first folder) land in /tmp/NAME/proj, not at the filesystem root. Both removed afterwards."""
    import secrets
    import shutil

    name = f"aesearch-relocate-{secrets.token_hex(4)}"
    project, misplaced = Path("/tmp/tmp") / name / "proj", Path("/tmp") / name
    project.mkdir(parents=True)
    yield project, misplaced / "proj"
    shutil.rmtree(project.parent, ignore_errors=True)
    shutil.rmtree(misplaced, ignore_errors=True)


def test_relocate_moves_misplaced_artifacts_beside_the_store(old_layout, capsys):
    """An experiment written with the old location: MLflow put its artifacts under / less a folder;
    `aesearch relocate` moves them beside the store, and MLflow finds them there afterwards."""
    from mlflow import MlflowClient

    from aesearch.cli import main
    from aesearch.results.read import read_trials

    project, misplaced = old_layout
    uri = f"sqlite:///{project / 'mlflow.db'}"
    store = MlflowClient(uri)
    old_location = "file:///" + file_uri(project / "mlartifacts" / "old").removeprefix("file://")  # file:////...
    experiment = store.create_experiment("old", artifact_location=old_location)
    run = store.create_run(experiment, tags={"aesearch.role": "trial"})
    note = project / "note.txt"
    note.write_text("kept")
    store.log_artifact(run.info.run_id, str(note), "checkpoints")
    assert (misplaced / "mlartifacts" / "old" / run.info.run_id / "artifacts" / "checkpoints" / "note.txt").exists()

    read_trials(uri, "old")  # the report, reproduce and score read through this: they say where
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and f"they are in {misplaced / 'mlartifacts' / 'old'}" in said[0]

    assert main(["relocate", "old", "--tracking-uri", uri]) == 0
    assert f"moved {misplaced / 'mlartifacts' / 'old'} to {project / 'mlartifacts' / 'old'}" in capsys.readouterr().err
    assert not (misplaced / "mlartifacts" / "old").exists()
    store = MlflowClient(uri)
    assert store.get_experiment(experiment).artifact_location == file_uri(project / "mlartifacts" / "old")
    assert local_path(store.get_run(run.info.run_id).info.artifact_uri) == (
        project / "mlartifacts" / "old" / run.info.run_id / "artifacts")
    fetched = store.download_artifacts(run.info.run_id, "checkpoints/note.txt", str(project))
    assert Path(fetched).read_text() == "kept"
    read_trials(uri, "old")
    assert capsys.readouterr().err == ""  # nothing misplaced any more
    assert main(["relocate", "old", "--tracking-uri", uri]) == 2  # nothing to relocate: one line
    assert "nothing to relocate" in capsys.readouterr().err


def test_resuming_a_search_with_misplaced_artifacts_is_refused_until_relocated(old_layout, tmp_path, capsys):
    """Its new trials would add to the misplaced folder (or fail to write there): one line, before Ray
    starts, naming the command that puts things right."""
    from mlflow import MlflowClient

    from aesearch.cli import main
    from aesearch.search.driver import space_document
    from aesearch.search.space import load_space
    from aesearch.search.storage import TRACKING_FILE
    from tests.searching import write_space

    project, misplaced = old_layout
    uri = f"sqlite:///{project / 'mlflow.db'}"
    old_location = "file:///" + file_uri(project / "mlartifacts" / "old").removeprefix("file://")
    MlflowClient(uri).create_experiment("old", artifact_location=old_location)
    space = write_space(tmp_path, "old", trials=1, epochs=1, grace=1)
    launched = project / "results" / "old"  # as the interrupted search left its folder
    launched.mkdir(parents=True)
    (launched / "space.yaml").write_text(space_document(load_space(space)))
    (launched / TRACKING_FILE).write_text(uri)
    command = ["search", str(space), "--storage", str(project / "results"), "--tracking-uri", uri, "--resume"]
    assert main(command) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("aesearch: error: --resume: experiment 'old'")
    assert "`aesearch relocate old`" in error and sorted(p.name for p in launched.iterdir()) == [
        "space.yaml", TRACKING_FILE]
