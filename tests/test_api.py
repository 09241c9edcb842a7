"""The public Python API: what it offers, and that importing it is light. A notebook's whole path
through it (search, report, reproduce, train, load) is the README's Python example, run as written
by tests/test_readme_examples.py."""

import subprocess
import sys

import aesearch
from tests.conftest import REPO


def test_the_api_is_what_aesearch_offers_and_importing_it_is_light():
    assert set(aesearch.__all__) <= set(dir(aesearch))
    assert callable(aesearch.run_search) and callable(aesearch.load_model)
    code = "import sys, aesearch; print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]"  # the CLI's start does not pay for what a command does not use
