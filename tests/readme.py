"""The documentation's code blocks (the README and every page under docs/), as the tests that run them
read them.

A marked `sh` block runs line by line in bash, `uv run ` left off (the repository's way of calling
the installed `aesearch`); an `aesearch search` line gets `--num-samples 2 --max-epochs 1` (its
documented budget flags: the suite cannot spend the minutes a full search takes).
"""

import re
import subprocess
from pathlib import Path

from tests.conftest import REPO

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").rglob("*.md"))]  # the reference pages are generated, not written here
MARK = "<!-- run as written, from an empty folder, by the test suite (tests/readme.py) -->"
SHRINK = "--num-samples 2 --max-epochs 1"
# Files the documentation asks the reader to make (`aesearch search my_space.yaml`): not expected to exist.
PLACEHOLDERS = {"my_space.yaml", "my_config.yaml", "mine.yaml", "SPACE.yaml", "fraud.yaml", "my-detector.yaml",
                "sparse.yaml"}
# Files of the repository the documentation runs from its root (examples a wheel does not ship).
IN_THE_REPOSITORY = {"examples/plugins/sequences.yaml"}


def code_blocks(marked_only: bool = False) -> list[tuple[str, str]]:
    """(language, text) of the documentation's fenced blocks; only those just after MARK if `marked_only`."""
    blocks = []
    for page in PAGES:
        found = re.finditer(r"(?P<mark>" + re.escape(MARK) + r"\n)?```(?P<lang>\w*)\n(?P<text>.*?)```", page.read_text(),
                            re.S)
        blocks += [(m["lang"], m["text"]) for m in found if m["mark"] or not marked_only]
    return blocks


def marked(lang: str, containing: str) -> str:
    texts = [text for language, text in code_blocks(marked_only=True) if language == lang and containing in text]
    assert len(texts) == 1, f"one marked {lang} block with {containing!r} in the documentation, found {len(texts)}"
    return texts[0]


def commands(block: str) -> list[str]:
    lines = (re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines())
    return [line.removeprefix("uv run ") for line in lines if line and not line.startswith("#")]


def shrunk(command: str) -> str:
    return f"{command} {SHRINK}" if command.startswith("aesearch search ") else command


def run_in(folder: Path, command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", "-c", shrunk(command)], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    return done
