"""A trained model applied to new inputs: its codes, reconstructions and anomaly scores, as
`aesearch encode` / `aesearch score` write them and the registered MLflow model serves them.

The inputs are already encoded and scaled as the training data was (`parts.data.encode_frame`,
`encode_array`, `read_inputs`). The anomaly score is the one the model's checkpoint keeps, fitted
as the evaluation fitted it (`scoring.fit_scorer`), so a served score and a test metric measure the
same thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from aesearch.parts.clustering import soft_assignment
from aesearch.training.evaluate import column_errors
from aesearch.training.scoring import FittedScorer, seen

if TYPE_CHECKING:
    from aesearch.parts.models import Autoencoder

BATCH = 4096


@dataclass(frozen=True)
class Inference:
    """What a model makes of each input, on the CPU: one row per input."""

    codes: torch.Tensor  # (N, latent_dim): the code (the mean of a gaussian latent)
    reconstructions: torch.Tensor  # (N, *shape), in the model's (scaled) units
    scores: torch.Tensor  # (N,): the anomaly score (higher: more anomalous)
    column_errors: dict[str, torch.Tensor]  # tables: each column's error, (N,) each; {} otherwise
    clusters: torch.Tensor | None = None  # (N,): the nearest cluster centre, for models that cluster

    def score_table(self, threshold: float | None = None) -> pd.DataFrame:
        """`score` (with a threshold, `is_anomaly`: the score above it), and for tables `error_<column>`
        beside it: which columns made a row anomalous."""
        table = pd.DataFrame({"score": self.scores.numpy().astype(np.float64)})  # float64: exact in text
        if threshold is not None:
            table["is_anomaly"] = table["score"] > threshold
        for name, errors in self.column_errors.items():
            table[f"error_{name}"] = errors.numpy()
        return table

    def code_table(self) -> pd.DataFrame:
        codes = self.codes.numpy()
        table = pd.DataFrame(codes, columns=[f"z{i}" for i in range(codes.shape[1])])
        if self.clusters is not None:
            table["cluster"] = self.clusters.numpy()
        return table


@torch.no_grad()
def infer(model: Autoencoder, x: np.ndarray | torch.Tensor, scorer: FittedScorer,
          centres: torch.Tensor | None = None) -> Inference:
    """Codes, reconstructions and anomaly scores (by `scorer`) of inputs already encoded for this model;
    with `centres` (the checkpoint's), each input's cluster: its code's nearest centre."""
    device = next(model.parameters()).device
    if not isinstance(x, torch.Tensor):  # a copy: inputs read from a file may be read-only, which torch warns of
        x = torch.from_numpy(np.array(x, dtype=np.float32))
    x = x.to(device)
    rows = seen(model, x, BATCH)
    per_column = column_errors(rows.x_hat, x, model.spec) if model.spec.columns else {}
    clusters = None if centres is None else soft_assignment(rows.codes, centres.to(device)).argmax(1).cpu()
    return Inference(rows.codes.cpu(), rows.x_hat.cpu(), scorer(rows).cpu(),
                     {name: errors.cpu() for name, errors in per_column.items()}, clusters)
