"""Asynchronous successive halving over several metrics at once (MO-ASHA: Schmucker et al. 2021,
"Multi-objective Asynchronous Successive Halving", as in Syne Tune's MOASHA).

Ray's ASHAScheduler ranks trials at a rung by one metric; when a search trades metrics off (reconstruction error
against latent size, say) that one metric would stop trials on the Pareto front. This scheduler keeps Ray's
bookkeeping (its brackets and rung milestones, stopping rather than pausing) and ranks the vectors recorded
at a rung with `aesearch.pareto.pareto_order` instead: by non-dominated front, then crowding distance.

Brackets (Hyperband's hedge, as in Ray's ASHA): bracket s starts its rungs at grace_period * reduction_factor**s,
so the trials dealt to it are first judged later, sparing some of the models that learn slowly but end best.
`SeededASHA` is Ray's single-objective ASHA dealing its trials to brackets with a seeded generator.
Every scheduler of a search (`FIFO` where nothing stops early) picks the next trial to run as Ray's
FIFOScheduler does, without reading again the trials that ended (`SkipsEndedTrials`).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from aesearch.metrics import DIRECTIONS
from aesearch.pareto import pareto_order


def bracket_milestones(grace_period: int, max_t: int, reduction_factor: float, s: int) -> list[float]:
    """The rung milestones of bracket s, highest first, as Ray's _Bracket makes them."""
    count = int(np.log(max_t / grace_period) / np.log(reduction_factor) - s + 1)
    return [grace_period * reduction_factor ** (k + s) for k in reversed(range(count))]


def pick_bracket(rung_counts: Sequence[int], rng: np.random.Generator) -> int:
    """Ray's rule for dealing a new trial to a bracket: a softmax over the brackets' rung counts (with 3 brackets
    of 4, 3 and 2 rungs: 67%, 24%, 9%), drawn from our own generator."""
    if len(rung_counts) == 1:
        return 0
    sizes = np.asarray(rung_counts, dtype=float)
    weights = np.exp(sizes - sizes.max())
    return int(rng.choice(len(sizes), p=weights / weights.sum()))


class SkipsEndedTrials:
    """FIFO's choice of the next trial to run (the first PENDING trial, else the first PAUSED one, in the
    order the trials were made), reading only from the first trial that has not ended: Ray's
    FIFOScheduler reads every trial of the search at each step of Tune's loop (a fifth of the driver's
    CPU at ~3,000 trials, scale.py's profile). A trial TERMINATED or ERROR never runs again in the same
    Tune run (a retried trial goes from RUNNING back to PENDING; a resumed search makes a new scheduler)."""

    _ended_before = 0  # the trials before this position in Tune's list have all ended

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        trials = tune_controller.get_trials()
        while self._ended_before < len(trials) and trials[self._ended_before].status in (Trial.TERMINATED,
                                                                                          Trial.ERROR):
            self._ended_before += 1
        for wanted in (Trial.PENDING, Trial.PAUSED):
            for position in range(self._ended_before, len(trials)):
                if trials[position].status == wanted:
                    return trials[position]
        return None


class FIFO(SkipsEndedTrials, FIFOScheduler):
    """Ray's FIFOScheduler (a search where nothing stops early)."""


class SeededASHA(SkipsEndedTrials, ASHAScheduler):
    """Ray's ASHAScheduler, but a trial's bracket is drawn from a generator seeded with the search's seed (Ray's
    draws from NumPy's global one), so that a search deals its trials to brackets alike every time. The generator
    is pickled with the scheduler, so a resumed search goes on drawing where it stopped."""

    def __init__(self, *, seed: int, **options):
        super().__init__(**options)
        self._rng = np.random.default_rng(seed)

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)  # checks the metric, then deals with the global generator
        rung_counts = [len(bracket._rungs) for bracket in self._brackets]
        self._trial_info[trial.trial_id] = self._brackets[pick_bracket(rung_counts, self._rng)]


class MultiObjectiveASHA(SkipsEndedTrials, FIFOScheduler):
    """Stops a trial at a rung unless its metric vector, in Pareto order among the vectors recorded there so
    far, is within the best 1/reduction_factor of them (where Ray's percentile cutoff would fall).

    With one metric it takes Ray's ASHAScheduler's decisions (the same brackets, grace_period and max_t, each trial
    dealt to the same bracket as SeededASHA deals it) except where Ray's cutoff, a percentile interpolated between
    two recorded values, falls strictly between the trial's value and the recorded values nearest it: there Ray
    compares values, which no order by rank can do (about 1% of decisions in tests/test_mo_asha.py, half of them
    different).

    The metrics and modes are fixed here: `tune.TuneConfig` must not also be given a metric or mode, as with any
    of Ray's schedulers built with their own.
    """

    def __init__(self, metrics: list[str], modes: list[str], time_attr: str = "epoch", max_t: int = 100,
                 grace_period: int = 1, reduction_factor: float = 3.0, brackets: int = 1, seed: int = 0):
        if not metrics or len(metrics) != len(modes):
            raise ValueError(f"one mode per metric is needed, got metrics {metrics!r} and modes {modes!r}")
        if any(mode not in DIRECTIONS for mode in modes):
            raise ValueError(f"modes must be {' or '.join(DIRECTIONS)}, got {modes!r}")
        if not 0 < grace_period <= max_t:
            raise ValueError(f"need 0 < grace_period <= max_t, got grace_period={grace_period}, max_t={max_t}")
        if not reduction_factor > 1:
            raise ValueError(f"reduction_factor must be > 1, got {reduction_factor}")
        if brackets < 1:
            raise ValueError(f"brackets must be >= 1, got {brackets}")
        super().__init__()
        self._metrics, self._modes = list(metrics), list(modes)
        self._time_attr, self._max_t, self._reduction_factor = time_attr, max_t, reduction_factor
        # Per bracket, Ray's _Bracket milestones, highest first, each with {trial_id: metric vector recorded there}.
        self._brackets: list[list[tuple[float, dict[str, tuple[float, ...]]]]] = [
            [(milestone, {}) for milestone in bracket_milestones(grace_period, max_t, reduction_factor, s)]
            for s in range(brackets)
        ]
        self._bracket_of: dict[str, int] = {}
        self._rng = np.random.default_rng(seed)
        self._num_stopped = 0

    @property
    def _rungs(self) -> list[tuple[float, dict[str, tuple[float, ...]]]]:
        """The first bracket's rungs (all of them, with one bracket)."""
        return self._brackets[0]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        """Tune passes TuneConfig's metric and mode here; refuse them (Tune then raises), as Ray's schedulers do
        when built with their own, since ours are fixed by the constructor. None of either is accepted."""
        return not metric and not mode

    def on_trial_add(self, tune_controller, trial) -> None:
        """Deal the trial to a bracket, by Ray's rule."""
        self._bracket_of[trial.trial_id] = pick_bracket([len(rungs) for rungs in self._brackets], self._rng)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        """STOP at max_t, or at a rung where the trial is not in the top 1/reduction_factor; else CONTINUE.
        A result without the time attribute or one of the metrics decides nothing, as in Ray's ASHA."""
        vector = self._vector(result)
        if vector is None:
            return TrialScheduler.CONTINUE
        if result[self._time_attr] >= self._max_t:
            action = TrialScheduler.STOP
        else:
            action = self._record(trial.trial_id, result[self._time_attr], vector)
        if action == TrialScheduler.STOP:
            self._num_stopped += 1
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        """Record the final result at its rung (the top rung for a trial that reached max_t), as Ray does, so
        that later trials are compared with it."""
        vector = self._vector(result)
        if vector is not None:
            self._record(trial.trial_id, result[self._time_attr], vector)

    def on_trial_remove(self, tune_controller, trial) -> None:
        """Nothing to forget: what a removed trial recorded at its rungs stays, as in Ray's ASHA."""

    def debug_string(self) -> str:
        rungs = " || ".join(" | ".join(f"{self._time_attr} {milestone:g}: {len(recorded)} recorded"
                                       for milestone, recorded in bracket) for bracket in self._brackets)
        return f"Using MultiObjectiveASHA: num_stopped={self._num_stopped}\nRungs: {rungs}"

    def save(self, checkpoint_path: str) -> None:
        """The whole state, as Ray's ASHA saves it (Tune itself saves schedulers only by pickling the Tuner)."""
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__dict__, file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(pickle.load(file))

    def _vector(self, result: dict) -> tuple[float, ...] | None:
        """The metrics of a result in our order (None, a non-number, becomes NaN), or None if any is missing."""
        if self._time_attr not in result or any(metric not in result for metric in self._metrics):
            return None
        return tuple(np.asarray([result[metric] for metric in self._metrics], dtype=float).tolist())

    def _record(self, trial_id: str, time: float, vector: tuple[float, ...]) -> str:
        """Record the vector at the highest rung the trial has reached and not yet recorded at, and decide there
        (Ray's _Bracket.on_result), in the trial's bracket; CONTINUE between rungs."""
        for milestone, recorded in self._brackets[self._bracket_of.get(trial_id, 0)]:
            if time < milestone or trial_id in recorded:
                continue
            earlier = [other for other in recorded.values() if not np.isnan(other).any()]  # Ray skips NaN too
            recorded[trial_id] = vector
            return TrialScheduler.CONTINUE if self._promotable(vector, earlier) else TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def _promotable(self, vector: tuple[float, ...], earlier: Sequence[tuple[float, ...]]) -> bool:
        """Whether the vector's place in the Pareto order of itself and the earlier vectors is at most
        (len(earlier) - 1) / reduction_factor: where Ray's percentile cutoff (1 - 1/rf of the earlier values)
        falls, so that with one metric the decisions are Ray's for any rf > 1. It goes first in the array so that it wins exact ties (same front and
        crowding distance, as equal values have with one metric), as Ray's `value >= cutoff` does; a NaN vector is
        ranked last."""
        if not earlier:
            return True
        points = np.array([vector, *earlier])
        position = int(np.flatnonzero(pareto_order(points, self._modes) == 0)[0])
        return position <= (len(earlier) - 1) / self._reduction_factor
