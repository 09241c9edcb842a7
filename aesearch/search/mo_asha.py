"""Asynchronous successive halving over several metrics at once (MO-ASHA: Schmucker et al. 2021,
"Multi-objective Asynchronous Successive Halving", as in Syne Tune's MOASHA).

Ray's ASHAScheduler ranks trials at a rung by one metric; when a search trades metrics off (reconstruction error
against latent size, say) that one metric would stop trials on the Pareto front. This scheduler keeps Ray's
bookkeeping (one bracket, the same rung milestones, stopping rather than pausing) and ranks the vectors recorded
at a rung with `aesearch.pareto.pareto_order` instead: by non-dominated front, then crowding distance.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from aesearch.pareto import MODES, pareto_order


class MultiObjectiveASHA(FIFOScheduler):
    """Stops a trial at a rung unless its metric vector, in Pareto order among the vectors recorded there so
    far, is within the best 1/reduction_factor of them (where Ray's percentile cutoff would fall).

    With one metric it takes Ray's ASHAScheduler's decisions (brackets=1, the same
    grace_period and max_t) except where Ray's cutoff, a percentile interpolated between two recorded values,
    falls strictly between the trial's value and the recorded values nearest it: there Ray compares values, which
    no order by rank can do (about 1% of decisions in tests/test_mo_asha.py, half of them different).

    The metrics and modes are fixed here: `tune.TuneConfig` must not also be given a metric or mode, as with any
    of Ray's schedulers built with their own.
    """

    def __init__(self, metrics: list[str], modes: list[str], time_attr: str = "epoch", max_t: int = 100,
                 grace_period: int = 1, reduction_factor: float = 3.0):
        if not metrics or len(metrics) != len(modes):
            raise ValueError(f"one mode per metric is needed, got metrics {metrics!r} and modes {modes!r}")
        if any(mode not in MODES for mode in modes):
            raise ValueError(f"modes must be 'min' or 'max', got {modes!r}")
        if not 0 < grace_period <= max_t:
            raise ValueError(f"need 0 < grace_period <= max_t, got grace_period={grace_period}, max_t={max_t}")
        if not reduction_factor > 1:
            raise ValueError(f"reduction_factor must be > 1, got {reduction_factor}")
        super().__init__()
        self._metrics, self._modes = list(metrics), list(modes)
        self._time_attr, self._max_t, self._reduction_factor = time_attr, max_t, reduction_factor
        # Ray's _Bracket (s=0) milestones, highest first, each with {trial_id: metric vector recorded there}.
        rung_count = int(np.log(max_t / grace_period) / np.log(reduction_factor) + 1)
        self._rungs: list[tuple[float, dict[str, tuple[float, ...]]]] = [
            (grace_period * reduction_factor**k, {}) for k in reversed(range(rung_count))
        ]
        self._num_stopped = 0

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        """Tune passes TuneConfig's metric and mode here; refuse them (Tune then raises), as Ray's schedulers do
        when built with their own, since ours are fixed by the constructor. None of either is accepted."""
        return not metric and not mode

    def on_trial_add(self, tune_controller, trial) -> None:
        """Nothing to set up: one bracket holds every trial (Ray's ASHA picks a bracket here)."""

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
        rungs = " | ".join(f"{self._time_attr} {milestone:g}: {len(recorded)} recorded"
                           for milestone, recorded in self._rungs)
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
        (Ray's _Bracket.on_result); CONTINUE between rungs."""
        for milestone, recorded in self._rungs:
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
