"""The schema's building blocks: typed fields, one-line validation errors, safe YAML, overrides.

Every config section (each part owns its own: `parts.data.DataConfig`, `parts.models.ModelConfig`,
...) is a `Section` built from these types; `aesearch.config` composes the sections into the
training config. This module imports no part, so parts and config can both import it.
"""

from __future__ import annotations

import copy
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from aesearch.errors import ConfigError
from aesearch.registry import Registry


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("Input should be a number, not a boolean")
    return value


# Integers and booleans are strict (no "16" or True for an int); floats accept ints and "1e-3"
# but neither booleans nor inf/nan (Section forbids those).
Int = Annotated[int, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]
Float = Annotated[float, BeforeValidator(_not_a_bool)]
PositiveInt = Annotated[int, Field(strict=True, ge=1)]


# A name that names folders and runs: letters, digits, '.', '_' and '-', starting with a letter or digit.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
NAME_RULE = "use letters, digits, '.', '_' and '-', starting with a letter or digit"
Name = Annotated[str, Field(max_length=100, pattern=NAME_PATTERN)]


def Bounded(high: int) -> type[int]:
    """A positive int with an upper bound that keeps models and batches within reason."""
    return Annotated[int, Field(strict=True, ge=1, le=high)]


def broken_rule(message: str) -> PydanticCustomError:
    """A cross-field rule broken: its message names the fields and values itself."""
    return PydanticCustomError("rule", message.replace("{", "(").replace("}", ")"))


def named(registry: Registry, value: str, extra: tuple[str, ...] = ()) -> str:
    if value in extra or value in registry:
        return value
    valid = ", ".join(sorted((*extra, *registry.names())))
    raise ValueError(f"unknown {registry.kind}; valid names: {valid}")


@dataclass(frozen=True)
class NamedChoice:
    """Marks a field as a name of `registry`'s entries (or of `extra`): what the docs' reference lists."""

    registry: Registry
    extra: tuple[str, ...] = ()

    def names(self) -> list[str]:
        return sorted((*self.extra, *self.registry.names()))


def Named(registry: Registry, *extra: str) -> type[str]:
    """A string field that must name an entry of `registry` (or one of `extra`)."""
    return Annotated[str, AfterValidator(lambda value: named(registry, value, extra)), NamedChoice(registry, extra)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


# --- reading documents, overrides, error messages ---------------------------------------------


def load_yaml(path: Path | str) -> Any:
    """Read a YAML file safely (no arbitrary objects), with one-line errors."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: cannot read: not UTF-8 text") from None
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{path}: malformed YAML: nested too deeply") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        position = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{position}: {problem}") from None


def apply_overrides(document: dict, overrides: list[str]) -> dict:
    """`model.latent_dim=32` sets document['model']['latent_dim'] = 32 (values parsed as YAML)."""
    result = copy.deepcopy(document)  # keeps YAML aliases shared instead of expanding them
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {override!r}: expected key.path=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        try:
            set_path(result, key.strip(), value)
        except ConfigError as error:
            raise ConfigError(f"--set {override!r}: {error}") from None
    return result


def set_path(document: dict, path: str, value: Any) -> None:
    """document[a][b][c] = value for path 'a.b.c', creating sections on the way (in place)."""
    node = document
    *sections, field = path.split(".")
    for part in sections:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{part!r} is a value, not a section")
        node = child
    node[field] = value


_SHORT = reprlib.Repr()  # a value in an error message is shown short, however big it is
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 60, 60


def describe_validation_error(error: ValidationError) -> str:
    """pydantic's errors as `field=value: rule` phrases joined on one line."""
    phrases = []
    for item in error.errors(include_url=False):
        field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in item["loc"]).lstrip(".")
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            phrases.append(f"{field}: unknown key")
        elif item["type"] == "missing":
            phrases.append(f"{field}: required")
        elif item["type"] == "rule":  # a cross-field rule: the message names its fields itself
            phrases.append(message)
        elif field:
            phrases.append(f"{field}={_SHORT.repr(item['input'])}: {message}")
        else:  # the document as a whole (not JSON, not a list)
            phrases.append(message)
    return "; ".join(phrases)


def flatten(document: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'latent_dim': 16}} -> {'model.latent_dim': 16}: one stable name per field."""
    flat: dict[str, Any] = {}
    for key, value in document.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat
