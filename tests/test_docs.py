"""The documentation site builds with --strict: a broken link, a page missing from the navigation or
a reference that no longer matches the code fails the suite."""

import os
import subprocess
import sys

from tests.conftest import REPO


def test_the_documentation_site_builds_strictly_with_a_reference_generated_from_the_code(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # MkDocs' notice of its successor
    assert done.returncode == 0, done.stderr[-3000:]
    config = (tmp_path / "site" / "reference" / "config" / "index.html").read_text()
    assert "model.architecture" in config and "dense" in config  # a field, and a registry's names
    choices = (tmp_path / "site" / "reference" / "choices" / "index.html").read_text()
    from aesearch.search.uses import USES

    assert all(name in choices for name in USES)
    api = (tmp_path / "site" / "reference" / "python-api" / "index.html").read_text()
    assert "run_search" in api
