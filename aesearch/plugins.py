"""The user's own parts: modules a config or a search space names under `plugins:`.

    plugins: [my_parts.py, my_package.parts]

Each plug-in registers its parts with the decorators aesearch's own parts use
(`@ARCHITECTURES.register(...)`, `@SPARSITY_PENALTIES.register(...)`, ...), so it is imported before the
document that names its parts is validated. An entry ending in `.py` is a file (relative to the
document's folder), imported as the module named by its stem; any other entry is a module to import
by name. A search ships the same modules to every node (`shipped_modules`: Ray's `py_modules`), where
the trials import them by module name.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aesearch.errors import ConfigError

FILE_SUFFIX = ".py"


@dataclass(frozen=True)
class Plugin:
    entry: str  # as the document gives it
    module: str  # the module it is imported as, here and on every node
    file: Path | None  # a file entry's path (absolute)


def plugin(entry: str, folder: Path) -> Plugin:
    """What an entry names: a file (relative to `folder`) or a module."""
    if entry.endswith(FILE_SUFFIX):
        path = Path(entry).expanduser()
        return Plugin(entry, path.stem, (path if path.is_absolute() else folder / path).resolve())
    return Plugin(entry, entry, None)


def absolute_entries(document: Any, folder: Path) -> Any:
    """A document (a config's or a space's) with its plug-in files as absolute paths: a trial, a
    reproduction or a served model reads them wherever it runs from."""
    entries = document.get("plugins") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not all(isinstance(entry, str) for entry in entries):
        return document  # nothing to resolve, or the schema's error
    resolved = [str(p.file) if p.file is not None else p.entry for p in (plugin(e, folder) for e in entries)]
    return {**document, "plugins": resolved}


def load_plugins(entries: Any, folder: Path | None = None) -> list[Plugin]:
    """Import each plug-in once per process (before the document naming its parts is validated).
    A file that is not here is imported by its module name, as a node that received it from the
    driver does. A plug-in that cannot be imported, or that registers a name already taken, is one
    line (ConfigError) naming the entry."""
    if not isinstance(entries, list) or not all(isinstance(entry, str) for entry in entries):
        return []  # the schema says what is wrong with the field
    loaded = []
    for entry in entries:
        found = plugin(entry, folder or Path.cwd())
        if found.module not in sys.modules:
            _import(found)
        elif found.file is not None and found.file.is_file() and not _is_file_of(sys.modules[found.module], found.file):
            raise ConfigError(f"plugins: {entry}: a module {found.module!r} is imported already (from "
                              f"{getattr(sys.modules[found.module], '__file__', None) or 'elsewhere'}); rename the file")
        loaded.append(found)
    return loaded


def _is_file_of(module: Any, file: Path) -> bool:
    """Is `module` this file, or a copy of it (as Ray's py_modules or MLflow's code_paths place it)?"""
    where = getattr(module, "__file__", None)
    return where is not None and (Path(where).resolve() == file or Path(where).read_bytes() == file.read_bytes())


def _import(found: Plugin) -> None:
    where = f"plugins: {found.entry}"
    try:
        if found.file is not None and found.file.is_file():
            spec = importlib.util.spec_from_file_location(found.module, found.file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[found.module] = module  # as a node imports it by name: one module either way
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[found.module]
                raise
        elif found.file is not None and importlib.util.find_spec(found.module) is None:
            raise ConfigError(f"{where}: no such file" + ("" if str(found.file) == found.entry else f" ({found.file})"))
        else:
            importlib.import_module(found.module)
    except ConfigError:
        raise
    except ModuleNotFoundError as error:
        if error.name == found.module.split(".")[0] or error.name == found.module:
            raise ConfigError(f"{where}: no module {found.module!r} can be imported here (is it installed, or "
                              "on PYTHONPATH?)") from None
        raise ConfigError(f"{where}: does not import: {_last_line(error)}") from None
    except ValueError as error:
        if "registered twice" in str(error):  # Registry.register: a name already taken
            raise ConfigError(f"{where}: {error}: choose another name") from None
        raise ConfigError(f"{where}: does not import: {_last_line(error)}") from None
    except Exception as error:
        raise ConfigError(f"{where}: does not import: {_last_line(error)}") from None


def _last_line(error: BaseException) -> str:
    return traceback.format_exception_only(type(error), error)[-1].strip()


def shipped_modules(plugins: list[Plugin]) -> list[str]:
    """What Ray's `py_modules` ships to every node so the trials there import the same plug-ins: a
    file as it is, a module's top-level package folder (or its file)."""
    shipped = []
    for found in plugins:
        if found.file is not None and found.file.is_file():
            shipped.append(str(found.file))
            continue
        top = sys.modules[found.module.split(".")[0]]
        if getattr(top, "__file__", None) is None:  # a namespace package: its folder
            shipped.append(str(Path(list(top.__path__)[0])))
            continue
        location = Path(top.__file__)
        shipped.append(str(location.parent if location.name == "__init__.py" else location))
    return list(dict.fromkeys(shipped))
