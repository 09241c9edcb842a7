"""Search spaces: a base config, the parameters to search, the objective and the budget.

    name: quickstart
    data: {name: digits}                      # loaded once per search (a DataConfig)
    base: {optimizer: {batch_size: 64}}       # fixed part of every trial config
    space:                                    # searched, in this order (parents first)
      model.latent: {type: categorical, choices: [deterministic, gaussian]}
      objective.kl.beta: {type: float, low: 0.5, high: 8, log: true, when: {model.latent: gaussian}}
      sigma: {path: corruption.level, type: float, low: 0.05, high: 0.5, when: {corruption.kind: gaussian}}
    objective: {metric: val/recon_mse, mode: min}   # or a list of them: a multi-objective search
    budget: {num_samples: 16, max_epochs: 10, grace_period: 2, reduction_factor: 3}

`use: anomaly_detection` (clustering, generation, compression, reconstruction) stands for an
objective and a space worth searching for that use (aesearch.search.uses).

A parameter's key is its name for Optuna; `path` is the config field it sets (default: the key),
so two parameters may set one field under different conditions (a noise level whose range
depends on the noise kind). `when` makes a parameter exist only while earlier parameters take
the given values: the space compiles into an Optuna define-by-run function (`DefineByRun`) in
which TPE sees exactly that conditional structure.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Annotated, Any

import optuna
from pydantic import Field, ValidationError, model_validator

from aesearch.config import TrainConfig, check_data, metric_problem, parse_config, plugged_in
from aesearch.errors import ConfigError
from aesearch.metrics import ALWAYS_PER_EPOCH, DIRECTIONS, USE_METRICS, is_epoch_objective, is_use_metric, lookup
from aesearch.parts.data import Data, DataConfig, DataSpec
from aesearch.plugins import absolute_entries
from aesearch.schema import (Int, Name, Named, PositiveInt, Section, broken_rule,
                             describe_validation_error, flatten, load_yaml, set_path)
from aesearch.search.budget import Budget, Resources
from aesearch.search.parameters import Parameter
from aesearch.search.strategies import SAMPLERS, SCHEDULERS, STOPPED_TRIALS, quiet_optuna
from aesearch.search.uses import USES, apply_use
from aesearch.shipped import SPACES, resolve
from aesearch.training.simulated import Simulation

# Fields that the search itself decides: the data is loaded once, the budget sets the epochs.
NOT_SEARCHABLE = ("data.", "epochs", "name")


class Objective(Section):
    """What ASHA and TPE rank trials on: a metric known after every epoch (metrics.is_epoch_objective)."""

    # The clean-input reconstruction MSE: the yardstick that is fair across variants.
    metric: str = "val/recon_mse"
    mode: Named(DIRECTIONS) | None = None  # the metric's own direction (the catalogue's); None: that one

    @model_validator(mode="after")
    def _mode_is_the_metrics(self) -> Objective:
        if not is_epoch_objective(self.metric):
            raise broken_rule(
                f"objective.metric={self.metric!r}: not a metric known after every epoch; one of "
                f"{', '.join(ALWAYS_PER_EPOCH + USE_METRICS)}, val/denoise_psnr_<kind>, val/denoise_mse_<kind>")
        direction = lookup(self.metric).mode
        if self.mode is not None and self.mode != direction:
            raise broken_rule(f"objective.mode={self.mode!r}: for {self.metric} {lookup(self.metric).better}, "
                              f"so the mode is {direction!r}")
        self.mode = direction
        return self

    @property
    def learnt(self) -> bool:
        """Does training move it (not the model's size, fixed by its config)?"""
        return not self.metric.startswith("model/")


ParameterName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]  # no '/': Ray would nest it


class SearchSpace(Section):
    name: Name
    plugins: list[str] = Field(default_factory=list)  # modules of the user's own parts (aesearch.plugins)
    data: DataConfig = Field(default_factory=DataConfig)
    use: Named(USES) | None = None  # stands for an objective and a space (aesearch.search.uses)
    base: dict[str, Any] = Field(default_factory=dict)
    space: dict[ParameterName, Parameter] = Field(min_length=1)
    start_with: list[dict[str, Any]] = Field(default_factory=list)  # first trials, e.g. one per family
    # One objective, or several: a multi-objective search (Optuna's TPE on all, a Pareto front).
    objective: list[Objective] = Field(default_factory=lambda: [Objective()], min_length=1, max_length=4)
    budget: Budget = Field(default_factory=Budget)
    resources: Resources = Field(default_factory=Resources)
    max_concurrent: PositiveInt | None = None
    seed: Int = Field(0, ge=0)
    # How configs are proposed, weak trials stopped, and stopped trials told to the sampler
    # (aesearch.search.strategies).
    sampler: Named(SAMPLERS) = "tpe"
    early_stopping: Named(SCHEDULERS) = "asha"
    stopped_trials: Named(STOPPED_TRIALS) = "values_at_stop"
    tpe_window: Int = Field(1000, ge=100)  # TPE learns from the best and this many latest trials (windowed_tpe)
    simulate: Simulation | None = None  # simulated trials: nothing is trained

    @model_validator(mode="before")
    @classmethod
    def _spelled_out(cls, document: Any) -> Any:
        if not isinstance(document, dict):
            return document
        document = apply_use(document, Budget.model_fields["max_epochs"].default)
        if isinstance(document.get("objective"), dict):  # one objective: a list of one
            document = {**document, "objective": [document["objective"]]}
        return document

    @property
    def primary(self) -> Objective:
        """The first objective: the one the leaderboard ranks on first, and the single-objective one."""
        return self.objective[0]

    @property
    def multi_objective(self) -> bool:
        return len(self.objective) > 1

    @property
    def metrics(self) -> list[str]:
        return [objective.metric for objective in self.objective]

    @property
    def modes(self) -> list[str]:
        return [objective.mode for objective in self.objective]

    @model_validator(mode="after")
    def _objectives_fit(self) -> SearchSpace:
        seen = set()
        for i, objective in enumerate(self.objective):
            if objective.metric in seen:
                raise broken_rule(f"objective[{i}].metric={objective.metric!r}: listed twice; each objective "
                                  "once")
            seen.add(objective.metric)
        if not any(objective.learnt for objective in self.objective):
            raise broken_rule(f"objective: {', '.join(self.metrics)} is fixed by each trial's config, not learnt; "
                              "list a metric of the model's quality too (e.g. val/recon_mse)")
        if self.early_stopping == "asha_first_objective" and not self.multi_objective:
            raise broken_rule("early_stopping='asha_first_objective' is for several objectives; with one, use 'asha'")
        return self

    @model_validator(mode="after")
    def _parameters_fit(self) -> SearchSpace:
        known_fields = set(flatten(TrainConfig().model_dump(mode="json")))
        for key in self.base:
            if key in ("data", "epochs"):
                raise broken_rule(f"base.{key}: set it at the top level (`data`) or in `budget.max_epochs`, not in base")
        earlier: dict[str, Parameter] = {}
        for key, parameter in self.space.items():
            path = parameter.path or key
            if path not in known_fields:
                raise broken_rule(f"space.{key}: {path!r} is not a config field (e.g. model.latent_dim, objective.kl.beta)")
            if path.startswith(NOT_SEARCHABLE):
                raise broken_rule(f"space.{key}: {path!r} is fixed for a search (data is loaded once; budget sets epochs)")
            for parent, wanted in parameter.when.items():
                if parent not in earlier:
                    raise broken_rule(f"space.{key}.when: {parent!r} must be a parameter listed before {key!r}")
                if earlier[parent].choices is None:
                    raise broken_rule(f"space.{key}.when: {parent!r} must be a categorical parameter")
                for value in wanted if isinstance(wanted, list) else [wanted]:
                    if not earlier[parent].possible(value):
                        raise broken_rule(f"space.{key}.when: {parent}={value!r} is not a value {parent!r} can take")
            earlier[key] = parameter
        if self.resources.gpu == 0 and self.base.get("runtime", {}).get("device", "auto").startswith("cuda"):
            raise broken_rule("base.runtime.device asks for CUDA, but resources.gpu=0 gives trials no GPU")
        if self.simulate is not None and self.resources.pack > 1:
            raise broken_rule(f"simulate with resources.pack={self.resources.pack}: pack servers train; use pack 1")
        for i, point in enumerate(self.start_with):
            for key, value in point.items():
                if key not in self.space:
                    raise broken_rule(f"start_with[{i}]: {key!r} is not a parameter of the space")
                if not self.space[key].possible(value):
                    raise broken_rule(f"start_with[{i}]: {key}={value!r} is not a value {key!r} can take")
        return self


# --- from a space to trial configs ------------------------------------------------------------


class DefineByRun:
    """The space as an Optuna define-by-run function: suggests the active parameters in order,
    computes nothing else. A module-level class, so Ray can pickle the searcher's state."""

    def __init__(self, space: SearchSpace):
        self.parameters = list(space.space.items())

    def __call__(self, trial: optuna.Trial) -> None:
        chosen: dict[str, Any] = {}
        for name, parameter in self.parameters:
            if parameter.active(chosen):
                chosen[name] = parameter.decode(parameter.suggest(trial, name))


def decode_params(space: SearchSpace, suggested: dict[str, Any]) -> dict[str, Any]:
    """Optuna's suggestions (as Ray hands them to a trial) -> config values by parameter name."""
    return {name: space.space[name].decode(value) for name, value in suggested.items() if name in space.space}


def selected_by(space: SearchSpace) -> str:
    """The metric whose best epoch a trial keeps: its first learnt objective (a trial is judged by
    the objectives, and keeps the weights they judge best)."""
    return next(objective.metric for objective in space.objective if objective.learnt)


def trial_config(space: SearchSpace, params: dict[str, Any], measured: bool = True) -> TrainConfig:
    """The full, validated config of the trial that takes `params` (decoded, by parameter name):
    the base, the data and epochs of the search, and (`measured`) what its objectives need measured
    each epoch."""
    document = copy.deepcopy(space.base)
    document["plugins"] = space.plugins
    document["data"] = space.data.model_dump(mode="json")
    document["epochs"] = space.budget.max_epochs
    document.setdefault("name", space.name)
    document.setdefault("seed", space.seed)
    evaluation = document.setdefault("evaluation", {})
    if measured and isinstance(evaluation, dict):  # else: the config's own error, below
        asked = evaluation.get("val_metrics") or []
        evaluation["val_metrics"] = list(dict.fromkeys([*asked, *filter(is_use_metric, space.metrics)]))
        evaluation["select_by"] = selected_by(space)
    set_by: dict[str, str] = {}
    for name, value in params.items():
        path = space.space[name].path or name
        if path in set_by:
            raise ConfigError(f"space: parameters {set_by[path]!r} and {name!r} both set {path} in one trial")
        set_by[path] = name
        set_path(document, path, value)
    return parse_config(document, source="")


def encode_point(space: SearchSpace, point: dict[str, Any]) -> dict[str, Any]:
    """Config values by parameter name -> the values Optuna holds (choices it cannot hold as JSON)."""
    return {name: json.dumps(value) if space.space[name].encodes_choices else value for name, value in point.items()}


def start_points(space: SearchSpace) -> list[dict[str, Any]]:
    """`start_with` in Optuna's terms (encoded choices), for OptunaSearch(points_to_evaluate)."""
    return [encode_point(space, point) for point in space.start_with]


def sample_params(space: SearchSpace, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """`count` random trials of the space (decoded params), as the searcher would draw them."""
    quiet_optuna()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    define = DefineByRun(space)
    samples = []
    for _ in range(count):
        trial = study.ask()
        define(trial)
        samples.append(decode_params(space, trial.params))
        study.tell(trial, 0.0)
    return samples


def start_trials(space: SearchSpace) -> list[dict[str, Any]]:
    """The trials `start_with` begins with, as the searcher runs them (parameters it leaves
    open drawn at random); a point that sets a parameter its conditions switch off is refused."""
    quiet_optuna()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=space.seed))
    define, trials = DefineByRun(space), []
    for i, point in enumerate(start_points(space)):
        study.enqueue_trial(point)
        trial = study.ask()
        define(trial)
        unused = sorted(set(point) - set(trial.params))
        if unused:
            raise ConfigError(f"space {space.name}: start_with[{i}] sets {', '.join(unused)}, which its `when` conditions switch off")
        trials.append(decode_params(space, trial.params))
        study.tell(trial, 0.0)
    return trials


def check_trials(space: SearchSpace, spec: DataSpec | None = None, count: int = 64) -> None:
    """Every start trial and every sampled trial must be a valid config (for the loaded data, given
    its spec: the user's data is known only once loaded), or the space is wrong."""
    spec = spec or space.data.known_spec
    for params in [*start_trials(space), *sample_params(space, count, seed=space.seed)]:
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
        try:
            config = trial_config(space, params, measured=False)
            if spec is not None:
                check_data(config, spec)
        except ConfigError as error:
            raise ConfigError(f"space {space.name}: the trial {{{shown}}} is not a valid config: {error}") from None
        for i, metric in enumerate(space.metrics):  # what the objectives need, named as theirs
            problem = spec is not None and metric_problem(metric, config, spec)
            if problem:
                raise ConfigError(f"objective[{i}].metric={metric!r}: {problem} (the trial {{{shown}}})")
        try:
            config = trial_config(space, params)
            if spec is not None:
                check_data(config, spec)
        except ConfigError as error:
            raise ConfigError(f"space {space.name}: the trial {{{shown}}} is not a valid config: {error}") from None


def check_validation_rows(space: SearchSpace, data: Data) -> None:
    """Can the loaded validation split tell the objectives apart at all? (Labelled anomalies among
    its rows, labels for clustering.) Refused before anything starts."""
    for i, metric in enumerate(space.metrics):
        if metric.startswith("val/anomaly_"):
            flags = [] if data.val_y is None else data.spec.is_anomaly(data.val_y).tolist()
            if not any(flags) or all(flags):
                raise ConfigError(
                    f"objective[{i}].metric={metric!r}: the validation split of {space.data.dataset} holds "
                    f"{sum(flags)} anomalous and {len(flags) - sum(flags)} normal labelled rows; it needs both "
                    "(raise data.val_fraction, or label more anomalies)")


# --- loading --------------------------------------------------------------------------------------


def is_search_space(document: Any) -> bool:
    return isinstance(document, dict) and ("space" in document or "use" in document)


def parse_space(document: Any, source: str = "search space") -> SearchSpace:
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: expected a mapping, got {type(document).__name__}")
    plugged_in(document, source)
    try:
        space = SearchSpace.model_validate(document)
    except ValidationError as error:
        raise ConfigError(f"{source}: {describe_validation_error(error)}") from None
    check_trials(space)
    return space


def load_space(path: Path | str, overrides: dict[str, Any] | None = None) -> SearchSpace:
    """Load and validate a search space file, or a shipped one by name ('quickstart'); `overrides` replace
    top-level sections' fields, e.g. {'budget.num_samples': 4} (from command-line flags)."""
    file = resolve(path, SPACES)
    document = load_yaml(file)
    if isinstance(document, dict):
        document = copy.deepcopy(document)
        for dotted, value in (overrides or {}).items():
            set_path(document, dotted, value)
        plugged_in(document, str(path), Path(file).parent)  # the error names the entries as written
        document = absolute_entries(document, Path(file).parent)
    return parse_space(document, source=str(path))
