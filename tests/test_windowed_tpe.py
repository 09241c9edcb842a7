"""TPE over a window of the trials (aesearch.search.windowed_tpe): what it fits, and that it still searches."""

import numpy as np
import optuna
import pytest
from optuna.samplers._tpe.parzen_estimator import _ParzenEstimator

from aesearch.errors import ConfigError
from aesearch.search.driver import sampler_for
from aesearch.search.space import DefineByRun, parse_space
from aesearch.search.windowed_tpe import WindowedTPESampler

SPACE = {"name": "s", "space": {"optimizer.lr": {"type": "float", "low": 0.0001, "high": 0.1, "log": True},
                                "model.latent_dim": {"type": "int", "low": 2, "high": 64}}}


class Fitted(_ParzenEstimator):
    """Optuna's Parzen estimator (the class TPE lets a user replace), noting the observations it is fitted on."""

    seen: list[dict[str, np.ndarray]] = []

    def __init__(self, observations, *args, **kwargs):
        Fitted.seen.append(observations)
        super().__init__(observations, *args, **kwargs)


def test_beyond_its_window_tpe_fits_on_the_best_trials_and_the_latest_only():
    space = parse_space({**SPACE, "tpe_window": 250})
    sampler = sampler_for(space)  # as a search builds it
    sampler._parzen_estimator_cls = Fitted
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    define, running = DefineByRun(space), []
    for number in range(400):  # drawn at random (cheap); the best of all is an early one
        trial = study.ask()
        define(trial)
        study.tell(trial, -1.0 if number == 7 else float(number % 50))
    best_lr = study.trials[7].params["optimizer.lr"]
    for _ in range(3):  # pending trials, as Tune keeps them: TPE's constant liar counts them
        running.append(study.ask())
        define(running[-1])
    study.sampler = sampler
    Fitted.seen.clear()
    trial = study.ask()
    define(trial)
    below, above = Fitted.seen[0], Fitted.seen[1]  # one group (both parameters): its two estimators
    count = len(below["optimizer.lr"]) + len(above["optimizer.lr"])
    assert count <= 250 + sampler.good_count(study) + len(running)  # not the 400 finished trials
    assert len(below["optimizer.lr"]) == 25  # the good ones: as many as TPE takes on every trial...
    assert best_lr in below["optimizer.lr"]  # ...the best of all among them, old as it is
    assert 400 - 250 <= min(t.number for t in study.trials if t.state.is_finished()  # and the latest
                            and t.params["optimizer.lr"] in above["optimizer.lr"])


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # group=True, as driver.tpe sets it
def test_within_its_window_it_is_optunas_tpe_exactly():
    def objective(trial):  # conditional parameters: TPE samples them in groups, as a search's TPE does
        x = trial.suggest_float("x", -5, 5) if trial.suggest_categorical("k", ["x", "n"]) == "x" else 0.0
        return (x - 1) ** 2 + trial.suggest_int("n", 0, 9)

    def suggestions(sampler):  # four trials pending at a time, as Tune keeps several
        study, pending = optuna.create_study(sampler=sampler), []
        for _ in range(80):
            pending.append(study.ask())
            objective(pending[-1])
            if len(pending) == 4:
                for trial in pending:
                    study.tell(trial, objective(optuna.trial.FixedTrial(trial.params)))
                pending = []
        return [t.params for t in study.trials]

    options = {"seed": 3, "multivariate": True, "group": True}
    assert suggestions(WindowedTPESampler(window=80, **options)) == suggestions(optuna.samplers.TPESampler(**options))


def test_windowed_tpe_still_converges_on_a_toy_objective():
    def best(sampler):
        study = optuna.create_study(sampler=sampler)
        study.optimize(lambda t: (t.suggest_float("x", -10, 10) - 3) ** 2 + (t.suggest_float("y", -10, 10) + 1) ** 2,
                       n_trials=400)
        return study.best_value

    windowed = best(WindowedTPESampler(window=50, seed=0, multivariate=True))  # 8 times its window
    assert windowed < 0.05 and windowed < best(optuna.samplers.RandomSampler(seed=0)) / 4


def test_the_window_is_a_setting_of_the_space():
    assert sampler_for(parse_space({**SPACE, "tpe_window": 300})).window == 300
    several = parse_space({**SPACE, "objective": [{"metric": "val/recon_mse"}, {"metric": "model/latent_dim"}],
                           "tpe_window": 200})
    assert sampler_for(several).window == 200
    with pytest.raises(ConfigError, match=r"tpe_window.*100"):
        parse_space({**SPACE, "tpe_window": 10})


def test_its_window_is_the_one_that_reading_every_trial_at_each_ask_would_choose():
    """The window is chosen from the trials that were not over at the last ask and the new ones only
    (reading every trial at each ask grew with the search): the same trials, in the same order, as the
    rule read plainly over every trial, through trials that complete, are pruned, fail or run long."""
    from optuna.samplers._tpe.sampler import _split_trials

    from aesearch.search.windowed_tpe import FINISHED

    def every_trial(sampler, study):
        trials = study._get_trials(deepcopy=False, use_cache=False)
        finished = [t for t in trials if t.state in FINISHED]
        best = _split_trials(study, finished, sampler.good_count(study))[0]
        if len(finished) <= sampler.window + len(best):
            return None
        kept = {t.number for t in finished[-sampler.window:]} | {t.number for t in best}
        return [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING or t.number in kept]

    sampler = WindowedTPESampler(window=100, seed=0)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    rng, running, chosen = np.random.default_rng(0), [], 0
    for number in range(600):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        running.append(trial)
        while len(running) > 8 or (running and rng.random() < 0.5):  # some run long, most end soon
            ending = running.pop(int(rng.integers(len(running))) if rng.random() < 0.8 else 0)
            fate = rng.random()
            if fate < 0.1:
                study.tell(ending, state=optuna.trial.TrialState.FAIL)
            elif fate < 0.3:
                ending.report(float(rng.random()), step=1)
                study.tell(ending, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(ending, float(rng.random()) + number)  # distinct values: one ranking
        if number % 7 == 0:
            window = sampler._choose(study)
            assert (window and [t.number for t in window]) == every_trial(sampler, study), number
            chosen += window is not None
    assert chosen > 50  # most asks past the window's size
