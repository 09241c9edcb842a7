"""The house: each layer of the package imports only the layers below it (pyproject's contract),
and no module grows past what one reader holds."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LONGEST = 450  # lines


def test_each_layer_imports_only_the_layers_below_it():
    checked = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-2000:]
    assert "1 kept, 0 broken" in checked.stdout


def test_the_contract_names_every_package_of_aesearch():
    import tomllib

    layers = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    named = {name.strip() for layer in layers for name in layer.split("|")}
    modules = {f"aesearch.{path.stem if path.is_file() else path.name}" for path in (REPO / "aesearch").iterdir()
               if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").is_file()}
    assert modules == named, f"not in the layers contract: {modules - named}; gone: {named - modules}"


def test_no_module_is_longer_than_one_reader_holds():
    long = {str(path.relative_to(REPO)): n for path in (REPO / "aesearch").rglob("*.py")
            if (n := len(path.read_text().splitlines())) > LONGEST}
    assert not long, long


def test_importing_aesearch_changes_no_environment_variable_nor_any_librarys_logging():
    # The libraries first (importing Ray sets RAY_CLIENT_MODE itself), then aesearch's modules.
    code = ("import os, logging, ray, ray.tune, optuna, torch, pandas; before = dict(os.environ); "
            "levels = lambda: {n: logging.getLogger(n).level for n in ('optuna', 'ray', 'mlflow', 'aesearch')}; "
            "logged = levels(); "
            "import aesearch, aesearch.api, aesearch.search.driver, "
            "aesearch.tracking.search_run, aesearch.results.render; "
            "print(sorted(set(os.environ.items()) ^ set(before.items())), levels() == logged)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[] True"
