"""Use a found model on new data: `aesearch encode` writes the codes, `aesearch score` the anomaly
scores, one row per input row (or image), in the input's order.

The model comes from a checkpoint file, or from a search: the trial at a rank of its leaderboard
(default: the best) or a trial run by id, whose best checkpoint is fetched from MLflow. The
checkpoint carries the data's spec, so the input is encoded and scaled exactly as the training
data was (`parts.data.read_inputs`), and refused, naming the difference, where it does not match.

The anomaly score is the one the evaluation measures (`evaluation.anomaly_score`, fitted to the
model and kept in its checkpoint: by default the mean squared reconstruction error of the input, in
the model's scaled units); for tables each column's own reconstruction error is written beside it, so a high score can be traced to the columns that caused it. Each row keeps
what names it (the data's id column, else the table's index, the row number or the image's file) and
its label where the input has one.

`is_anomaly` is the score above a threshold chosen on the validation split of the model's own data
(read again, and refused if its fingerprint is not the model's): where that split has labelled
anomalies, the cut that maximises F1 there (midway between the scores it separates); otherwise the
(1 - contamination) quantile of its scores, so that a `contamination` share of validation rows is
flagged. `threshold` gives it outright. The threshold and its rule are stated beside the output
(OUT.json) and in the table's `attrs`.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from aesearch.errors import UserError
from aesearch.registry import Registry
from aesearch.training.checkpoints import TrainedModel
from aesearch.training.inference import Inference

if TYPE_CHECKING:
    from aesearch.parts.data import Inputs


def write_csv(table: pd.DataFrame, out: Path) -> pd.DataFrame:
    table.to_csv(out, index=False)
    return table


def write_parquet(table: pd.DataFrame, out: Path) -> pd.DataFrame:
    table.to_parquet(out, index=False)
    return table


def write_npy(table: pd.DataFrame, out: Path) -> pd.DataFrame:
    """The numeric columns alone (text ids left out), as one float32 array."""
    table = table.select_dtypes(include=["number", "bool"])
    np.save(out, table.to_numpy(dtype=np.float32))
    return table


# What `--out` can write, by its suffix: each writes the table and returns the columns it wrote.
OUTPUT_FORMATS: Registry[Callable[[pd.DataFrame, Path], pd.DataFrame]] = Registry("output format")
OUTPUT_FORMATS.add(".csv", write_csv)
OUTPUT_FORMATS.add(".parquet", write_parquet)
OUTPUT_FORMATS.add(".pq", write_parquet)
OUTPUT_FORMATS.add(".npy", write_npy)
CONTAMINATION = 0.05  # the share of validation rows flagged where the data has no labelled anomalies


def statement_file(out: Path) -> Path:
    """Where the threshold and its rule are stated beside an output: OUT.json."""
    return out.with_name(out.name + ".json")


def check_output(out: Path | str, stated: bool = False) -> Path:
    """Refuse an output we could not write, or one that would overwrite a file (with `stated`, its
    statement file too): before any work."""
    out = Path(out)
    if out.suffix.lower() not in OUTPUT_FORMATS:
        raise UserError(f"--out {out}: the format comes from the suffix: {', '.join(OUTPUT_FORMATS)}")
    for file in (out, statement_file(out)) if stated else (out,):
        if file.exists():
            what = "exists" if file == out else f"its statement {file.name} exists"
            raise UserError(f"--out {out}: {what}; give another file, or remove it first (nothing is overwritten)")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: no folder {out.parent}")
    return out


def check_threshold(threshold: float | None, contamination: float | None) -> None:
    """Refuse a threshold override that cannot be meant: before any work."""
    if threshold is not None and contamination is not None:
        raise UserError(f"--threshold {threshold} and --contamination {contamination}: give one of them")
    if threshold is not None and not math.isfinite(threshold):
        raise UserError(f"--threshold {threshold}: must be a finite number (a score; higher is more anomalous)")
    if contamination is not None and not 0 < contamination < 1:
        raise UserError(f"--contamination {contamination}: must be between 0 and 1 (the share of anomalies expected)")


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


def apply(trained: TrainedModel, input: str) -> tuple[Inputs, Inference]:
    """The inputs in a file, and the model's codes, reconstructions and scores of them."""
    from aesearch.parts.data import read_inputs
    from aesearch.training.inference import infer

    inputs = read_inputs(input, trained.model.spec, trained.config.data)
    return inputs, infer(trained.model, inputs.x, trained.scorer, trained.centres)


def codes(trained: TrainedModel, input: str) -> pd.DataFrame:
    """One row of codes (z0, z1, ...) per input; the mean of a gaussian latent."""
    return apply(trained, input)[1].code_table()


def scores(trained: TrainedModel, input: str, threshold: float | None = None, contamination: float | None = None,
           data_dir: Path | str | None = None) -> pd.DataFrame:
    """Per input: what names it, its label (where the input has one), its anomaly score, `is_anomaly`
    and, for tables, each column's reconstruction error. `attrs`: the threshold and its rule."""
    inputs, inference = apply(trained, input)
    stated = choose_threshold(trained, threshold, contamination, data_dir)
    table = pd.concat([inputs.rows, inference.score_table(stated["threshold"])], axis=1)
    table.attrs = {"input": input, **stated}
    return table


def choose_threshold(trained: TrainedModel, threshold: float | None = None, contamination: float | None = None,
                     data_dir: Path | str | None = None) -> dict:
    """The threshold and how it was chosen (see the module docstring); overrides checked beforehand."""
    if threshold is not None:
        return {"threshold": float(threshold), "rule": "given", "is_anomaly": "score > threshold"}
    scores, anomalous = validation_scores(trained, data_dir)
    if contamination is None and anomalous is not None and 0 < anomalous.sum() < len(anomalous):
        return {"threshold": best_f1_threshold(scores, anomalous), "rule": "f1", "is_anomaly": "score > threshold",
                "validation_rows": len(scores), "validation_anomalies": int(anomalous.sum())}
    share = CONTAMINATION if contamination is None else float(contamination)
    return {"threshold": float(np.quantile(scores, 1 - share)), "rule": "contamination", "contamination": share,
            "is_anomaly": "score > threshold", "validation_rows": len(scores)}


def validation_scores(trained: TrainedModel, data_dir: Path | str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The model's scores of its own validation split, and which of its rows are labelled anomalies
    (None: no anomaly labels). The data is read again and must be the data the model was trained on."""
    from aesearch.parts.data import load_data
    from aesearch.training.inference import infer

    config, spec = trained.config.data, trained.model.spec
    if config.path is not None and spec.source:  # where training read it, whatever the current folder
        config = config.model_copy(update={"path": spec.source})
    try:
        data = load_data(config, data_dir)
    except UserError as error:
        raise UserError(f"the threshold is chosen on the validation split of the model's data, which cannot be "
                        f"read ({error}); give --threshold") from None
    if data.fingerprint != trained.state["fingerprint"]:
        raise UserError(f"{config.dataset}: not the data the model was trained on (fingerprint {data.fingerprint}, "
                        f"the model's {trained.state['fingerprint']}), so its validation split cannot choose the "
                        "threshold; give --threshold")
    scores = infer(trained.model, data.val_x, trained.scorer).scores.numpy().astype(np.float64)
    anomalous = data.spec.is_anomaly(data.val_y).numpy() if data.spec.anomalies and data.val_y is not None else None
    return scores, anomalous


def best_f1_threshold(scores: np.ndarray, anomalous: np.ndarray) -> float:
    """The threshold that maximises F1 on labelled scores: midway between the lowest score it flags and
    the highest it does not, so that `score > threshold` flags exactly those."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, cuts = precision_recall_curve(anomalous, scores)  # flagged: score >= cut
    f1 = 2 * precision * recall / np.maximum(precision + recall, np.finfo(float).tiny)
    cut = float(cuts[int(np.argmax(f1[:-1]))])  # the last (precision 1, recall 0) has no cut
    below = scores[scores < cut]
    return (cut + float(below.max())) / 2 if len(below) else float(np.nextafter(cut, -np.inf))


def write(table: pd.DataFrame, out: Path) -> Path:
    """As the suffix says: CSV, Parquet, or a NumPy array of the table's numeric columns (text ids
    left out); a table with a statement (`attrs`: scores) gets it beside, in OUT.json, with the
    columns written."""
    statement = dict(table.attrs)
    table = OUTPUT_FORMATS[out.suffix.lower()](table, out)
    if statement:
        statement_file(out).write_text(json.dumps({**statement, "columns": list(table.columns)}, indent=2) + "\n")
    return out
