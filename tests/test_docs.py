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


def test_the_readme_stays_what_a_newcomer_reads_first_and_points_to_every_guide():
    """At most ~150 lines (the guides live in docs/), opening with the two commands, and linking every page
    written by hand there (the reference pages are generated)."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert readme.split("```")[1].split()[:3] == ["sh", "make", "quickstart"]
    written = sorted(path.relative_to(REPO).as_posix() for path in (REPO / "docs").rglob("*.md")
                     if path.parent.name != "reference")
    assert [page for page in written if f"]({page})" not in readme] == []
