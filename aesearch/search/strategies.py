"""How a search proposes configurations and stops weak trials: the choices `sampler`, `early_stopping`
and `stopped_trials` of a search space name entries here.

Random search and no early stopping are the baselines benchmarks/search_efficiency.py measures
Optuna's TPE + ASHA against. Each entry builds its part from plain settings, so the search space's
schema (aesearch.search.space) can name these entries without this module knowing the schema.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from aesearch.registry import Registry
from aesearch.search.mo_asha import FIFO, MultiObjectiveASHA, SeededASHA
from aesearch.search.windowed_tpe import WindowedTPESampler


def quiet_optuna() -> None:
    """Optuna's INFO lines (each study created, each trial told) off where aesearch makes a study:
    aesearch reports progress itself."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass(frozen=True)
class Sampling:
    """What a sampler is built from: the search's seed, its TPE window, and whether it has several objectives."""

    seed: int
    tpe_window: int
    multi_objective: bool


SAMPLERS: Registry[Callable[[Sampling], optuna.samplers.BaseSampler]] = Registry("sampler")


@SAMPLERS.register("tpe")
def tpe(sampling: Sampling) -> WindowedTPESampler:
    """Optuna's TPE, seeded. On one objective, multivariate within each group of parameters that
    trials draw together (group=True): a conditional parameter, such as the level of one kind of
    noise, is modelled jointly with the others of the trials that have it, where Optuna's default
    models jointly only the parameters every trial has. It reached random search's best sooner
    (benchmarks/README.md, "Search efficiency"). On several objectives, Optuna's default MOTPE.
    Beyond `tpe_window` finished trials, it learns from the best and the latest (search.windowed_tpe)."""
    if sampling.multi_objective:
        return WindowedTPESampler(window=sampling.tpe_window, seed=sampling.seed)
    with warnings.catch_warnings():  # `group` is marked experimental since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return WindowedTPESampler(window=sampling.tpe_window, seed=sampling.seed, multivariate=True, group=True)


@SAMPLERS.register("random")
def random(sampling: Sampling) -> optuna.samplers.RandomSampler:
    """Each parameter drawn independently, seeded: the baseline."""
    return optuna.samplers.RandomSampler(seed=sampling.seed)


@dataclass(frozen=True)
class Stopping:
    """What a trial scheduler is built from: the objectives, their directions, and ASHA's rungs
    (time_attr, max_t, grace_period, reduction_factor, brackets, seed)."""

    metrics: list[str]
    modes: list[str]
    rungs: dict[str, Any]


SCHEDULERS: Registry[Callable[[Stopping], Any]] = Registry("early stopping")


@SCHEDULERS.register("asha")
def asha(stopping: Stopping) -> SeededASHA | MultiObjectiveASHA:
    """Asynchronous successive halving on every objective: Ray's ASHA for one, MO-ASHA (promotion by
    non-dominated rank, search.mo_asha) for several."""
    if len(stopping.metrics) == 1:
        return SeededASHA(metric=stopping.metrics[0], mode=stopping.modes[0], **stopping.rungs)
    return MultiObjectiveASHA(stopping.metrics, stopping.modes, **stopping.rungs)


@SCHEDULERS.register("asha_first_objective")
def asha_first_objective(stopping: Stopping) -> SeededASHA:
    """Ray's ASHA on the first of several objectives alone (the search space refuses it for one)."""
    return SeededASHA(metric=stopping.metrics[0], mode=stopping.modes[0], **stopping.rungs)


@SCHEDULERS.register("none")
def no_early_stopping(stopping: Stopping) -> FIFO:
    """Every trial trains all its epochs."""
    return FIFO()


# What the sampler learns of a trial stopped early: True where it is told the trial was pruned at its
# last epoch (Optuna's TPE then ranks it below every completed trial), False where it is told the
# trial's values at the stop, as Ray tells them.
STOPPED_TRIALS: Registry[bool] = Registry("way to tell stopped trials")
STOPPED_TRIALS.add("values_at_stop", False)
STOPPED_TRIALS.add("pruned", True)
