"""A model's anomaly scorer (`evaluation.anomaly_score`, parts.scorers), fitted the one way every caller shares.

The per-epoch val/anomaly_* metrics, the test metrics, the checkpoint (and from it `aesearch score`
and the served model) all score with the scorer `fit_scorer` fits: on the same rows of the same
data, so a model's scores mean the same wherever they are read. It is fitted on at most
`evaluation.anomaly_fit_samples` normal training rows and the normal rows among the validation rows
the per-epoch metrics use, each a fixed subset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from aesearch.parts.scorers import ANOMALY_SCORERS, Fitted, Prepared, Seen

if TYPE_CHECKING:
    from aesearch.config import EvaluationConfig
    from aesearch.parts.data import Data
    from aesearch.parts.models import Autoencoder

SUBSET_SEED = 0  # which validation (and training) rows the per-epoch metrics use: fixed for every trial
DEFAULT_SCORER = "reconstruction"


def fixed_subset(count: int, cap: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Indices of at most `cap` of `count` rows, drawn once with a fixed seed and kept in order."""
    if count <= cap:
        return torch.arange(count, device=device)
    chosen = torch.randperm(count, generator=torch.Generator().manual_seed(SUBSET_SEED))[:cap]
    return chosen.sort().values.to(device)


@torch.no_grad()
def seen(model: Autoencoder, x: torch.Tensor, batch: int) -> Seen:
    """The model's codes and reconstructions of x, through the latent mean, batch by batch."""
    model.eval()
    logits, codes, logvars = [], [], []
    for chunk in x.split(batch):
        latent = model.encode(chunk, sample=False)
        codes.append(latent.code.float())
        logits.append(model.decode(latent.z).float())
        if model.stochastic:
            logvars.append(latent.logvar.float())
    width = (model.latent_dim,)
    return Seen(x, torch.cat(logits) if logits else x.new_zeros((0, *x.shape[1:])),
                torch.cat(codes) if codes else x.new_zeros((0, *width)),
                (torch.cat(logvars) if logvars else x.new_zeros((0, *width))) if model.stochastic else None,
                model.spec)


@dataclass(frozen=True)
class FittedScorer:
    """A scorer and what it keeps of the normal rows: callable on what a model makes of new rows."""

    kind: str = DEFAULT_SCORER
    state: Fitted = field(default_factory=dict)

    def __call__(self, rows: Seen) -> torch.Tensor:
        return ANOMALY_SCORERS[self.kind].score(rows, self.state | self.prepared)

    @cached_property
    def prepared(self) -> Prepared:
        """What scoring builds from the kept state (a fitted detector): once per fitted scorer."""
        prepare = ANOMALY_SCORERS[self.kind].prepare
        return prepare(self.state) if prepare else {}

    def to_checkpoint(self) -> dict[str, Any]:
        return {"kind": self.kind, "state": {key: value.cpu() for key, value in self.state.items()}}

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> FittedScorer:
        """The scorer a checkpoint keeps; a checkpoint of an aesearch without scorers scored by reconstruction."""
        kept = state.get("anomaly_scorer") or {}
        return cls(kept.get("kind", DEFAULT_SCORER), dict(kept.get("state", {})))


def fit_scorer(model: Autoencoder, data: Data, settings: EvaluationConfig) -> FittedScorer:
    """The scorer `settings.anomaly_score` names, fitted to this model on the data's normal rows."""
    scorer = ANOMALY_SCORERS[settings.anomaly_score]
    if scorer.fit is None:
        return FittedScorer(settings.anomaly_score)
    train = data.train_x[fixed_subset(len(data.train_x), settings.anomaly_fit_samples, data.train_x.device)]
    val = data.val_x[fixed_subset(len(data.val_x), settings.val_max_samples, data.val_x.device)]
    if data.spec.anomalies and data.val_y is not None:
        val_y = data.val_y[fixed_subset(len(data.val_x), settings.val_max_samples, data.val_y.device)]
        val = val[~data.spec.is_anomaly(val_y)]
    batch = settings.batch_size
    neighbors = settings.anomaly_neighbors or scorer.neighbors
    return FittedScorer(settings.anomaly_score, scorer.fit(seen(model, train, batch), seen(model, val, batch), neighbors))
