"""The search spaces and training configs that ship inside the package (aesearch/spaces/*.yaml,
aesearch/configs/*.yaml), by name: `aesearch search quickstart`, `aesearch train vae` and
`aesearch.load_space("quickstart")` work from any folder and from an installed wheel, where no
repository is at hand. A file's name is its stem; its first comment line says what it is.

An argument is read as a file when it is one, or when it looks like a path (a folder separator or a
.yaml/.yml suffix); otherwise it is a shipped name, and an unknown name fails with the list of them.
"""

from __future__ import annotations

import os
from pathlib import Path

from aesearch.errors import ConfigError
from aesearch.registry import Registry

HERE = Path(__file__).parent


def _shipped(kind: str, folder: Path) -> Registry[Path]:
    registry: Registry[Path] = Registry(kind)
    for path in sorted(folder.glob("*.yaml")):
        registry.add(path.stem, path)
    return registry


SPACES = _shipped("search space", HERE / "spaces")
CONFIGS = _shipped("config", HERE / "configs")


def looks_like_a_path(argument: str) -> bool:
    return any(sep and sep in argument for sep in (os.sep, os.altsep)) or argument.endswith((".yaml", ".yml"))


def resolve(argument: Path | str, *registries: Registry[Path]) -> Path:
    """The file `argument` names: itself if it exists or looks like a path, else the shipped file of
    that name in the first of `registries` that has it."""
    text = str(argument)
    if Path(text).exists():
        return Path(text)
    if looks_like_a_path(text):
        stem = Path(text).stem  # e.g. search_spaces/quickstart.yaml, from before the files moved into the package
        for registry in registries:
            if stem in registry and Path(text).suffix in (".yaml", ".yml"):
                raise ConfigError(f"{text}: cannot read: no such file (the shipped {registry.kind} of that "
                                  f"name is read by its name alone: {stem})")
        return Path(text)
    for registry in registries:
        if text in registry:
            return registry[text]
    shipped = "; ".join(f"{r.kind}s: {', '.join(r.names())}" for r in registries)
    raise ConfigError(f"{text}: no such file, and no shipped file of that name (shipped {shipped})")


def description(path: Path) -> str:
    """What a shipped file is, in one line: its first comment line."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""
