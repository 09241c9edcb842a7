"""aesearch from Python: what a notebook calls, each a thin layer over the part that does the work.

    import aesearch

    space = aesearch.load_space("quickstart", {"budget.num_samples": 8})      # a shipped space, or a file
    board = aesearch.run_search(space, name="notebook")          # the leaderboard; storage: ./ray_results
    report = aesearch.make_report("notebook", out="reports/notebook")
    trained = aesearch.load_model("runs/x/best.pt")                          # .model, .config
    check = aesearch.reproduce("notebook", rank=1)                           # .verdict
    scores = aesearch.score("notebook", "new_rows.csv")                      # a DataFrame, one row per input

The command line (`aesearch.cli`) calls these same parts. Tracking URIs default as on the command
line: MLFLOW_TRACKING_URI, else the embedded store `sqlite:///./mlflow.db`.
"""

from __future__ import annotations

import os

from pathlib import Path
from typing import TYPE_CHECKING, Any

from aesearch import settings
from aesearch.config import TrainConfig, check_data, load_config, on_device, parse_config
from aesearch.locations import DEFAULT_STORAGE
from aesearch.search.space import SearchSpace, load_space, parse_space
from aesearch.training.checkpoints import TrainedModel, load_trained_model

if TYPE_CHECKING:
    import pandas as pd

    from aesearch.results.report import Report
    from aesearch.results.reproduce import Reproduction
    from aesearch.search.phases import Phases
    from aesearch.training.trainer import Reporter, TrainResult

__all__ = [
    "SearchSpace", "TrainConfig", "TrainedModel", "encode", "load_config", "load_model", "load_space", "make_report",
    "parse_config", "parse_space", "reproduce", "run_search", "score", "train",
]


def train(config: TrainConfig, data_dir: Path | str | None = None, download: bool = False, device: str | None = None,
          out: Path | str | None = None, reporter: Reporter | None = None) -> TrainResult:
    """Train one config (its best weights evaluated on the test split), as `aesearch train` does;
    with `out`, everything is also written into that run folder (checkpoints, metrics, pictures)."""
    from aesearch.parts.data import load_data
    from aesearch.training.run_folder import check_run_folder, run_in_folder
    from aesearch.training.trainer import train as train_config

    config = on_device(config, device)
    data = load_data(config.data, data_dir, download)
    check_data(config, data.spec)
    if out is None:
        return train_config(config, data, reporter)
    check_run_folder(Path(out), resuming_from=None)
    result, _ = run_in_folder(config, data, out, also=reporter)
    return result


def run_search(space: SearchSpace, name: str | None = None, storage: Path | str = DEFAULT_STORAGE,
               tracking_uri: str | None = None, address: str | None = None, data_dir: Path | str | None = None,
               download: bool = False, resume: bool = False, phases: Phases | None = None) -> pd.DataFrame:
    """Run (or resume) a search, tracked in MLflow, as `aesearch search` does; returns its leaderboard
    (one row per trial, best first). Ray starts on this machine unless `address` (default:
    $RAY_ADDRESS, as on the command line) names a cluster.
    `phases`, if given, gets a mark at the end of each stage (the command line's `aesearch: time:`)."""
    settings.apply()
    from aesearch.locations import local_or_uri
    from aesearch.search.driver import SearchOptions, search
    from aesearch.tracking.store import resolve_tracking_uri

    address = address or os.environ.get("RAY_ADDRESS")
    options = SearchOptions(name=name or space.name, storage=local_or_uri(storage), address=address,
                            data_dir=Path(data_dir) if data_dir else None, download=download, resume=resume,
                            tracking_uri=resolve_tracking_uri(tracking_uri))
    return search(space, options, phases)


def make_report(experiment: str, tracking_uri: str | None = None, out: Path | str | None = None) -> Report:
    """Write the report of a search (HTML, Markdown, leaderboard.csv) into `out` (default
    reports/EXPERIMENT) and return it: `.board`, `.families`, `.best_metrics`, `.figures`, ..."""
    settings.apply()
    from aesearch.results.render import make_report as write
    from aesearch.tracking.store import resolve_tracking_uri

    return write(experiment, resolve_tracking_uri(tracking_uri), Path(out or Path("reports") / experiment))


def reproduce(experiment: str, rank: int | None = None, run_id: str | None = None, tracking_uri: str | None = None,
              **options: Any) -> Reproduction:
    """Retrain (or, with from_checkpoint=True, re-evaluate) one trial of a search and compare it with
    what the trial recorded, as `aesearch reproduce` does. `options`: device, epochs, from_checkpoint,
    data_dir, download, out."""
    settings.apply()
    from aesearch.results.reproduce import reproduce as reproduce_trial
    from aesearch.tracking.store import resolve_tracking_uri

    return reproduce_trial(resolve_tracking_uri(tracking_uri), experiment, rank, run_id, **options)


def load_model(checkpoint: Path | str, device: str | None = None) -> TrainedModel:
    """The autoencoder a checkpoint holds (eval mode; on the CPU unless `device`), with its config:
    `trained.model(x).x_hat` reconstructs x, `trained.model.encode(x).code` gives its codes."""
    return load_trained_model(checkpoint, device=device)


def encode(model: str, input: str, out: Path | str | None = None, rank: int | None = None, run_id: str | None = None,
           tracking_uri: str | None = None, device: str | None = None) -> pd.DataFrame:
    """The codes of new data (a table, an array or an image folder, encoded as the training data was)
    under a found model: a checkpoint file, or a search's trial (`rank`, default 1, or `run_id`).
    With `out` (.csv, .parquet, .npy), also written there."""
    return _use("codes", model, input, out, rank, run_id, tracking_uri, device)


def score(model: str, input: str, out: Path | str | None = None, rank: int | None = None, run_id: str | None = None,
          tracking_uri: str | None = None, device: str | None = None, threshold: float | None = None,
          contamination: float | None = None, data_dir: Path | str | None = None) -> pd.DataFrame:
    """The anomaly score of each row (image) of new data beside what names it (and its label, if the
    input has it), `is_anomaly`, and for tables each column's error; as `encode`. The threshold is
    chosen on the model's validation split (read again; `data_dir` for a built-in dataset), by
    `contamination` if given, or is `threshold`; `.attrs` (and OUT.json) state it and its rule."""
    from aesearch.results import apply

    apply.check_threshold(threshold, contamination)
    return _use("scores", model, input, out, rank, run_id, tracking_uri, device,
                threshold=threshold, contamination=contamination, data_dir=data_dir)


def _use(what: str, model: str, input: str, out, rank, run_id, tracking_uri, device, **options) -> pd.DataFrame:
    settings.apply()
    from aesearch.results import apply

    out = apply.check_output(out, stated=what == "scores") if out is not None else None
    trained = apply.trained_model(str(model), tracking_uri, rank, run_id, device)
    table = getattr(apply, what)(trained, str(input), **options)
    if table.attrs:  # a statement (scores): say which model made it
        table.attrs = {"model": str(model), **({"rank": rank} if rank else {}), **({"run_id": run_id} if run_id else {}),
                       **table.attrs}
    if out is not None:
        apply.write(table, out)
    return table
