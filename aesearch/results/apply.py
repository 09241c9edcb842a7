"""Use a found model on new data: `aesearch encode` writes the codes, `aesearch score` the anomaly
scores, one row per input row (or image), in the input's order.

The model comes from a checkpoint file, or from a search: the trial at a rank of its leaderboard
(default: the best) or a trial run by id, whose best checkpoint is fetched from MLflow. The
checkpoint carries the data's spec, so the input is encoded and scaled exactly as the training
data was (`parts.data.read_inputs`), and refused, naming the difference, where it does not match.

The anomaly score is the one the evaluation measures (`training.inference`: the mean squared
reconstruction error of the input, in the model's scaled units); for tables each column's own error
is written beside it, so a high score can be traced to the columns that caused it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from aesearch.errors import UserError
from aesearch.training.checkpoints import TrainedModel
from aesearch.training.inference import Inference

OUTPUT_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".npy": "npy"}


def check_output(out: Path | str) -> Path:
    """Refuse an output we could not write, or one that would overwrite a file: before any work."""
    out = Path(out)
    if out.suffix.lower() not in OUTPUT_FORMATS:
        raise UserError(f"--out {out}: the format comes from the suffix: {', '.join(OUTPUT_FORMATS)}")
    if out.exists():
        raise UserError(f"--out {out}: exists; give another file, or remove it first (nothing is overwritten)")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: no folder {out.parent}")
    return out


def trained_model(source: str, uri: str | None = None, rank: int | None = None, run_id: str | None = None,
                  device: str | None = None) -> TrainedModel:
    """A checkpoint file, or a search's trial (at `rank`, default 1, or the trial run `run_id`)."""
    from aesearch.training.checkpoints import BEST_CHECKPOINT, load_trained_model

    if Path(source).is_file():
        if rank is not None or run_id is not None:
            raise UserError(f"--rank/--run-id: {source} is a checkpoint file, not a search")
        return load_trained_model(source, device=device)
    from aesearch.results.reproduce import find_trial
    from aesearch.tracking.store import client, resolve_tracking_uri

    uri = resolve_tracking_uri(uri)
    trial = find_trial(uri, source, rank, run_id)
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client(uri).download_artifacts(trial.run_id, BEST_CHECKPOINT, folder)
        except Exception:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
            raise UserError(f"{source}: trial {trial.name} (run {trial.run_id}) has no {BEST_CHECKPOINT}") from None
        return load_trained_model(path, device=device, where=f"{BEST_CHECKPOINT} of run {trial.run_id}")


def apply(trained: TrainedModel, input: str) -> Inference:
    """The model's codes, reconstructions and scores of the inputs in a file."""
    from aesearch.parts.data import read_inputs
    from aesearch.training.inference import infer

    return infer(trained.model, read_inputs(input, trained.model.spec, trained.config.data.impute))


def codes(trained: TrainedModel, input: str) -> pd.DataFrame:
    """One row of codes (z0, z1, ...) per input; the mean of a gaussian latent."""
    return apply(trained, input).code_table()


def scores(trained: TrainedModel, input: str) -> pd.DataFrame:
    """The anomaly score of each input and, for tables, each column's reconstruction error."""
    return apply(trained, input).score_table()


def write(table: pd.DataFrame, out: Path) -> Path:
    """As the suffix says: CSV, Parquet, or a NumPy array of the table's values."""
    format = OUTPUT_FORMATS[out.suffix.lower()]
    if format == "csv":
        table.to_csv(out, index=False)
    elif format == "parquet":
        table.to_parquet(out, index=False)
    else:
        np.save(out, table.to_numpy(dtype=np.float32))
    return out
