"""Replayed learning curves (`simulate: {replay: FILE}`): a table benchmarks/curves.py records once and a
surrogate fitted on it give each trial the curve of its configuration, so that searches compare at no
training cost."""

import gzip
import json
import math
import sys

import pytest

from aesearch.errors import ConfigError, DivergedError
from aesearch.search.space import parse_space, trial_config
from aesearch.training.simulated import Simulation, simulate
from tests.conftest import REPO
from tests.test_bad_input import refused

FIELDS = {"optimizer.lr": {"type": "number", "low": 0.0001, "high": 0.1, "log": True},
          "optimizer.name": {"type": "categorical", "choices": ["adam", "sgd"]}}


def epochs(*values):
    return [{"train/loss": v, "train/recon": v, "val/loss": v, "val/recon": v, "val/recon_mse": v,
             "model/latent_dim": 99.0} for v in values]


RECORDS = [  # three trained configurations and one the search would refuse
    {"index": 0, "values": {"optimizer.lr": 0.001, "optimizer.name": "adam"}, "outcome": "completed",
     "epochs": epochs(0.5, 0.3, 0.2)},
    {"index": 1, "values": {"optimizer.lr": 0.01, "optimizer.name": "adam"}, "outcome": "completed",
     "epochs": epochs(0.4, 0.35, 0.33)},
    {"index": 2, "values": {"optimizer.lr": 0.1, "optimizer.name": "adam"}, "outcome": "diverged",
     "epochs": epochs(0.9)},  # non-finite in its second epoch
    {"index": 3, "params": {}, "outcome": "invalid", "epochs": []},
    {"index": 4, "values": {"optimizer.lr": 0.05, "optimizer.name": "adam"}, "outcome": "completed",
     "epochs": [{**e, "val/kl": 1.0} for e in epochs(0.7, 0.6, 0.5)]},  # the only one with a Gaussian latent
]


def write_table(path, records=RECORDS, epochs_per_curve=3):
    with gzip.open(path, "wt", encoding="utf-8") as stream:
        for line in [{"table": "learning curves", "epochs": epochs_per_curve, "fields": FIELDS}, *records]:
            stream.write(json.dumps(line) + "\n")
    return path


def space(table, epochs=3, latent="deterministic"):
    return parse_space({
        "name": "replayed", "data": {"name": "digits"},
        "base": {"model": {"hidden_dims": [16], "latent_dim": 4, "latent": latent}},
        "space": {"optimizer.lr": {"type": "float", "low": 0.0001, "high": 0.1, "log": True}},
        "budget": {"num_samples": 4, "max_epochs": epochs, "grace_period": 1},
        "simulate": {"seconds_per_epoch": 0, "replay": str(table)},
    })


def test_a_trial_replays_its_recorded_curve_and_between_records_a_curve_the_surrogate_blends_from_theirs(
        tmp_path, digits):
    searched = space(write_table(tmp_path / "curves.jsonl.gz"))
    recorded = trial_config(searched, {"optimizer.lr": 0.001})  # the first record's very configuration
    ends = []
    result = simulate(recorded, digits, ends.append, searched.simulate)
    assert [e.metrics["val/recon_mse"] for e in ends] == pytest.approx([0.5, 0.3, 0.2], rel=1e-9)
    assert result.best_epoch == 3
    assert ends[0].metrics["model/latent_dim"] == 4.0  # the trial's own size: an objective may be its size
    # between records: each epoch inside the range the completed records span there, and none's own curve
    between = [h["val/recon_mse"] for h in simulate(trial_config(searched, {"optimizer.lr": 0.002}), digits,
                                                   lambda end: None, searched.simulate).history]
    spans = list(zip([0.5, 0.3, 0.2], [0.4, 0.35, 0.33], [0.7, 0.6, 0.5], strict=True))
    assert all(min(span) < value < max(span) for value, span in zip(between, spans, strict=True))
    assert all(between != pytest.approx(list(curve), rel=1e-3) for curve in zip(*spans, strict=True))
    assert between == [h["val/recon_mse"] for h in simulate(trial_config(searched, {"optimizer.lr": 0.002}), digits,
                                                           lambda end: None, searched.simulate).history]
    # the nearest recorded configuration diverged in its second epoch: so does the trial, there
    ends.clear()
    with pytest.raises(DivergedError) as diverged:
        simulate(trial_config(searched, {"optimizer.lr": 0.08}), digits, ends.append, searched.simulate)
    assert diverged.value.epoch == 2 and [e.epoch for e in ends] == [1]
    # a trial reports what its config measures (a Gaussian latent: val/kl): the nearest that measured it
    gaussian = space(tmp_path / "curves.jsonl.gz", latent="gaussian")
    replay = simulate(trial_config(gaussian, {"optimizer.lr": 0.002}), digits, lambda end: None, gaussian.simulate)
    assert [h["val/recon_mse"] for h in replay.history] == pytest.approx([0.7, 0.6, 0.5], rel=1e-9)
    assert replay.history[0]["val/kl"] == pytest.approx(1.0)


def test_a_table_that_cannot_be_replayed_is_named_with_its_rule(tmp_path, digits, capsys, monkeypatch):
    with pytest.raises(ConfigError, match=r"simulate.replay='nowhere.jsonl.gz': no such file"):
        space("nowhere.jsonl.gz")
    (tmp_path / "other.jsonl.gz").write_bytes(gzip.compress(b'{"name": "something else"}\n'))
    with pytest.raises(ConfigError, match=r"simulate.replay=.*other.jsonl.gz': not a table of learning curves"):
        space(tmp_path / "other.jsonl.gz")
    short = space(write_table(tmp_path / "short.jsonl.gz"), epochs=5)
    with pytest.raises(ConfigError, match=r"its curves have 3 epochs, fewer than the 5 of a trial"):
        simulate(trial_config(short, {"optimizer.lr": 0.001}), digits, lambda end: None, short.simulate)
    # on the command line: one line, exit 2, nothing written
    monkeypatch.chdir(tmp_path)
    (tmp_path / "replay.yaml").write_text("name: r\ndata: {name: digits}\nspace:\n  optimizer.lr: {type: float, "
                                          "low: 0.001, high: 0.1}\nsimulate: {replay: missing.jsonl.gz}\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    line = refused(capsys, ["search", "replay.yaml"])
    assert "simulate.replay='missing.jsonl.gz': no such file" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_the_recorder_writes_a_table_each_of_whose_configurations_replays_its_own_curve(tmp_path, digits):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import curves

    curves.start_worker(epochs=2)
    recorded = [curves.record(index, epochs=2) for index in range(3)]
    table = tmp_path / "curves.jsonl.gz"
    with gzip.open(table, "wt", encoding="utf-8") as stream:
        for line in [curves.header(2, ["curves.py", "--epochs", "2"]), *recorded]:
            stream.write(json.dumps(line) + "\n")
    header, records = curves.read_records(table)
    assert header["epochs"] == 2 and [r["index"] for r in records] == [0, 1, 2]
    assert any(r["outcome"] == "completed" for r in records)
    searched = curves.searched_space(2).model_copy(update={"simulate": Simulation(seconds_per_epoch=0,
                                                                                  replay=str(table))})
    for record in records:
        if record["outcome"] != "completed":
            continue
        config = trial_config(searched, record["params"])  # the very configuration: distance 0 to its record
        replay = simulate(config, digits, lambda end: None, searched.simulate)
        assert [h["val/recon_mse"] for h in replay.history] == pytest.approx(
            [e["val/recon_mse"] for e in record["epochs"]], rel=1e-5)
        assert all(math.isfinite(h["val/loss"]) for h in replay.history)
