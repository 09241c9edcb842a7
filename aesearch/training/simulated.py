"""A simulated trial: a synthetic learning curve in place of training, to measure the platform itself.

`simulate` stands where `train` stands in a search trial (`search.trial.run_trial`, when the space has
a `simulate:` section) and hands its reporter the same epochs and its caller the same kind of result,
so reporting, checkpoints, retries, MLflow and the driver's callbacks run exactly as for a real trial,
while an epoch costs only `seconds_per_epoch` of sleep. The control plane is then the only cost:
benchmarks/scale.py measures it so.

The curve is a function of the trial's config with a known optimum: each epoch's val/recon_mse is

    FLOOR * (1 + d) * (1 + HEADROOM * exp(-3 * epoch / epochs)) * exp(noise * N(0, 1))

where d sums, over the fields of `optimum`, ln(value / best)**2 for numbers (a tenfold learning
rate adds 5.3) and 1 for any other value that differs; N is drawn from the config and the epoch
alone, so a retried trial repeats its curve. The best trial of a search should therefore sit at
the optimum, and how near it gets is how well the search searched. Checkpoints hold the model's
initial weights (a function of its seed: nothing is trained), so the best one is a checkpoint like
any other: logged, registered, scored.

`replay:` puts real curves in place of the synthetic one: a table that benchmarks/curves.py recorded
by training many configurations of a space once, and a surrogate fitted on it that gives each trial
the curve its configuration would have (a recorded configuration gets its own; where the nearest
record diverged, the trial diverges at the same epoch). Searches can then be compared over many seeds
at no training cost, on curves with real shapes.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from aesearch.config import TrainConfig
from aesearch.errors import ConfigError, DivergedError
from aesearch.metrics import SCORE, lookup, selection_key
from aesearch.parts.data import Data
from aesearch.parts.models import parameter_count
from aesearch.schema import Float, Section, broken_rule, flatten
from aesearch.training.checkpoints import save_checkpoint
from aesearch.training.trainer import EpochEnd, Reporter, TrainResult, check_resumable, initial_model

FLOOR = 0.01  # val/recon_mse at the optimum, after many epochs
HEADROOM = 9.0  # an untrained model is 1 + HEADROOM times worse than its floor
FAR = math.log(1000.0) ** 2  # a number at or below 0 counts as a thousandfold off


class Simulation(Section):
    """A search space's `simulate:` section: its trials follow the curve instead of training."""

    seconds_per_epoch: Float = Field(1.0, ge=0, le=3600)
    noise: Float = Field(0.02, ge=0, le=1)  # each epoch's metrics times exp(noise * N(0, 1))
    optimum: dict[str, str | int | float | bool | None] = Field(  # config field -> its best value
        default_factory=lambda: {"optimizer.lr": 0.003, "model.latent_dim": 16}, min_length=1)
    # A table of recorded learning curves (benchmarks/curves.py): each trial follows the curve a surrogate
    # fitted on them predicts for its configuration, in place of the synthetic one (noise and optimum unused).
    replay: str | None = None

    @model_validator(mode="after")
    def _replay_is_a_table(self) -> Simulation:
        if self.replay is not None:
            path = Path(self.replay).expanduser().resolve()
            if not path.is_file():
                raise broken_rule(f"simulate.replay={self.replay!r}: no such file (a table benchmarks/curves.py records)")
            try:
                curve_table(str(path))
            except (OSError, ValueError, KeyError, EOFError) as error:
                raise broken_rule(f"simulate.replay={self.replay!r}: not a table of learning curves "
                                  f"(benchmarks/curves.py): {error}") from None
            self.replay = str(path)  # trials may run in another folder
        return self

    @model_validator(mode="after")
    def _optimum_fits(self) -> Simulation:
        fields = flatten(TrainConfig().model_dump(mode="json"))
        for path, best in self.optimum.items():
            if path not in fields:
                raise broken_rule(f"simulate.optimum: {path!r} is not a config field (e.g. optimizer.lr)")
            if is_number(best) and not best > 0:
                raise broken_rule(f"simulate.optimum.{path}={best!r}: a number must be > 0 (the curve compares "
                                  "numbers by their ratio)")
        return self


def distance(config: TrainConfig, optimum: dict[str, Any]) -> float:
    """How far the config is from the optimum (0 at it): see the module's docstring."""
    values = flatten(config.model_dump(mode="json"))
    total = 0.0
    for path, best in optimum.items():
        value = values.get(path)
        if is_number(value) and is_number(best):
            total += math.log(value / best) ** 2 if value > 0 else FAR
        else:
            total += float(value != best)
    return total


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class CurveTable:
    """Learning curves recorded once per configuration (benchmarks/curves.py), and a surrogate fitted on
    them, as surrogate benchmarks of HPO research do (Eggensperger et al., AAAI 2015): per metric, an
    extremely randomised forest (scikit-learn's ExtraTreesRegressor, fully grown) maps a configuration to
    the logarithm of that metric at every epoch. Fully grown, it gives a recorded configuration its own
    curve back; between records it averages their neighbourhoods, field by field. Held out, its final
    val/recon_mse ranks configurations far better than the nearest record's (`curves.py --check`).

    A configuration is seen through the searched fields: a number as its place in its searched range (on
    a log scale where it is searched so), any other value one-hot over its choices."""

    TREES = 30

    def __init__(self, header: dict[str, Any], records: list[dict[str, Any]]):
        self.epochs: int = header["epochs"]
        self.fields: dict[str, dict[str, Any]] = header["fields"]
        self.records = [r for r in records if r["outcome"] != "invalid"]  # a search never trains those
        if not self.records:
            raise ValueError("it holds no trained configuration")
        self._surrogates: dict[tuple[str, ...], dict[str, Any]] = {}

    def features(self, values: dict[str, Any]) -> list[float]:
        row: list[float] = []
        for path, field in self.fields.items():
            value = values.get(path)
            if field["type"] != "number" or not is_number(value):
                row += [float(value == choice) for choice in field.get("choices", [value])]
                continue
            low, high, value = field["low"], field["high"], float(value)
            if field["log"]:
                low, high, value = math.log(low), math.log(high), math.log(max(value, field["low"]))
            row.append((value - low) / (high - low))
        return row

    def measured(self, reported: list[str]) -> list[dict[str, Any]]:
        """The records that measured every metric the trial reports (one with a Gaussian latent has
        val/kl, say), or that diverged before their first epoch's report."""
        measured = [r for r in self.records if not r["epochs"] or set(reported) <= set(r["epochs"][0])]
        if not measured:
            raise ConfigError(f"simulate.replay: no recorded configuration measured {', '.join(reported)}")
        return measured

    def nearest(self, config: TrainConfig, reported: list[str]) -> dict[str, Any]:
        """The record nearest `config` among those that measured what it reports (the lowest index among
        equals): the squared distance between their features."""
        row = self.features(flatten(config.model_dump(mode="json")))
        return min(self.measured(reported), key=lambda r: (
            sum((a - b) ** 2 for a, b in zip(row, self.features(r["values"]), strict=True)), r["index"]))

    def curves(self, config: TrainConfig, reported: list[str]) -> list[dict[str, float]]:
        """Each epoch's metrics as the surrogate predicts them for `config`, or, where the nearest record
        diverged, that record's epochs (the trial diverges where it did: `replayed`)."""
        nearest = self.nearest(config, reported)
        if nearest["outcome"] == "diverged":
            return nearest["epochs"]
        row = [self.features(flatten(config.model_dump(mode="json")))]
        predicted = {name: (forest.predict(row)[0], logged)
                     for name, (forest, logged) in self.surrogate(tuple(reported)).items()}
        return [{name: float(math.exp(values[epoch]) if logged else values[epoch])
                 for name, (values, logged) in predicted.items()} for epoch in range(self.epochs)]

    def surrogate(self, reported: tuple[str, ...]) -> dict[str, tuple[Any, bool]]:
        """A forest per metric the trial reports, fitted (once per process) on the completed records
        that measured them all, and whether it predicts the metric's logarithm (a metric always > 0)."""
        if reported not in self._surrogates:
            import numpy as np
            from sklearn.ensemble import ExtraTreesRegressor

            completed = [r for r in self.measured(list(reported)) if r["outcome"] == "completed" and all(
                e[name] is not None for e in r["epochs"] for name in reported)]  # null: not finite
            if not completed:
                raise ConfigError(f"simulate.replay: no completed configuration measured {', '.join(reported)}")
            x = np.array([self.features(r["values"]) for r in completed])
            forests = {}
            for name in reported:
                y = np.array([[e[name] for e in r["epochs"]] for r in completed], dtype=float)
                logged = bool((y > 0).all())
                forests[name] = (ExtraTreesRegressor(self.TREES, random_state=0).fit(x, np.log(y) if logged else y),
                                 logged)
            self._surrogates[reported] = forests
        return self._surrogates[reported]


@functools.lru_cache(maxsize=4)
def curve_table(path: str) -> CurveTable:
    """The table in the gzipped JSON lines file at `path`, read once per process."""
    with gzip.open(path, "rt", encoding="utf-8") as stream:
        lines = [json.loads(line) for line in stream if line.strip()]
    if not lines or lines[0].get("table") != "learning curves":
        raise ValueError("its first line is not the table's header")
    return CurveTable(lines[0], lines[1:])


def replayed(epochs: list[dict[str, Any]], epoch: int) -> dict[str, float]:
    """The replayed metrics of `epoch` (a non-finite one was recorded as null). Beyond a diverged
    record's epochs: DivergedError, as the trainer raises it."""
    if epoch > len(epochs):  # the recorded configuration diverged in this epoch
        raise DivergedError(epoch, {"train/loss": math.nan})
    return {name: math.nan if value is None else float(value) for name, value in epochs[epoch - 1].items()}


def curve(config: TrainConfig, optimum: dict[str, Any], noise: float, epoch: int) -> float:
    """val/recon_mse of the config at `epoch` (from 1), noise included."""
    digest = hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    draw = random.Random(f"{digest}:{epoch}").gauss(0.0, 1.0)
    shape = 1.0 + HEADROOM * math.exp(-3.0 * epoch / config.epochs)
    return FLOOR * (1.0 + distance(config, optimum)) * shape * math.exp(noise * draw)


def as_metric(name: str, recon_mse: float) -> float:
    """A per-epoch metric of a use (`evaluation.val_metrics`) that moves with the curve: a score in
    (0, 1] for a score, a PSNR-like value for another one to maximise, the curve itself to minimise."""
    metric = lookup(name)
    if metric is None or metric.direction.ascending:
        return recon_mse
    return min(1.0, FLOOR / recon_mse) if metric.scale == SCORE else -10.0 * math.log10(recon_mse)


def simulate(config: TrainConfig, data: Data, reporter: Reporter, simulation: Simulation,
             resume_from: dict[str, Any] | None = None) -> TrainResult:
    """`train`'s stand-in: each epoch sleeps, then reports the curve's metrics and a checkpoint (the
    model's initial weights, the history, the best epoch); `resume_from` (a loaded checkpoint of a
    simulated run) continues at its epoch. The result has no model: there are no pictures to draw."""
    model = initial_model(config, data.spec)
    state = {"config": config.model_dump(mode="json"), "fingerprint": data.fingerprint,
             "data_spec": data.spec.to_dict(), "model": model.state_dict(), "optimizer": {}, "rng": {},
             "simulated": True, "epoch": 0, "history": [], "best": {"epoch": 0, "model": None}}
    if resume_from is not None:
        check_resumable(resume_from, config, data)
        state |= {key: resume_from[key] for key in ("epoch", "history", "best")}
    history, select_by = list(state["history"]), config.evaluation.select_by
    size = {"model/parameters": float(parameter_count(model)), "model/latent_dim": float(config.model.latent_dim)}
    terms = ["train/loss", "train/recon", "val/loss", "val/recon", "val/recon_mse", *config.evaluation.val_metrics]
    if config.model.latent == "gaussian":
        terms.append("val/kl")
    replay = None
    if simulation.replay is not None:
        table = curve_table(simulation.replay)
        if config.epochs > table.epochs:
            raise ConfigError(f"simulate.replay={simulation.replay!r}: its curves have {table.epochs} epochs, "
                              f"fewer than the {config.epochs} of a trial")
        replay = table.curves(config, terms)
    started = time.perf_counter()
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        began = time.perf_counter()
        time.sleep(simulation.seconds_per_epoch)
        if replay is not None:  # the trial's own size: an objective may be its latent size
            metrics = {**replayed(replay, epoch), **size}
        else:
            recon = curve(config, simulation.optimum, simulation.noise, epoch)
            metrics = {name: as_metric(name, recon) for name in terms} | size
        metrics |= {"epoch": float(epoch), "time/epoch_seconds": time.perf_counter() - began}
        history.append(metrics)
        best = state["best"]["epoch"]
        is_best = best == 0 or selection_key(select_by, metrics) < selection_key(select_by, history[best - 1])
        if is_best:
            state["best"] = {"epoch": epoch, "model": None}
        state |= {"epoch": epoch, "history": list(history)}
        reporter(EpochEnd(epoch, metrics, is_best, lambda path, saved=dict(state): save_checkpoint(path, saved), None))
    best_epoch = state["best"]["epoch"]
    kept = history[best_epoch - 1]
    metrics = {"test/recon_mse": kept["val/recon_mse"], "best/epoch": float(best_epoch),
               **{f"best/{name}": kept[name] for name in dict.fromkeys(
                   ["val/loss", "val/recon_mse", select_by, *config.evaluation.val_metrics])},
               "model/parameters": size["model/parameters"], "time/train_seconds": time.perf_counter() - started}
    return TrainResult(config, history, metrics, best_epoch, None, data.fingerprint)
