"""`aesearch reproduce`: train a trial of a search again on this machine, and say whether it matches.

The trial's resolved config (its `config.yaml`, seed included), dataset fingerprint and the way
it ran (device type, torch threads) come from its MLflow run. The same trainer that ran the
trial trains it again, as far as the trial went (an ASHA-stopped trial stops at the same
epoch), into a local run folder; or, with `--from-checkpoint`, its stored best checkpoint is
evaluated. Recorded and reproduced metrics are printed side by side with a verdict, and the
reproduction is logged to MLflow as a run nested under the original, tagged as its reproduction.

Training is deterministic for a seed on one device type and thread count (the thread count
changes the order of float sums on the CPU, so a reproduction uses the trial's), and evaluation
draws its noise from a fixed seed, so on the same machine the numbers are equal, bit for bit.
The tolerances allow for other machines of the same device type; across device types (a GPU
trial reproduced on a laptop CPU) only a statistical match can be asked for.
"""

from __future__ import annotations

import html
import math
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from aesearch.config import on_device
from aesearch.errors import DivergedError, UserError
from aesearch.metrics import CONTINUOUS, COUNT, EXACT, SCORE, TIME, lookup
from aesearch.tracking.outcomes import RANKED


@dataclass(frozen=True)
class Tolerance:
    """How far a reproduced metric may be from the recorded one."""

    rtol: float  # continuous metrics: |a - b| <= rtol * max(|a|, |b|)
    score_atol: float  # accuracies, ARI, NMI, AUROC, fractions (values in [0, 1])
    count_atol: float  # counts: active units, dead units, the best epoch

    def describe(self) -> str:
        return (f"relative {self.rtol:g} for continuous metrics, absolute {self.score_atol:g} for scores in [0, 1], "
                f"{self.count_atol:g} for counts")


SAME_DEVICE_TYPE = Tolerance(rtol=1e-3, score_atol=0.01, count_atol=1)
OTHER_DEVICE_TYPE = Tolerance(rtol=5e-2, score_atol=0.05, count_atol=2)

def scale(name: str) -> str:
    """How the catalogue says a metric compares (a name it does not know: a continuous value)."""
    metric = lookup(name)
    return metric.scale if metric is not None else CONTINUOUS


def compared(name: str) -> bool:
    return scale(name) != TIME  # wall-clock times, the epoch counter, beta's schedule: not the model's


def difference(name: str, recorded: float, reproduced: float) -> float:
    """Relative difference for continuous metrics, absolute for scores, counts and exact ones."""
    if scale(name) != CONTINUOUS:
        return abs(recorded - reproduced)
    largest = max(abs(recorded), abs(reproduced))
    return abs(recorded - reproduced) / largest if largest else 0.0


def allowed(name: str, tolerance: Tolerance) -> float:
    return {EXACT: 0.0, SCORE: tolerance.score_atol, COUNT: tolerance.count_atol}.get(scale(name), tolerance.rtol)


def compare(recorded: dict[str, float], reproduced: dict[str, float], tolerance: Tolerance) -> pd.DataFrame:
    """One row per metric both sides have: recorded, reproduced, difference, allowed, ok."""
    rows = []
    for name in sorted(set(recorded) & set(reproduced)):
        base = name.split(" ")[0]  # "val/recon_mse (epoch 40)" is judged as val/recon_mse
        if not compared(base):
            continue
        a, b = float(recorded[name]), float(reproduced[name])
        both_nan = math.isnan(a) and math.isnan(b)
        diff = 0.0 if both_nan else difference(base, a, b)
        limit = allowed(base, tolerance)
        rows.append({"metric": name, "recorded": a, "reproduced": b, "difference": diff, "allowed": limit,
                     "ok": both_nan or diff <= limit})
    return pd.DataFrame(rows, columns=["metric", "recorded", "reproduced", "difference", "allowed", "ok"])


def epoch_metrics(history: list[dict[str, float]], upto: int) -> dict[str, float]:
    """Every per-epoch metric, named with its epoch, for epochs 1..upto."""
    return {f"{name} (epoch {int(entry['epoch'])})": value
            for entry in history[:upto] for name, value in entry.items() if compared(name)}


# --- what the trial recorded ----------------------------------------------------------------------


@dataclass
class Trial:
    """A trial run, as far as reproducing it needs: its config and what it recorded."""

    experiment_id: str
    run_id: str
    name: str
    state: str
    epochs: int
    config: Any  # TrainConfig
    fingerprint: str | None
    device_type: str | None
    threads: int | None
    metrics: dict[str, float]  # latest values: test/..., best/..., model/...
    search_run_id: str | None


def find_trial(uri: str, experiment: str, rank: int | None, run_id: str | None) -> Trial:
    """The trial at `rank` in the report's leaderboard (default 1), or the trial run `run_id`."""
    from aesearch.config import parse_config
    from aesearch.results.read import read_trials, search_objectives
    from aesearch.results.tables import leaderboard, trial_table
    from aesearch.tracking.store import client

    experiment_id, search, runs = read_trials(uri, experiment)
    objectives = search_objectives(search)
    metric, mode = objectives[0]
    trials = trial_table(runs, metric)
    if run_id is not None:
        chosen = trials[trials["run_id"] == run_id]
        if chosen.empty:
            raise UserError(f"--run-id {run_id}: not a trial run of experiment {experiment!r} in {uri}")
        row = chosen.iloc[0]
        if row["state"] not in RANKED:
            raise UserError(f"--run-id {run_id}: trial {row['name']} ended as '{row['outcome']}'; only trials that "
                            "completed or were stopped early can be reproduced")
    else:
        board = leaderboard(trials, objectives)
        rank = rank or 1
        if not 1 <= rank <= len(board):
            raise UserError(f"--rank {rank}: experiment {experiment!r} has {len(board)} ranked trials (1..{len(board)})")
        row = board.iloc[rank - 1]
    store = client(uri)
    run = store.get_run(row["run_id"])
    with tempfile.TemporaryDirectory() as folder:
        try:
            text = Path(store.download_artifacts(row["run_id"], "config.yaml", folder)).read_text(encoding="utf-8")
        except Exception:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
            raise UserError(f"run {row['run_id']}: it has no config.yaml to reproduce from") from None
    config = parse_config(yaml.safe_load(text), source=f"config.yaml of run {row['run_id']}")
    tags = run.data.tags
    fingerprint = tags.get("dataset_fingerprint") or search.get("params", {}).get("dataset_fingerprint")
    threads = tags.get("torch_threads")
    return Trial(
        experiment_id=experiment_id, run_id=row["run_id"], name=row["name"], state=row["state"],
        epochs=int(row["epochs"]), config=config, fingerprint=fingerprint,
        device_type=tags["device"].split(":")[0] if tags.get("device") else None,
        threads=int(threads) if threads and threads.isdigit() else None,
        metrics=dict(run.data.metrics), search_run_id=search.get("run_id"),
    )


def recorded_history(uri: str, run_id: str, names: list[str], upto: int) -> dict[str, float]:
    """The trial's per-epoch metrics for epochs 1..upto, named as `epoch_metrics` names them."""
    from aesearch.tracking.store import client

    store = client(uri)
    values = {}
    for name in names:
        for point in store.get_metric_history(run_id, name):
            if point.step <= upto:
                values[f"{name} (epoch {point.step})"] = point.value
    return values


# --- reproducing --------------------------------------------------------------------------------


@dataclass(repr=False)
class Reproduction:
    """A trial trained (or evaluated) again and compared with its record; in a notebook, its verdict and the
    values side by side."""

    trial: Trial
    table: pd.DataFrame  # compare(...)
    tolerance: Tolerance
    device: str  # e.g. "cpu:x86_64"
    mode: str  # "retrained N epochs" or "evaluated the best checkpoint"
    epoch: int  # the epoch the comparison reaches
    run_id: str | None  # the reproduction's MLflow run
    folder: Path | None  # the local run folder (retraining)
    note: str = ""  # why it failed outright (diverged, ...)

    @property
    def reproduced(self) -> bool:
        return not self.note and len(self.table) > 0 and bool(self.table["ok"].all())

    @property
    def verdict(self) -> str:
        tolerance = f"tolerance: {self.tolerance.describe()}"
        if self.reproduced:
            return f"REPRODUCED: every value within tolerance ({tolerance})"
        failed = self.note or f"{int((~self.table['ok']).sum())} of {len(self.table)} values outside tolerance"
        return f"NOT REPRODUCED: {failed} ({tolerance})"

    def __repr__(self) -> str:
        return f"<Reproduction of trial {self.trial.name}, {self.mode} on {self.device}: {self.verdict}>"

    def _repr_html_(self) -> str:
        shown = shown_rows(self.table, self.epoch).to_html(index=False) if len(self.table) else ""
        return (f"<p>Trial {html.escape(self.trial.name)}, {html.escape(self.mode)} on {html.escape(self.device)}: "
                f"<b>{html.escape(self.verdict)}</b></p>{shown}<p>{len(self.table)} values compared: "
                "<code>reproduction.table</code></p>")

    @property
    def largest(self) -> pd.Series | None:
        """The row furthest from its allowance."""
        if self.table.empty:
            return None
        ratio = self.table["difference"] / self.table["allowed"].where(self.table["allowed"] > 0, 1e-12)
        return self.table.loc[ratio.idxmax()]


def choose_device(flag: str | None, trial: Trial) -> str:
    """--device, else the trial's device type when this machine has it, else what is here."""
    from aesearch.config import resolve_device

    if flag is not None:
        return str(resolve_device(flag))
    if trial.device_type == "cuda" and torch.cuda.is_available():
        return "cuda"
    return "cpu" if trial.device_type == "cpu" else str(resolve_device("auto"))


def reproduce(
    uri: str, experiment: str, rank: int | None = None, run_id: str | None = None, device: str | None = None,
    epochs: int | None = None, from_checkpoint: bool = False, data_dir: Path | None = None, download: bool = False,
    out: Path | None = None,
) -> Reproduction:
    """Reproduce a trial; refuses (UserError) before writing anything when it cannot be done."""
    from aesearch.parts.data import load_data
    from aesearch.tracking.runs import training_tags

    trial = find_trial(uri, experiment, rank, run_id)
    if epochs is not None and not 1 <= epochs <= trial.epochs:
        raise UserError(f"--epochs {epochs}: trial {trial.name} trained {trial.epochs} epochs; reproduce 1..{trial.epochs} "
                        f"of them (to train it longer, use aesearch train with its config.yaml)")
    if epochs is not None and from_checkpoint:
        raise UserError("--epochs: not with --from-checkpoint (the checkpoint is evaluated, not trained)")
    chosen = choose_device(device, trial)
    config = on_device(trial.config, chosen)
    data = load_data(config.data, data_dir, download)
    if trial.fingerprint is not None and data.fingerprint != trial.fingerprint:
        raise UserError(
            f"dataset {config.data.dataset}: its fingerprint here is {data.fingerprint}, but trial {trial.name} was "
            f"trained on {trial.fingerprint}: the data changed, so the results cannot be compared; "
            + (f"data.path={config.data.path!r} must be the file the search read" if config.data.path else
               "point --data-dir at the data the search used")
        )
    threads = torch.get_num_threads()
    if chosen == "cpu" and trial.threads:
        torch.set_num_threads(trial.threads)  # the order of float sums follows the thread count
    try:
        tags = training_tags(config, data)
        same_type = trial.device_type is None or trial.device_type == tags["device"].split(":")[0]
        tolerance = SAME_DEVICE_TYPE if same_type else OTHER_DEVICE_TYPE
        if from_checkpoint:
            return _from_checkpoint(uri, trial, config, data, tolerance, tags)
        return _retrain(uri, trial, config, data, tolerance, tags, epochs or trial.epochs, out)
    finally:
        torch.set_num_threads(threads)


def _retrain(uri, trial: Trial, config, data, tolerance: Tolerance, tags, upto: int, out: Path | None) -> Reproduction:
    from aesearch.tracking.runs import TrialRun
    from aesearch.training.checkpoints import BEST_CHECKPOINT
    from aesearch.training.run_folder import check_run_folder, run_in_folder

    folder = out or Path("runs") / f"reproduce-{trial.name.replace('#', '')}-{datetime.now():%Y%m%d-%H%M%S}"
    check_run_folder(folder, resuming_from=None)
    mode = f"retrained {upto} epochs"
    run = _open_run(uri, trial, config, {**tags, "mode": mode})
    tracked = TrialRun(run.client, run.run_id, config, data)
    try:
        result, _ = run_in_folder(config, data, folder, stop_after=upto, also=tracked.log_epoch)
    except DivergedError as error:
        note = f"the reproduction diverged in epoch {error.epoch}, the trial did not"
        return run.close(Reproduction(trial, compare({}, {}, tolerance), tolerance, tags["device"], mode, upto,
                                      run.run_id, folder, note))
    tracked.finish(result, folder / Path(BEST_CHECKPOINT).name, drawn=folder)
    names = sorted({name for entry in result.history for name in entry if compared(name)})
    recorded = recorded_history(uri, trial.run_id, names, upto)
    reproduced = epoch_metrics(result.history, upto)
    if upto == trial.epochs and trial.state == "completed":  # the test suite ran on the same best weights
        recorded |= _end_metrics(trial.metrics)
        reproduced |= _end_metrics(result.metrics)
    table = compare(recorded, reproduced, tolerance)
    return run.close(Reproduction(trial, table, tolerance, tags["device"], mode, upto, run.run_id, folder))


def _end_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith(("test/", "best/", "model/"))}


def _from_checkpoint(uri, trial: Trial, config, data, tolerance: Tolerance, tags) -> Reproduction:
    from aesearch.tracking.runs import TrialRun
    from aesearch.tracking.store import client
    from aesearch.training.checkpoints import BEST_CHECKPOINT, load_checkpoint, load_trained_model
    from aesearch.training.evaluate import evaluate
    from aesearch.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client(uri).download_artifacts(trial.run_id, BEST_CHECKPOINT, folder)
        except Exception:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
            raise UserError(f"--from-checkpoint: run {trial.run_id} ({trial.name}) has no {BEST_CHECKPOINT}") from None
        state = load_checkpoint(path)  # weights_only: a checkpoint that holds code is refused
    load_trained_model(state, data, where=f"--from-checkpoint: {BEST_CHECKPOINT} of run {trial.run_id}")
    trainer = Trainer(config, data)
    trainer.model.load_state_dict(state["model"])
    epoch = state["epoch"]
    reproduced = {f"val/recon_mse (epoch {epoch})": trainer.validate()["val/recon_mse"]}
    recorded = recorded_history(uri, trial.run_id, ["val/recon_mse"], epoch)
    recorded = {k: v for k, v in recorded.items() if k in reproduced}
    if trial.state == "completed":
        metrics = evaluate(trainer.model.eval(), trainer.data, config.evaluation, config.clustering,
                           state.get("cluster_centres"))
        reproduced |= metrics
        recorded |= {k: v for k, v in trial.metrics.items() if k.startswith("test/")}
    mode = f"evaluated the best checkpoint (epoch {epoch})"
    run = _open_run(uri, trial, config, {**tags, "mode": mode})
    TrialRun(run.client, run.run_id, config, data).log_metrics({k: v for k, v in reproduced.items() if "(" not in k}, epoch)
    table = compare(recorded, reproduced, tolerance)
    return run.close(Reproduction(trial, table, tolerance, tags["device"], mode, epoch, run.run_id, None))


@dataclass
class _OpenRun:
    """The reproduction's MLflow run until it has its verdict."""

    client: Any
    run_id: str

    def close(self, reproduction: Reproduction) -> Reproduction:
        largest = reproduction.largest
        verdict = "reproduced" if reproduction.reproduced else "not reproduced"
        self.client.set_tag(self.run_id, "verdict", verdict + (f": {reproduction.note}" if reproduction.note else ""))
        if largest is not None:
            described = ("none: every value equal" if largest["difference"] == 0 else
                         f"{largest['metric']}: {largest['difference']:.3g} (allowed {largest['allowed']:.3g})")
            self.client.set_tag(self.run_id, "largest_difference", described)
        self.client.log_text(self.run_id, reproduction.table.to_csv(index=False), "comparison.csv")
        self.client.set_terminated(self.run_id, status="FINISHED")
        return reproduction


def _open_run(uri: str, trial: Trial, config, tags: dict[str, str]) -> _OpenRun:
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from aesearch.tracking.runs import REPRODUCES_TAG, ROLE_TAG, create_run, trial_tags
    from aesearch.tracking.store import client

    store = client(uri)
    tags = {ROLE_TAG: "reproduction", REPRODUCES_TAG: trial.run_id, MLFLOW_PARENT_RUN_ID: trial.run_id,
            **trial_tags(config), **tags}
    return _OpenRun(store, create_run(store, trial.experiment_id, f"reproduce-{trial.name}", tags, config).run_id)


# --- what the user sees -------------------------------------------------------------------------


def shown_rows(table: pd.DataFrame, last_epoch: int) -> pd.DataFrame:
    """What the terminal shows: every end-of-run value, each per-epoch metric at the last epoch,
    and, where a per-epoch metric left its tolerance, its worst epoch."""
    per_epoch = table["metric"].str.contains("(epoch ", regex=False)
    rows = [table[~per_epoch]]
    epochs = table[per_epoch]
    ratio = epochs["difference"] / epochs["allowed"].where(epochs["allowed"] > 0, 1e-12)
    for _, group in epochs.groupby(epochs["metric"].str.split(" ").str[0], sort=True):
        rows.append(group[group["metric"].str.endswith(f"(epoch {last_epoch})")])
        worst = group.loc[[ratio[group.index].idxmax()]]
        if not worst["ok"].all():
            rows.append(worst)
    return pd.concat(rows).drop_duplicates("metric")


def format_reproduction(reproduction: Reproduction) -> str:
    """The side-by-side table and the verdict."""
    trial, table = reproduction.trial, reproduction.table
    lines = [f"trial {trial.name} (run {trial.run_id}), {trial.state}, {trial.epochs} epochs; "
             f"{reproduction.mode} on {reproduction.device}"]
    if trial.threads is None and reproduction.device.startswith("cpu"):
        lines.append("note: the trial's torch thread count was not recorded; on the CPU it changes the results")
    if len(table):
        with pd.option_context("display.width", 200, "display.max_colwidth", 60, "display.float_format", "{:.6g}".format):
            lines.append(shown_rows(table, reproduction.epoch).to_string(index=False))
        lines.append(f"({len(table)} values compared, every epoch included: see comparison.csv in the reproduction run)")
    lines.append(reproduction.verdict)
    if reproduction.folder is not None:
        lines.append(f"local run: {reproduction.folder}")
    lines.append(f"logged as run {reproduction.run_id}, nested under the trial's run")
    return "\n".join(lines)


def summary(reproduction: Reproduction) -> dict[str, Any]:
    """The outcome as data (the CLI's last stdout line, JSON)."""
    largest = reproduction.largest
    return {
        "reproduced": reproduction.reproduced, "run_id": reproduction.trial.run_id,
        "reproduction_run_id": reproduction.run_id, "mode": reproduction.mode, "device": reproduction.device,
        "compared": len(reproduction.table), "note": reproduction.note,
        "largest_difference": None if largest is None else {
            "metric": largest["metric"], "difference": largest["difference"], "allowed": largest["allowed"]},
        "metrics": {row.metric: [row.recorded, row.reproduced] for row in reproduction.table.itertuples()
                    if "(epoch" not in row.metric},
    }


def print_reproduction(reproduction: Reproduction) -> None:
    """The table and verdict, then the summary as JSON on the last line of stdout."""
    import json

    print(format_reproduction(reproduction))
    print(json.dumps(summary(reproduction)))
