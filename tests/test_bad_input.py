"""Bad input, whatever its shape: one line naming what is wrong, exit status 2, nothing written.
Cases people get wrong, then random YAML documents and random command lines (hypothesis)."""

import os
import string
import time
from pathlib import Path

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aesearch.cli import main
from aesearch.locations import sqlite_uri
from tests.searching import write_space


def refused(capsys, argv: list[str]) -> str:
    """Run the command; it must exit 2 with exactly one line on stderr and none of Python's traceback."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aesearch: error: "), err
    assert "Traceback" not in err
    return lines[0]


def nothing_written(folder: Path, *allowed: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(allowed)


def test_an_unreachable_cluster_fails_in_seconds_naming_it_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, "lonely", trials=2, epochs=1, grace=1)
    started = time.monotonic()
    line = refused(capsys, ["search", str(space), "--address", "127.0.0.1:1"])
    assert time.monotonic() - started < 30
    assert line.startswith("aesearch: error: --address 127.0.0.1:1: no Ray cluster answers there")
    nothing_written(tmp_path, "lonely.yaml")  # no mlflow.db, no ray_results


def test_missing_dataset_files_without_download_name_the_folder_and_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = tmp_path / "fashion.yaml"
    space.write_text(yaml.safe_dump({"name": "fashion", "data": {"name": "fashion_mnist"},
                                     "space": {"optimizer.lr": {"type": "float", "low": 0.001, "high": 0.01}}}))
    line = refused(capsys, ["search", str(space), "--data-dir", str(tmp_path / "nowhere")])
    assert "FashionMNIST not found under" in line and str(tmp_path / "nowhere") in line and "--download" in line
    nothing_written(tmp_path, "fashion.yaml")


def test_a_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    """Checkpoints load with weights_only=True: a pickle with a callable in it never runs."""

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    planted = tmp_path / "planted.pt"
    torch.save({"config": {}, "model": Planted()}, planted)
    refused(capsys, ["evaluate", str(planted)])
    assert not (tmp_path / "pwned").exists()


def test_yaml_that_would_build_python_objects_is_refused(tmp_path, capsys):
    document = tmp_path / "evil.yaml"
    document.write_text(f"model: !!python/object/apply:os.system ['touch {tmp_path / 'pwned'}']\n")
    refused(capsys, ["validate", str(document)])
    assert not (tmp_path / "pwned").exists()


# --- random input ---------------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(string.printable, max_size=12))
FIELDS = ["name", "data", "base", "space", "model", "objective", "corruption", "optimizer", "budget",
          "resources", "start_with", "latent_dim", "type", "low", "high", "choices", "when", "epochs",
          "optimizer.lr", "model.latent_dim", "kind", "level", "beta", "rho", "num_samples", "gpu"]
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(FIELDS), inner, max_size=5)), max_leaves=20)
raw_text = st.text(string.printable, max_size=200)  # mostly not even YAML
FLAGS = ["--name", "--address", "--storage", "--num-samples", "--max-epochs", "--max-concurrent",
         "--cpus-per-trial", "--gpus-per-trial", "--seed", "--tracking-uri", "--data-dir", "--resume",
         "--download", "--set", "--epochs", "--bogus"]
command_lines = st.lists(st.one_of(st.sampled_from(FLAGS), st.text(string.printable, max_size=10),
                                   st.integers(-5, 5).map(str)), max_size=6)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(document=st.one_of(documents.map(lambda d: yaml.safe_dump(d, allow_unicode=True)), raw_text))
def test_random_documents_get_a_clean_verdict_from_validate(document, tmp_path, capsys):
    path = tmp_path / "random.yaml"
    path.write_text(document)
    code = main(["validate", str(path)])
    out, err = capsys.readouterr()
    assert code in (0, 2) and "Traceback" not in err
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("aesearch: error: ")
    else:
        assert out.startswith(f"{path}: ok")


@FUZZ
@given(document=documents.map(lambda d: yaml.safe_dump(d, allow_unicode=True)), flags=command_lines)
def test_random_search_command_lines_fail_cleanly_before_anything_starts(document, flags, tmp_path_factory, capsys):
    folder = tmp_path_factory.mktemp("fuzz")
    space = folder / "space.yaml"
    space.write_text(document)
    # An address no cluster answers: if a random space were valid, the search would stop there, writing nothing.
    argv = ["search", str(space), *flags, "--address", "127.0.0.1:1", "--storage", str(folder / "results"),
            "--tracking-uri", sqlite_uri(folder / "mlflow.db")]
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        code = main(argv)
    finally:
        os.chdir(cwd)
    _, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("aesearch: error: "), err
    nothing_written(folder, "space.yaml")
