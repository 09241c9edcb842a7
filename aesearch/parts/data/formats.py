"""The kinds of file the user's data may come in: each a FORMATS entry, registered with its reader in sources.py.

A path names its format by its suffix; a path without one (or a folder) names the format without suffixes, a
folder of images. What a format holds decides which `data:` fields apply to it and which models' inputs it can
give (`aesearch encode` / `score`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aesearch.parts.data.spec import IMAGE, VECTOR, DataSpec
from aesearch.registry import Registry

TABLE, ARRAYS, IMAGES = "table", "arrays", "images"  # what a format holds


@dataclass(frozen=True)
class DataFormat:
    read: Callable[[Path, Any, Any], Any]  # (file or folder, its DataConfig, the main data's Raw or None) -> Raw
    holds: str  # TABLE (columns: label, id, features, categorical apply), ARRAYS, or IMAGES (a folder)
    suffixes: tuple[str, ...] = ()  # lower case; none: a folder
    frame: Callable[[Path], Any] | None = None  # a table's reader into a pandas DataFrame

    def gives(self, spec: DataSpec) -> bool:
        """Can new inputs for a model of this data come in this format?"""
        if self.holds == TABLE:
            return bool(spec.columns) and spec.modality == VECTOR
        return self.holds == ARRAYS or spec.modality == IMAGE

    @property
    def described(self) -> str:
        return "a folder of images" if not self.suffixes else "/".join(self.suffixes)


FORMATS: Registry[DataFormat] = Registry("data format")


def data_format(path: str) -> str | None:
    """The format a path names (a FORMATS name), or None."""
    suffix = Path(path).suffix.lower()
    named = [name for name in FORMATS if suffix and suffix in FORMATS[name].suffixes]
    if named:
        return named[0]
    if not suffix or path.endswith(("/", "\\")) or Path(path).is_dir():
        return next((name for name in FORMATS if not FORMATS[name].suffixes), None)
    return None


def format_rule() -> str:
    return "its format comes from the suffix: " + ", ".join(FORMATS[name].described for name in FORMATS)


def holding(kind: str) -> list[str]:
    """The formats that hold tables (TABLE), arrays or images."""
    return [name for name in FORMATS if FORMATS[name].holds == kind]
