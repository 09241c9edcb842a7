"""Optuna's TPE over a window of the search's trials: an ask costs at 10,000 trials what it costs at 1,000.

TPE reads every finished trial at every ask, once per group of parameters it samples together, so an
ask grows with the trials (benchmarks/tpe_cost.py: on mnist_variants ~0.13 s of CPU at 1,000 finished trials,
~1.3 s at 10,000, while Optuna recommends TPE for 100-1,000). Up to `window` finished trials this is
Optuna's TPE exactly. Beyond, it fits its models on
- the best trials of the whole search, as many as TPE counts as good among `window` trials (its gamma:
  a tenth, at most 25 on one objective), ranked as TPE ranks them (Optuna's own split: completed trials
  by value or Pareto rank, then pruned ones by how far they got): on one objective and a window of 250
  or more, the very trials TPE would count as good among all;
- the `window` most recent finished trials: the model of the others, where TPE's weights already
  fade the older trials;
- the running ones (Optuna's constant liar).
Its groups of parameters (group=True) are Optuna's too, each finished trial added once rather than all
of them at every ask (the groups only ever split as trials come, so that is the same decomposition).
Reaches Optuna's private `Study._get_trials` (which TPE reads the trials with) and `_split_trials`;
tests/test_windowed_tpe.py fails when an Optuna upgrade moves them.
"""

from __future__ import annotations

import copy
from collections.abc import Container
from typing import Any

import optuna
from optuna.samplers._tpe.sampler import _split_trials, default_gamma, default_gamma_multiobjective
from optuna.trial import FrozenTrial, TrialState

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # the trials TPE learns from


class WindowedTPESampler(optuna.samplers.TPESampler):
    """TPESampler(**options) that learns from the best trials and the `window` most recent ones."""

    def __init__(self, *, window: int, **options: Any) -> None:
        super().__init__(**options)
        self.window = window
        self._best: list[FrozenTrial] = []  # the best finished trials so far, TPE's ranking
        self._finished: list[int] = []  # numbers of the finished trials (ranked into _best, grouped), in order
        self._looked = 0  # the trials numbered below this were looked at before...
        self._unsettled: list[int] = []  # ...and these of them were not over yet (running, waiting)
        self._new: list[FrozenTrial] = []  # the trials that finished since the last trial's window
        self._window_of: tuple[int, list[FrozenTrial] | None] = (-1, None)  # (trial number, its window)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        windowed = self._windowed(study, trial)
        if self._group:  # Optuna's decomposition accumulates: it need only see the trials it has not seen
            return super().infer_relative_search_space(Window(study, self._new), trial)
        return super().infer_relative_search_space(windowed, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return super().sample_relative(self._windowed(study, trial), trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: Any) -> Any:
        return super().sample_independent(self._windowed(study, trial), trial, param_name, param_distribution)

    def good_count(self, study: optuna.Study) -> int:
        """How many of the best trials the window keeps: as many as TPE counts as good among `window`."""
        gamma = self._gamma or (default_gamma if len(study.directions) == 1 else default_gamma_multiobjective)
        return gamma(self.window)

    def _windowed(self, study: optuna.Study, trial: FrozenTrial) -> Any:
        """The study as this trial's sampling sees it: its window is chosen once per trial (an ask)."""
        if self._window_of[0] != trial.number:
            self._window_of = (trial.number, self._choose(study))
        kept = self._window_of[1]
        return study if kept is None else Window(study, kept)

    def _choose(self, study: optuna.Study) -> list[FrozenTrial] | None:
        """The trials in the window, or None where every trial is. Only the trials not over at the last
        ask and the new ones are looked at (reading every trial at each ask cost ~10 ms at 3,000 trials):
        Optuna numbers a study's trials 0, 1, 2... and lists them in that order, so a number is a place."""
        trials = study._get_trials(deepcopy=False, use_cache=False)
        if trials and trials[-1].number != len(trials) - 1:
            raise RuntimeError("Optuna no longer lists a study's trials by number: windowed_tpe must read them all")
        looking = [*self._unsettled, *range(self._looked, len(trials))]  # in order
        self._looked, self._unsettled, new = len(trials), [], []
        for number in looking:
            state = trials[number].state
            if state in FINISHED:
                new.append(number)
            elif state != TrialState.FAIL:  # running or waiting: looked at again at the next ask
                self._unsettled.append(number)
        self._new = [trials[number] for number in new]
        if new:  # the best of all = the best of (the best so far and the newly finished)
            self._best = _split_trials(study, self._best + self._new, self.good_count(study))[0]
            self._finished = sorted(self._finished + new)
        if len(self._finished) <= self.window + len(self._best):
            return None
        kept = set(self._finished[-self.window:]) | {t.number for t in self._best}
        kept |= {number for number in self._unsettled if trials[number].state == TrialState.RUNNING}
        return [trials[number] for number in sorted(kept)]


class Window:
    """A study whose trials (as `_get_trials` lists them) are a chosen few; all else is the study's."""

    def __init__(self, study: optuna.Study, trials: list[FrozenTrial]):
        self._study, self._trials = study, trials

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None,
                    use_cache: bool = False) -> list[FrozenTrial]:
        trials = self._trials if states is None else [t for t in self._trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials
