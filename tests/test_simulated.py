"""Simulated trials (`simulate:` in a search space): a synthetic learning curve with a known optimum
in place of training, through the real trial function, reporting, checkpoints, retries and MLflow."""

import json
import math
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from aesearch.errors import ConfigError
from aesearch.search.space import parse_space, trial_config
from aesearch.tracking.runs import TRIAL_NUMBER_TAG
from aesearch.training.checkpoints import BEST_CHECKPOINT, load_checkpoint, load_trained_model
from aesearch.training.simulated import Simulation, curve, distance, simulate
from tests.searching import TOGETHER, on_shared_ray, tracking_uri
from tests.test_bad_input import nothing_written, refused

OPTIMUM = {"optimizer.lr": 0.003, "model.latent_dim": 16}  # the default optimum of `simulate:`
SPACE = {
    "name": "simulated",
    "data": {"name": "digits"},
    "base": {"model": {"hidden_dims": [16]}},
    "space": {
        "optimizer.lr": {"type": "float", "low": 0.0001, "high": 0.1, "log": True},
        "model.latent_dim": {"type": "categorical", "choices": [4, 16, 64]},
    },
    "budget": {"num_samples": 6, "max_epochs": 3, "grace_period": 1, "reduction_factor": 2},
    "resources": {"cpu": 0.5},
    "max_concurrent": 2,
    "simulate": {"seconds_per_epoch": 0.05, "noise": 0.0},
}


def space_with(**changes):
    return parse_space({**SPACE, **changes})


def test_the_curve_is_lowest_at_its_stated_optimum_and_falls_with_the_epochs():
    space = space_with()
    assert Simulation().optimum == OPTIMUM
    grid = [{"optimizer.lr": lr, "model.latent_dim": z} for lr in (0.0003, 0.001, 0.003, 0.01, 0.03)
            for z in (4, 8, 16, 32, 64)]
    final = {(p["optimizer.lr"], p["model.latent_dim"]): curve(trial_config(space, p), OPTIMUM, 0.0, 3) for p in grid}
    assert min(final, key=final.get) == (0.003, 16)
    # farther on either axis is worse: a search's best trial is judged by how near it got
    assert final[(0.003, 16)] < final[(0.001, 16)] < final[(0.0003, 16)]
    assert final[(0.003, 16)] < final[(0.003, 32)] < final[(0.003, 64)]
    config = trial_config(space, {"optimizer.lr": 0.01, "model.latent_dim": 4})
    assert distance(config, OPTIMUM) == pytest.approx(math.log(0.01 / 0.003) ** 2 + math.log(4 / 16) ** 2)
    assert [curve(config, OPTIMUM, 0.0, e) for e in (1, 2, 3)] == sorted(
        (curve(config, OPTIMUM, 0.0, e) for e in (1, 2, 3)), reverse=True)


def test_a_simulated_run_resumes_at_its_checkpoint_and_repeats_its_noisy_curve(tmp_path, digits):
    config = trial_config(space_with(), {"optimizer.lr": 0.01, "model.latent_dim": 4})
    ends = []

    def keep(end):
        ends.append(end)
        end.save_checkpoint(tmp_path / f"epoch{end.epoch}.pt")

    noisy = Simulation(seconds_per_epoch=0, noise=0.1)
    whole = simulate(config, digits, keep, noisy)
    assert [e.epoch for e in ends] == [1, 2, 3] and ends[0].model is None and whole.model is None
    state = load_checkpoint(tmp_path / "epoch1.pt")  # the checkpoint a retry after epoch 1 restores
    resumed = []
    again = simulate(config, digits, resumed.append, noisy, resume_from=state)
    assert [e.epoch for e in resumed] == [2, 3]
    assert [h["val/recon_mse"] for h in again.history] == [h["val/recon_mse"] for h in whole.history]
    assert again.best_epoch == whole.best_epoch and again.metrics["test/recon_mse"] == whole.metrics["test/recon_mse"]
    # noise 0.1: the epochs differ from the noiseless curve, by draws that are the config's own
    assert [h["val/recon_mse"] for h in whole.history] != [curve(config, OPTIMUM, 0.0, e) for e in (1, 2, 3)]
    # a checkpoint like any other: it holds a model (its initial weights) that loads and runs
    trained = load_trained_model(tmp_path / "epoch3.pt", data=digits)
    assert trained.model(digits.val_x[:2]).x_hat.shape == digits.val_x[:2].shape


@pytest.mark.parametrize(("simulate", "expected"), [
    ({"seconds_per_epoch": -1}, "simulate.seconds_per_epoch=-1: Input should be greater than or equal to 0"),
    ({"seconds_per_epoch": "fast"}, "simulate.seconds_per_epoch='fast'"),
    ({"noise": 2}, "simulate.noise=2: Input should be less than or equal to 1"),
    ({"optimum": {}}, "simulate.optimum={}"),
    ({"optimum": {"optimizer.learning_rate": 0.01}}, "simulate.optimum: 'optimizer.learning_rate' is not a config field"),
    ({"optimum": {"optimizer.lr": 0}}, "simulate.optimum.optimizer.lr=0: a number must be > 0"),
    ({"speed": 3}, "simulate.speed: unknown key"),
])
def test_a_simulate_section_that_makes_no_sense_is_named_with_its_rule(simulate, expected):
    with pytest.raises(ConfigError, match="^search space: ") as raised:
        space_with(simulate=simulate)
    assert expected in str(raised.value)


def test_simulated_trials_cannot_be_packed():
    with pytest.raises(ConfigError, match="simulate with resources.pack=4: pack servers train; use pack 1"):
        space_with(resources={"cpu": 1, "pack": 4})


def test_the_command_refuses_a_bad_simulate_section_in_one_line_writing_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**SPACE, "simulate": {"seconds_per_epoch": -0.5}}))
    line = refused(capsys, ["search", str(path)])
    assert "simulate.seconds_per_epoch=-0.5" in line
    nothing_written(tmp_path, "space.yaml")


def simulated_space(folder: Path) -> Path:
    """The space above, its trials storing a checkpoint at their first and last epochs only."""
    path = folder / "simulated.yaml"
    path.write_text(yaml.safe_dump({**SPACE, "start_with": [{"optimizer.lr": 0.003, "model.latent_dim": 16}],
                                    "budget": {**SPACE["budget"], "checkpoint_every_s": 3600}}))
    return path


# Run with other modules' searches; trial #1 (the start_with above) fails once in its last epoch.
TOGETHER["simulated"] = on_shared_ray(simulated_space, env={
    "AESEARCH_FAULTS": json.dumps([{"trial": 1, "epoch": 3, "attempts": 1}])})


def test_a_simulated_search_runs_through_the_platform_and_ranks_by_the_known_optimum(together, tmp_path):
    """Trial #1 starts at the optimum and fails once in epoch 3: it is retried from its checkpoint of
    epoch 1 (budget.checkpoint_every_s: epoch 2 stored none), trains epoch 2 again, and still ends best;
    every trial's run holds its epochs once each, and the kept trials their best checkpoint; the
    leaderboard follows the curve's distance to the optimum."""
    folder, done = together["simulated"]
    storage = folder / "results"
    assert done.returncode == 0, done.stderr[-3000:]

    mlflow = MlflowClient(tracking_uri(storage))
    experiment = mlflow.get_experiment_by_name("simulated")
    runs = {r.data.tags[TRIAL_NUMBER_TAG]: r for r in mlflow.search_runs([experiment.experiment_id],
                                                                         "tags.`aesearch.role` = 'trial'")}
    assert sorted(runs, key=int) == [str(n) for n in range(1, 7)]
    for trial in runs.values():
        tags = trial.data.tags
        assert tags["simulated"].startswith("a synthetic learning curve, 0.05 s per epoch") and trial.info.status == "FINISHED"
        epochs = 3 if tags["aesearch.outcome"] == "completed" else int(tags["aesearch.outcome_epoch"])
        steps = [m.step for m in mlflow.get_metric_history(trial.info.run_id, "val/recon_mse")]
        assert steps == list(range(1, epochs + 1)), (tags, steps)  # each epoch once, retried or not
        assert "checkpoints" in [a.path for a in mlflow.list_artifacts(trial.info.run_id)]  # 6 trials, 10 kept
    first = runs["1"].data.tags
    assert first["aesearch.attempt"] == "2" and "went on from epoch 1" in first["restored"]
    assert first["rank"] == "1" and first["aesearch.outcome"] == "completed"
    best = mlflow.download_artifacts(runs["1"].info.run_id, BEST_CHECKPOINT, str(tmp_path))
    assert load_checkpoint(best)["simulated"] is True
    completed = [r for r in runs.values() if r.data.tags["aesearch.outcome"] == "completed"]
    by_rank = sorted(completed, key=lambda r: int(r.data.tags["rank"]))
    space = space_with()
    far = [distance(trial_config(space, {"optimizer.lr": float(r.data.params["optimizer.lr"]),
                                         "model.latent_dim": int(r.data.params["model.latent_dim"])}), OPTIMUM)
           for r in by_rank]
    assert far == sorted(far)  # noise 0: the ranking is the distance to the optimum
    assert mlflow.get_registered_model("simulated").aliases["champion"]
