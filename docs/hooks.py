"""MkDocs hooks: the reference pages, generated from the code at every build, so none can go stale.

- reference/config.md and reference/search-space.md: every field of the typed schema (the pydantic
  sections are the single home of the defaults), with its type, default, rule and description;
- reference/choices.md: every registry of named choices and its entries;
- reference/metrics.md: the metric catalogue;
- reference/cli.md: every command's help, as `aesearch COMMAND --help` prints it.

A field's description is its `description=`, else the comment on its line or the comment lines
just above it in its class.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import io
import pkgutil
import textwrap
import tokenize
import types
import typing
import warnings
from typing import Any

import annotated_types
from mkdocs.structure.files import File
from pydantic import BaseModel

import aesearch
from aesearch.registry import Registry
from aesearch.schema import NamedChoice


def on_files(files, config):
    with warnings.catch_warnings():  # MLflow's own import warns about the type hints of its own classes
        warnings.simplefilter("ignore", UserWarning)
        pages = reference_pages()
    for path, text in pages.items():
        files.append(File.generated(config, path, content=text))
    return files


def reference_pages() -> dict[str, str]:
    from aesearch.config import TrainConfig
    from aesearch.search.space import SearchSpace

    return {
        "reference/config.md": "# Config reference\n\nEvery field of a training config (`aesearch train CONFIG`), "
        "section by section; a config file gives only what differs from the defaults.\n\n" + fields_page(TrainConfig),
        "reference/search-space.md": "# Search space reference\n\nEvery field of a search space (`aesearch search "
        "SPACE`) besides `base` (a config, above) and `space` (the searched parameters).\n\n" + fields_page(SearchSpace),
        "reference/choices.md": choices_page(),
        "reference/metrics.md": metrics_page(),
        "reference/cli.md": cli_page(),
    }


# --- fields ---------------------------------------------------------------------------------------


def comments(model: type) -> dict[str, str]:
    """Field name -> the comment on its line, else the comment lines right above it, in its class's source."""
    try:
        source = textwrap.dedent(inspect.getsource(model))
    except (OSError, TypeError):
        return {}
    found, above, line_of_field = {}, [], {}
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for i, token in enumerate(tokens):
        if token.type == tokenize.COMMENT:
            trailing = i > 0 and tokens[i - 1].start[0] == token.start[0]
            text = token.string.lstrip("#").strip()
            if trailing and token.start[0] in line_of_field:
                found[line_of_field[token.start[0]]] = text
            elif not trailing:
                above.append(text)
        elif token.type == tokenize.NAME and token.start[1] == 4 and i + 1 < len(tokens) and tokens[i + 1].string == ":":
            line_of_field[token.start[0]] = token.string
            if above:
                found.setdefault(token.string, " ".join(above))
            above = []
        elif token.type == tokenize.NEWLINE and not (i > 0 and tokens[i - 1].type == tokenize.COMMENT):
            above = [] if tokens[i - 1].type != tokenize.NL else above
    return found


def section_of(annotation: Any) -> type[BaseModel] | None:
    """The section a field holds (itself, or inside `X | None`), or None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if inspect.isclass(candidate) and issubclass(candidate, BaseModel):
            return candidate
    return None


def type_text(annotation: Any, metadata: list | tuple = ()) -> str:
    """A field's type in words: a registry's names, `one of`, `list of`, `or null`."""
    choice = next((m for m in metadata if isinstance(m, NamedChoice)), None)
    if choice is not None:
        return f"{choice.registry.kind} name: " + ", ".join(f"`{name}`" for name in choice.names())
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_text(args[0], [*metadata, *args[1:], *(m for a in args[1:] for m in getattr(a, "metadata", []))])
    if origin in (typing.Union, types.UnionType):
        kept = [a for a in args if a is not type(None)]
        text = " or ".join(type_text(a, metadata) for a in kept)
        return text + (" or null" if len(kept) < len(args) else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a!r}`" for a in args)
    if origin in (list, tuple):
        return "list of " + type_text(args[0]) if args else "list"
    if origin is dict:
        return "mapping"
    return getattr(annotation, "__name__", str(annotation)).replace("typing.", "")


RULES = {annotated_types.Ge: ">=", annotated_types.Gt: ">", annotated_types.Le: "<=", annotated_types.Lt: "<",
         annotated_types.MinLen: "length >= {}", annotated_types.MaxLen: "length <= {}"}


def rule_text(info) -> str:
    rules = []
    for constraint in info.metadata:
        for kind, words in RULES.items():
            if isinstance(constraint, kind):
                value = getattr(constraint, next(f for f in ("ge", "gt", "le", "lt", "min_length", "max_length")
                                                 if hasattr(constraint, f)))
                rules.append(words.format(value) if "{}" in words else f"{words} {value}")
    return ", ".join(rules)


def default_text(info) -> str:
    if info.is_required():
        return "required"
    value = info.default_factory() if info.default_factory is not None else info.default
    if isinstance(value, BaseModel):
        return "(its section)"
    return f"`{value!r}`"


def fields_page(model: type[BaseModel], prefix: str = "") -> str:
    rows, sections = [], []
    notes = comments(model)
    for name, info in model.model_fields.items():
        nested = section_of(info.annotation)
        if nested is not None:
            origin = typing.get_origin(info.annotation)
            where = {list: f"{prefix}{name}[i]", dict: f"{prefix}{name}.<parameter>"}.get(origin, f"{prefix}{name}")
            sections.append((where, nested))
            continue
        description = (info.description or notes.get(name, "")).replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | {type_text(info.annotation, info.metadata)} | {default_text(info)} | "
                    f"{rule_text(info)} | "
                    f"{description} |")
    page = ""
    if rows:
        doc = inspect.cleandoc(model.__dict__.get("__doc__") or "")  # its own, not pydantic's BaseModel's
        title = prefix.rstrip(".") or "top level"
        first = " ".join(doc.split("\n\n")[0].split())
        page += (f"## `{title}`\n\n" + (f"{first}\n\n" if doc and prefix else "")
                 + "| field | type | default | rule | description |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n")
    for name, nested in sections:
        page += fields_page(nested, f"{name}.")
    return page


# --- registries, metrics, commands ------------------------------------------------------------------


def every_module() -> list[Any]:
    return [importlib.import_module(found.name) for found in pkgutil.walk_packages(aesearch.__path__, "aesearch.")]


def defined_in(module: Any, attribute: str) -> bool:
    """Does `module` define `attribute` itself (an assignment at its top level), not import it?"""
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return False
    return any(line.startswith((f"{attribute}:", f"{attribute} =")) for line in source.splitlines())


def choices_page() -> str:
    page = ("# Named choices\n\nEvery named choice is an entry of a registry: a config or a space names it, and "
            "an unknown name fails with the list of valid ones. A plug-in adds entries the same way "
            "(`plugins:`).\n\n")
    for module in every_module():
        for attribute, value in vars(module).items():
            if not isinstance(value, Registry) or not defined_in(module, attribute):
                continue
            page += f"## {value.kind}\n\n`{module.__name__}.{attribute}`\n\n| name | what |\n|---|---|\n"
            for name in value:
                page += f"| `{name}` | {describe(value[name])} |\n"
            page += "\n"
    return page


def describe(entry: Any) -> str:
    """One line on a registry's entry: what it says of itself."""
    from pathlib import Path

    if isinstance(entry, Path):  # a shipped space or config: its first comment line
        text = entry.read_text().splitlines()[0].lstrip("# ")
    elif any(hasattr(entry, field) for field in ("description", "why", "caption")):
        text = next(getattr(entry, field) for field in ("description", "why", "caption") if hasattr(entry, field))
    elif inspect.isfunction(entry) or inspect.isclass(entry):
        text = (inspect.getdoc(entry) or "").split("\n\n")[0]
    elif dataclasses.is_dataclass(entry):  # the first of its functions that says what it does
        documented = [f for f in vars(entry).values() if inspect.isfunction(f) and f.__doc__ and f.__name__ != "<lambda>"]
        text = inspect.getdoc(documented[0]).split("\n\n")[0] if documented else ""
    else:
        text = ""
    return " ".join(text.split()).replace("|", "\\|")


def metrics_page() -> str:
    from aesearch.metrics import FAMILY_METRICS, METRICS

    rows = "\n".join(f"| `{m.name}` | {m.better} | {m.description.replace('|', '/')} | {m.applies} |"
                     for m in [*METRICS, *FAMILY_METRICS])
    return ("# Metrics\n\nEvery metric aesearch logs (`aesearch.metrics`): per-epoch `train/` and `val/`, the "
            "evaluation suite's `test/` on the best weights.\n\n| metric | better | what | when it applies |\n"
            "|---|---|---|---|\n" + rows + "\n")


def cli_page() -> str:
    import argparse

    from aesearch.cli import build_parser

    parser = build_parser()
    page = "# Command line\n\n```\n" + parser.format_help() + "```\n\n"
    for action in parser._subparsers._group_actions:  # argparse keeps its subcommands here only
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                page += f"## aesearch {name}\n\n```\n{command.format_help()}```\n\n"
    return page
