"""The search's pure logic, without a Ray cluster: outcomes as data, the one ranking, the leaderboard
from Tune's results, the metric catalogue's say in reproductions."""

import math

import pandas as pd
import pytest
from ray.tune import Result

from aesearch.metrics import ALWAYS_PER_EPOCH, USE_METRICS, is_epoch_objective, lookup, ranked_metrics
from aesearch.results.reproduce import OTHER_DEVICE_TYPE, allowed, compared
from aesearch.results.tables import leaderboard as report_leaderboard
from aesearch.search.leaderboard import leaderboard, nothing_ran, outside_the_best, rank
from aesearch.search.space import parse_space
from aesearch.tracking.outcomes import KINDS, REPORTED, Outcome

EVERY_OUTCOME = [Outcome("completed"), Outcome("stopped", 5), Outcome("diverged", 1), Outcome("invalid", detail="x"),
                 Outcome("errored", detail="after 3 attempts: ValueError: boom"), Outcome("not started"),
                 Outcome("lost", detail="the search state was saved before this trial began")]


@pytest.mark.parametrize("outcome", EVERY_OUTCOME, ids=lambda o: o.kind)
def test_an_outcome_is_read_back_from_its_tags_whatever_its_words(outcome):
    tags = outcome.tags()
    assert Outcome.from_tags(tags) == outcome
    reworded = {**tags, "outcome": "some other wording"}  # people's words are never parsed back
    assert Outcome.from_tags(reworded) == outcome


def test_words_are_made_from_the_data():
    assert Outcome("stopped", 5).words() == "stopped early at epoch 5"
    assert Outcome("diverged", 1).words() == "diverged at epoch 1"
    assert Outcome("errored", detail="after 3 attempts: X").words() == "errored after 3 attempts: X"
    assert Outcome.from_tags({"outcome": "completed"}) is None  # words alone are not an outcome
    with pytest.raises(ValueError, match="not one of"):
        Outcome("finished")


def test_the_outcome_of_a_trial_from_its_last_report():
    assert Outcome.from_report({"epoch": 4.0, REPORTED["completed"]: 1.0}) == Outcome("completed")
    assert Outcome.from_report({"epoch": 2.0}) == Outcome("stopped", 2)
    assert Outcome.from_report({"epoch": 3.0, REPORTED["diverged"]: 1.0}) == Outcome("diverged", 3)
    assert Outcome.from_report({"epoch": 0.0, REPORTED["invalid"]: 1.0, "error": "bad"}).kind == "invalid"
    assert Outcome.from_report({}) == Outcome("not started")
    assert Outcome.from_report({"epoch": 2.0}, RuntimeError("x")).kind == "errored"
    assert set(KINDS) == {o.kind for o in EVERY_OUTCOME}


def trials(*rows):
    return pd.DataFrame([{"name": n, "state": s, "objective": v, "number": i} for i, (n, s, v) in enumerate(rows)])


def test_only_trials_that_trained_to_an_end_are_ranked_best_first():
    board = rank(trials(("a", "completed", 0.3), ("b", "errored", 0.01), ("c", "stopped", 0.2),
                        ("d", "diverged", math.inf), ("e", "completed", math.nan), ("f", "completed", 0.1)),
                 ["objective"], ["min"], tiebreak="number")
    assert board["name"].tolist() == ["f", "c", "a", "b", "d", "e"]
    assert board["rank"].tolist()[:3] == [1, 2, 3] and board["rank"][3:].isna().all()
    best_first = rank(trials(("a", "completed", 0.3), ("f", "completed", 0.1)), ["objective"], ["max"])
    assert best_first["name"].tolist() == ["a", "f"]


def test_the_report_ranks_as_the_search_does():
    table = trials(("a", "completed", 0.3), ("b", "errored", 0.01), ("c", "stopped", 0.2), ("d", "completed", 0.2))
    board = report_leaderboard(table, [("val/recon_mse", "min")])
    assert board["name"].tolist() == ["c", "d", "a"] and board["rank"].tolist() == [1, 2, 3]  # ties: trial number


SPACE = parse_space({"name": "s", "space": {"model.latent_dim": {"type": "categorical", "choices": [8, 16]}},
                     "budget": {"num_samples": 3}})


def result(metrics, error=None):
    return Result(metrics=metrics, checkpoint=None, error=error, path="/tmp/run_x")


def test_the_search_leaderboard_from_tunes_results():
    results = [result({"trial_id": "t1", "epoch": 2.0, "val/recon_mse": 0.5, "family": "dense"}, None),
               result({"trial_id": "t2", "epoch": 4.0, "val/recon_mse": 0.2, REPORTED["completed"]: 1.0}, None),
               result({"trial_id": "t3", "epoch": 1.0, "val/recon_mse": 0.01}, RuntimeError("lost node"))]
    board = leaderboard(results, SPACE)
    assert board["trial"].tolist() == ["t2", "t1", "t3"]
    assert board["state"].tolist() == ["completed", "stopped", "errored"]
    assert board["outcome"].tolist()[1] == "stopped early at epoch 2" and board["rank"].tolist()[:2] == [1, 2]
    assert not nothing_ran(board)
    assert nothing_ran(leaderboard([results[2]], SPACE)) and nothing_ran(leaderboard([], SPACE))


def test_the_catalogue_knows_every_metric_a_search_ranks_on_and_how_to_compare_them():
    assert all(lookup(name) is not None and is_epoch_objective(name) for name in ALWAYS_PER_EPOCH + USE_METRICS)
    assert [lookup(name).mode for name in ("val/anomaly_auroc", "val/kmeans_ari", "val/nll", "val/elbo")] == [
        "max", "max", "min", "max"]
    assert lookup("val/denoise_psnr_masking").mode == "max" and lookup("val/denoise_mse_swap").mode == "min"
    assert is_epoch_objective("val/denoise_psnr_gaussian") and not is_epoch_objective("val/denoise_psnr_")
    assert not is_epoch_objective("test/recon_mse") and not is_epoch_objective("val/whatever")
    assert lookup("test/denoise_psnr_gaussian").mode == "max" and "gaussian" in lookup("test/denoise_psnr_gaussian").description
    assert lookup("no/such") is None
    assert list(ranked_metrics(["test/psnr", "test/denoise_psnr_masking", "test/recon_mse", "val/loss"])) == [
        "test/recon_mse", "test/psnr", "test/denoise_psnr_masking"]
    assert allowed("model/parameters", OTHER_DEVICE_TYPE) == 0.0
    assert allowed("test/kmeans_ari", OTHER_DEVICE_TYPE) == OTHER_DEVICE_TYPE.score_atol
    assert allowed("test/active_units", OTHER_DEVICE_TYPE) == OTHER_DEVICE_TYPE.count_atol
    assert allowed("val/kl", OTHER_DEVICE_TYPE) == OTHER_DEVICE_TYPE.rtol
    assert not compared("time/train_seconds") and not compared("epoch") and compared("test/nll")


def test_only_the_best_ended_trials_keep_their_checkpoints():
    ended = {"a": {"epoch": 4.0, "loss": 0.3, REPORTED["completed"]: 1.0}, "b": {"epoch": 2.0, "loss": 0.1},
             "c": {"epoch": 1.0, "loss": math.inf, REPORTED["diverged"]: 1.0}, "d": {"epoch": 4.0, "loss": 0.2,
                                                                                  REPORTED["completed"]: 1.0}}
    assert sorted(outside_the_best(ended, ["loss"], ["min"], keep=2)) == ["a", "c"]
    assert sorted(outside_the_best(ended, ["loss"], ["max"], keep=1)) == ["b", "c", "d"]
    assert outside_the_best({}, ["loss"], ["min"], keep=2) == []
