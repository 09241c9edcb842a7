"""Searched parameters: `{type: categorical, choices: [...]}` or `{type: int | float, low, high, log, step}`.

Each type is a PARAMETER_TYPES entry: the fields it takes, how Optuna proposes a value of it, and which config
values it can take (what `when` conditions and `start_with` points are checked against).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from pydantic import Field, model_validator

from aesearch.registry import Registry
from aesearch.schema import Bool, Float, Named, Section, broken_rule

Scalar = str | int | float | bool | None
OPTUNA_CHOICE_TYPES = (str, int, float, bool, type(None))  # what suggest_categorical accepts as is


@dataclass(frozen=True)
class ParameterType:
    """One type of searched parameter."""

    check: Callable[[Parameter], None]  # raises broken_rule where the fields do not fit the type
    suggest: Callable[[Parameter, optuna.Trial, str], Any]  # Optuna's proposal, as Optuna holds it
    possible: Callable[[Parameter, Any], bool]  # can the parameter take this config value?


PARAMETER_TYPES: Registry[ParameterType] = Registry("parameter type")


class Parameter(Section):
    """One searched parameter: categorical choices, or an int / float range."""

    type: Named(PARAMETER_TYPES)
    path: str | None = None  # the config field it sets; default: the parameter's key
    choices: list[Any] | None = Field(None, min_length=1)
    low: Float | None = None
    high: Float | None = None
    log: Bool = False
    step: Float | None = Field(None, gt=0)
    when: dict[str, Scalar | list[Scalar]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _well_formed(self) -> Parameter:
        PARAMETER_TYPES[self.type].check(self)
        return self

    @property
    def encodes_choices(self) -> bool:
        """Choices Optuna cannot hold as they are (lists, mappings) travel as JSON text."""
        return self.choices is not None and not all(isinstance(c, OPTUNA_CHOICE_TYPES) for c in self.choices)

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        return PARAMETER_TYPES[self.type].suggest(self, trial, name)

    def decode(self, value: Any) -> Any:
        """The config value for what Optuna suggested."""
        return json.loads(value) if self.encodes_choices else value

    def possible(self, value: Any) -> bool:
        """Can this parameter take `value` (as a config value)?"""
        return PARAMETER_TYPES[self.type].possible(self, value)

    def active(self, chosen: dict[str, Any]) -> bool:
        """Do the parents (already chosen, decoded) take the values this parameter needs?"""
        for parent, wanted in self.when.items():
            allowed = wanted if isinstance(wanted, list) else [wanted]
            if parent not in chosen or chosen[parent] not in allowed:
                return False
        return True


# --- the types --------------------------------------------------------------------------------------


def check_choices(parameter: Parameter) -> None:
    if parameter.choices is None or parameter.low is not None or parameter.high is not None or parameter.log \
            or parameter.step:
        raise broken_rule("a categorical parameter takes `choices` (and no low, high, log or step)")
    try:
        json.dumps(parameter.choices, allow_nan=False)
    except (TypeError, ValueError):
        raise broken_rule(
            f"choices {parameter.choices!r}: each choice must be plain data (text, numbers, booleans, lists)"
        ) from None


def suggest_choice(parameter: Parameter, trial: optuna.Trial, name: str) -> Any:
    choices = [json.dumps(c) for c in parameter.choices] if parameter.encodes_choices else parameter.choices
    return trial.suggest_categorical(name, choices)


def check_range(parameter: Parameter) -> None:
    low, high = parameter.low, parameter.high
    if parameter.choices is not None or low is None or high is None:
        raise broken_rule(f"an {parameter.type} parameter takes `low` and `high` (and no choices)")
    if not low < high:
        raise broken_rule(f"`low < high` must hold, but got low={low}, high={high}")
    if parameter.log and low <= 0:
        raise broken_rule(f"a log-scaled parameter needs low > 0, but got low={low}")
    if parameter.log and parameter.step is not None:
        raise broken_rule("`log` and `step` cannot be used together")


def check_whole_range(parameter: Parameter) -> None:
    check_range(parameter)
    if any(v is not None and v != int(v) for v in (parameter.low, parameter.high, parameter.step)):
        raise broken_rule(f"an int parameter needs whole low, high and step, got {parameter.low}, {parameter.high}, "
                          f"{parameter.step}")


def in_range(parameter: Parameter, value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and parameter.low <= value <= parameter.high


PARAMETER_TYPES.add("categorical", ParameterType(check_choices, suggest_choice,
                                                 lambda parameter, value: value in parameter.choices))
PARAMETER_TYPES.add("int", ParameterType(check_whole_range, lambda parameter, trial, name: trial.suggest_int(
    name, int(parameter.low), int(parameter.high), step=int(parameter.step or 1), log=parameter.log), in_range))
PARAMETER_TYPES.add("float", ParameterType(check_range, lambda parameter, trial, name: trial.suggest_float(
    name, parameter.low, parameter.high, step=parameter.step, log=parameter.log), in_range))
