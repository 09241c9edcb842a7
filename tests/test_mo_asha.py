"""MultiObjectiveASHA: Ray's ASHAScheduler's decisions with one metric, Pareto decisions with two, and a real
Tune run in which the dominated trials stop early."""

from __future__ import annotations

import math
import pickle
import sys

import numpy as np
import pytest
import ray
import ray.cloudpickle
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from aesearch.pareto import nondominated_ranks
from aesearch.search.driver import scheduler_for
from aesearch.search.mo_asha import FIFO, MultiObjectiveASHA, SeededASHA, bracket_milestones, pick_bracket
from aesearch.search.space import SearchSpace
from tests.searching import TOGETHER, Together

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def fake_trial() -> Trial:
    return Trial("__fake", stub=True)  # as Ray's own scheduler tests make them


def rays_cutoff_falls_between_neighbours(asha: ASHAScheduler, trial: Trial, result: dict) -> bool:
    """Whether Ray's decision on this result depends on where the value lies between its nearest recorded
    neighbours: Ray's cutoff is a percentile interpolated between two recorded values, and any value in
    (below, above) has the same place among the recorded ones. There no order by rank can follow Ray."""
    if "loss" not in result or result["epoch"] >= asha._max_t:
        return False
    bracket = asha._trial_info[trial.trial_id]
    for milestone, recorded in bracket._rungs:
        if result["epoch"] < milestone or trial.trial_id in recorded:
            continue
        cutoff = bracket.cutoff(recorded)
        if cutoff is None:
            return False
        reward = asha._metric_op * result["loss"]
        below = max((value for value in recorded.values() if value <= reward), default=-math.inf)
        above = min((value for value in recorded.values() if value > reward), default=math.inf)
        return below < cutoff < above
    return False


def drive_both(seed: int, mode: str, grace_period: int, reduction_factor: float, max_t: int, brackets: int = 1,
               trials: int = 80):
    """Run the same asynchronous stream of results through Ray's ASHA (dealing trials to brackets with the seeded
    generator) and ours, trials stopping when Ray says so (Tune then calls on_trial_complete): (Ray's scheduler,
    ours, [(Ray's decision, ours, comparable)], {trial_id: the bracket Ray dealt it to})."""
    rng = np.random.default_rng(seed)
    rungs = dict(max_t=max_t, grace_period=grace_period, reduction_factor=reduction_factor, brackets=brackets,
                 seed=seed)
    asha = SeededASHA(time_attr="epoch", metric="loss", mode=mode, **rungs)
    ours = MultiObjectiveASHA(["loss"], [mode], time_attr="epoch", **rungs)
    waiting = [fake_trial() for _ in range(trials)]
    quality = {trial.trial_id: rng.normal() for trial in waiting}
    epochs: dict[Trial, int] = {}
    decisions, dealt = [], {}
    while waiting or epochs:
        if waiting and (not epochs or rng.random() < 0.3):
            trial = waiting.pop()
            asha.on_trial_add(None, trial)
            ours.on_trial_add(None, trial)
            dealt[trial.trial_id] = asha._brackets.index(asha._trial_info[trial.trial_id])
            epochs[trial] = 0
            continue
        trial = list(epochs)[rng.integers(len(epochs))]
        epochs[trial] += 2 if rng.random() < 0.1 else 1  # now and then a rung is skipped
        loss = round(quality[trial.trial_id] + rng.normal(scale=0.5) + 3 / epochs[trial], 1)  # ties, too
        result = {"epoch": epochs[trial], "loss": loss} if rng.random() > 0.03 else {"epoch": epochs[trial]}
        comparable = not rays_cutoff_falls_between_neighbours(asha, trial, result)
        rays, mine = asha.on_trial_result(None, trial, result), ours.on_trial_result(None, trial, result)
        decisions.append((rays, mine, comparable))
        if rays == STOP:
            asha.on_trial_complete(None, trial, result)
            ours.on_trial_complete(None, trial, result)
            del epochs[trial]
    return asha, ours, decisions, dealt


@pytest.mark.parametrize("seed, mode, grace_period, reduction_factor, max_t, brackets",
                         [(1, "min", 1, 3.0, 27, 1), (2, "max", 2, 2.0, 20, 1), (3, "min", 1, 4, 64, 1),
                          (4, "max", 3, 3, 30, 1), (5, "min", 1, 1.5, 20, 1), (6, "min", 1, 3.0, 30, 3),
                          (7, "max", 1, 2.0, 16, 4)])
def test_one_metric_takes_rays_asha_decisions(seed, mode, grace_period, reduction_factor, max_t, brackets):
    asha, ours, decisions, dealt = drive_both(seed, mode, grace_period, reduction_factor, max_t, brackets)
    compared = [(rays, mine) for rays, mine, comparable in decisions if comparable]
    assert len(compared) > 0.85 * len(decisions) and len(decisions) > 300
    assert [rays for rays, _ in compared].count(STOP) > 30  # both kinds of decision are checked
    assert [mine for _, mine in compared] == [rays for rays, _ in compared]
    # the same trials dealt to the same brackets, whose rungs hold the same trials and values
    assert dealt == ours._bracket_of and len(set(dealt.values())) == brackets
    for rays_bracket, our_rungs in zip(asha._brackets, ours._brackets, strict=True):
        assert [milestone for milestone, _ in our_rungs] == [milestone for milestone, _ in rays_bracket._rungs]
        for (_, mine), (_, rays) in zip(our_rungs, rays_bracket._rungs, strict=True):
            assert {trial_id: asha._metric_op * vector[0] for trial_id, vector in mine.items()} == rays


def test_trials_are_dealt_to_brackets_by_rays_rule_and_alike_for_one_seed():
    # 3 brackets of 4, 3 and 2 rungs (epochs 1-3-9-27, 3-9-27, 9-27 of 30): softmax weights 67%, 24%, 9%.
    assert [bracket_milestones(1, 30, 3, s) for s in range(3)] == [[27, 9, 3, 1], [27, 9, 3], [27, 9]]
    rng = np.random.default_rng(0)
    picks = [pick_bracket([4, 3, 2], rng) for _ in range(3000)]
    shares = np.bincount(picks, minlength=3) / len(picks)
    assert shares == pytest.approx([0.665, 0.245, 0.090], abs=0.03)
    again = np.random.default_rng(0)
    assert [pick_bracket([4, 3, 2], again) for _ in range(3000)] == picks
    assert pick_bracket([4], rng) == 0


def test_where_ray_interpolates_the_order_decides():
    # Ray's cutoff for recorded losses 0 and 1 at reduction factor 3 is 2/3 of the way to the better one: 0.33.
    # A loss of 0.2 continues and 0.5 stops under Ray; both are second of three here, and only the first goes on.
    for loss, rays_decision in ((0.2, CONTINUE), (0.5, STOP)):
        asha = ASHAScheduler(time_attr="epoch", metric="loss", mode="min", max_t=9, reduction_factor=3)
        ours = MultiObjectiveASHA(["loss"], ["min"], max_t=9, reduction_factor=3)
        for earlier in (1.0, 0.0):
            trial = fake_trial()
            for scheduler in (asha, ours):
                scheduler.on_trial_add(None, trial)
                assert scheduler.on_trial_result(None, trial, {"epoch": 1, "loss": earlier}) == CONTINUE
        trial = fake_trial()
        asha.on_trial_add(None, trial)
        assert asha.on_trial_result(None, trial, {"epoch": 1, "loss": loss}) == rays_decision
        assert ours.on_trial_result(None, trial, {"epoch": 1, "loss": loss}) == STOP


def test_two_metrics_stop_a_dominated_trial_and_keep_one_on_the_front():
    scheduler = MultiObjectiveASHA(["loss", "accuracy"], ["min", "max"], max_t=9, grace_period=1, reduction_factor=3)
    asha = ASHAScheduler(time_attr="epoch", metric="loss", mode="min", max_t=9, grace_period=1, reduction_factor=3)
    steps = [((1.0, 0.5), CONTINUE),  # the first at the rung
             ((5.0, 0.9), CONTINUE),  # worse loss, better accuracy: on the front, and an end of it
             ((6.0, 0.4), STOP),  # dominated by both
             ((0.5, 0.3), CONTINUE),  # the best loss: a new end of the front
             ((2.0, 0.6), STOP)]  # on the front, but between the ends (crowding) and only 2 of 5 go on
    for (loss, accuracy), expected in steps:
        trial = fake_trial()
        asha.on_trial_add(None, trial)
        result = {"epoch": 1, "loss": loss, "accuracy": accuracy}
        assert scheduler.on_trial_result(None, trial, result) == expected, (loss, accuracy)
        if (loss, accuracy) == (5.0, 0.9):  # Ray's ASHA, on the loss alone, stops it
            assert asha.on_trial_result(None, trial, result) == STOP
        else:
            asha.on_trial_result(None, trial, result)
    assert "num_stopped=2" in scheduler.debug_string()


def test_max_t_missing_metrics_and_completion():
    scheduler = MultiObjectiveASHA(["loss", "size"], ["min", "min"], max_t=9, grace_period=1, reduction_factor=3)
    assert [milestone for milestone, _ in scheduler._rungs] == [9, 3, 1]
    first, second = fake_trial(), fake_trial()
    assert scheduler.on_trial_result(None, first, {"epoch": 1, "loss": 1.0}) == CONTINUE  # no size: no decision
    assert all(not recorded for _, recorded in scheduler._rungs)
    assert scheduler.on_trial_result(None, first, {"epoch": 3, "loss": 1.0, "size": 1.0}) == CONTINUE
    assert scheduler.on_trial_result(None, first, {"epoch": 9, "loss": 9.0, "size": 9.0}) == STOP  # max_t
    scheduler.on_trial_complete(None, first, {"epoch": 9, "loss": 9.0, "size": 9.0})
    assert scheduler._rungs[0][1] == {first.trial_id: (9.0, 9.0)}  # recorded at the top rung
    # skipping to epoch 5 records at rung 3, where the first trial's (1, 1) dominates it; its next result (here
    # the final one) records it at rung 1, which it skipped, as Ray's ASHA does
    assert scheduler.on_trial_result(None, second, {"epoch": 5, "loss": 2.0, "size": 2.0}) == STOP
    scheduler.on_trial_complete(None, second, {"epoch": 5, "loss": 2.0, "size": 2.0})
    assert scheduler._rungs[1][1] == {first.trial_id: (1.0, 1.0), second.trial_id: (2.0, 2.0)}
    assert scheduler._rungs[2][1] == {second.trial_id: (2.0, 2.0)}


def test_a_nan_result_is_ranked_last_and_ignored_by_later_decisions():
    scheduler = MultiObjectiveASHA(["loss", "size"], ["min", "min"], max_t=9, grace_period=1, reduction_factor=3)
    diverged, steady, diverged_later = fake_trial(), fake_trial(), fake_trial()
    assert scheduler.on_trial_result(None, diverged, {"epoch": 1, "loss": float("nan"), "size": 1.0}) == CONTINUE
    assert scheduler.on_trial_result(None, steady, {"epoch": 1, "loss": 9.0, "size": 9.0}) == CONTINUE
    assert scheduler.on_trial_result(None, diverged_later, {"epoch": 1, "loss": None, "size": 0.0}) == STOP
    assert len(scheduler._rungs[-1][1]) == 3


def test_search_properties_saving_and_pickling(tmp_path):
    scheduler = MultiObjectiveASHA(["loss", "size"], ["min", "min"], max_t=9)
    assert scheduler.set_search_properties(None, None) is True
    assert scheduler.set_search_properties("loss", "min") is False
    assert scheduler.set_search_properties(None, "min") is False
    assert scheduler.metric is None  # Tune checks a scheduler's single metric in every result; there is none
    with pytest.raises(ValueError):
        MultiObjectiveASHA(["loss", "size"], ["min"])
    with pytest.raises(ValueError):
        MultiObjectiveASHA(["loss"], ["min"], max_t=3, grace_period=5)
    trial = fake_trial()
    scheduler.on_trial_result(None, trial, {"epoch": 1, "loss": 1.0, "size": 1.0})
    scheduler.save(str(tmp_path / "scheduler.pkl"))
    restored = MultiObjectiveASHA(["other"], ["max"])
    restored.restore(str(tmp_path / "scheduler.pkl"))
    copied = ray.cloudpickle.loads(ray.cloudpickle.dumps(scheduler))  # as Tuner.restore brings it back
    for same in (restored, copied, pickle.loads(pickle.dumps(scheduler))):
        assert same._rungs == scheduler._rungs and same._metrics == ["loss", "size"]
        assert same.on_trial_result(None, fake_trial(), {"epoch": 1, "loss": 2.0, "size": 2.0}) == STOP


def simulated_search(space: SearchSpace, seed: int) -> list[tuple[int, float, int]]:
    """The search's trials, two at a time, through the scheduler the search builds for `space`, on synthetic
    curves of reconstruction error: a larger code reconstructs better, each trial has its own quality (its
    learning rate, its shape) and speed (slow starters look bad early and end well). (epochs trained, last
    error, code size) per trial."""
    rng = np.random.default_rng(seed)
    scheduler = scheduler_for(space)
    max_t, metric = space.budget.max_epochs, space.primary.metric
    trials = [fake_trial() for _ in range(space.budget.num_samples)]
    size = {t.trial_id: int(np.exp(rng.uniform(np.log(2), np.log(64)))) for t in trials}
    quality = {t.trial_id: np.exp(rng.normal(0, 0.3)) for t in trials}
    speed = {t.trial_id: 3 * np.exp(rng.normal(0, 0.7)) for t in trials}
    running: dict[Trial, int] = {}
    ended = []
    while trials or running:
        while trials and len(running) < 2:
            trial = trials.pop(0)
            scheduler.on_trial_add(None, trial)
            running[trial] = 0
        trial = list(running)[rng.integers(len(running))]
        running[trial] += 1
        epoch, key = running[trial], trial.trial_id
        result = {"epoch": epoch, "model/latent_dim": size[key],
                  metric: 0.08 * size[key] ** -0.5 * quality[key] * (1 + speed[key] / epoch)}
        if scheduler.on_trial_result(None, trial, result) == STOP:
            scheduler.on_trial_complete(None, trial, result)
            ended.append((epoch, result[metric], size[key]))
            del running[trial]
    return ended


def test_a_compression_search_of_the_documented_size_trains_every_code_size_long_enough_to_be_judged():
    # `use: compression` as the docs run it: 10 trials of the default 10 epochs. MO-ASHA's judgement of a trial at
    # epoch 1 says little, and the front holds only trials that ran to the end: with the schema's grace period
    # of 1 and reduction factor of 3, a code size stopped after one epoch never shows what it costs.
    space = SearchSpace.model_validate({"name": "squeeze", "use": "compression", "budget": {"num_samples": 10}})
    max_t = space.budget.max_epochs
    searches = [simulated_search(space, seed) for seed in range(20)]
    assert min(epochs for ended in searches for epochs, _, _ in ended) >= max_t // 2
    ranked = [sum(epochs == max_t for epochs, _, _ in ended) for ended in searches]
    assert np.mean(ranked) >= 0.5 * space.budget.num_samples  # half the trials, on average, reach the front's table
    for ended in searches:
        points = np.array([(error, size) for epochs, error, size in ended if epochs == max_t])
        assert (nondominated_ranks(points, ["min", "min"]) == 1).sum() >= 2  # a front, not a point
    # the file's own budget wins; the first rung follows a changed epoch budget (`--max-epochs 40`)
    assert SearchSpace.model_validate({"name": "s", "use": "compression",
                                       "budget": {"grace_period": 1}}).budget.grace_period == 1
    assert SearchSpace.model_validate({"name": "s", "use": "compression",
                                       "budget": {"max_epochs": 40}}).budget.grace_period == 20


# A real Tune run, in a process of its own (Ray reads its token settings once, when imported): four
# configs with fixed curves, run one at a time in grid order so that the rungs fill the same way every time.
TUNE_RUN = """
import json, sys
import ray
from ray import tune
from aesearch.search.mo_asha import FIFO, MultiObjectiveASHA, SeededASHA, bracket_milestones, pick_bracket

curves = {"front_loss": (1.0, 4.0), "front_size": (4.0, 1.0), "dominated": (5.0, 5.0), "worst": (6.0, 6.0)}

def synthetic(config):
    loss, size = curves[config["curve"]]
    for epoch in range(1, 10):
        tune.report({"epoch": epoch, "loss": loss * (1 + 1 / epoch), "size": size})

with ray.init(address=sys.argv[2], _node_ip_address="127.0.0.1"):  # the Ray instance the tests share
    scheduler = MultiObjectiveASHA(["loss", "size"], ["min", "min"], max_t=9, grace_period=1, reduction_factor=3)
    tuner = tune.Tuner(
        synthetic,
        param_space={"curve": tune.grid_search(list(curves))},
        tune_config=tune.TuneConfig(scheduler=scheduler, num_samples=1, max_concurrent_trials=1),
        run_config=tune.RunConfig(name="mo_asha", storage_path=sys.argv[1], verbose=0),
    )
    results = tuner.fit()
    print(json.dumps({"errors": len(results.errors),
                      "epochs": {r.config["curve"]: r.metrics["epoch"] for r in results}}))
"""


# Run with other modules' searches, on the Ray instance the tests share.
TOGETHER["mo_asha"] = lambda folder, address: Together(
    [sys.executable, "-c", TUNE_RUN, str(folder / "results"), address])


def test_a_tune_run_stops_the_dominated_trials_early(together):
    """The two configs on the front run to max_t; the two dominated at every epoch stop at the first rung."""
    import json

    folder, done = together["mo_asha"]
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome == {"errors": 0, "epochs": {"front_loss": 9, "front_size": 9, "dominated": 1, "worst": 1}}
    # Tuner.restore takes the scheduler from tuner.pkl, pickled as the Tuner was made (rungs empty)
    tuner_state = ray.cloudpickle.loads((folder / "results" / "mo_asha" / "tuner.pkl").read_bytes())
    restored = tuner_state["_tune_config"].scheduler
    assert isinstance(restored, MultiObjectiveASHA) and all(not recorded for _, recorded in restored._rungs)


def test_the_next_trial_to_run_is_fifos_read_from_the_first_trial_that_has_not_ended():
    """Ray's FIFOScheduler reads every trial at each step of Tune's loop; a search's schedulers skip the
    trials that ended before the first one that has not, and choose as FIFO does."""
    class Read:  # a trial whose status is counted as it is read
        reads = 0

        def __init__(self, status):
            self._status = status

        @property
        def status(self):
            Read.reads += 1
            return self._status

    class Controller:
        def __init__(self, trials):
            self.trials = trials

        def get_trials(self):
            return self.trials

    ended = [Read(Trial.TERMINATED) for _ in range(1000)] + [Read(Trial.ERROR)]
    straggler, waiting, paused = Read(Trial.RUNNING), Read(Trial.PENDING), Read(Trial.PAUSED)
    controller = Controller([*ended, straggler, Read(Trial.TERMINATED), paused, waiting])
    for scheduler in (FIFO(), SeededASHA(seed=0, metric="m", mode="min"),
                      MultiObjectiveASHA(["a", "b"], ["min", "min"])):
        assert scheduler.choose_trial_to_run(controller) is waiting  # PENDING first, as FIFO
        Read.reads = 0
        assert scheduler.choose_trial_to_run(controller) is waiting
        assert Read.reads <= 5  # not the 1,001 that ended before the straggler
    waiting._status = Trial.RUNNING
    assert FIFO().choose_trial_to_run(controller) is paused  # then the first PAUSED
    straggler._status = paused._status = Trial.TERMINATED
    assert FIFO().choose_trial_to_run(controller) is None
