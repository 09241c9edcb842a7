"""Metrics of what the model is for, measured on validation data after every epoch.

A search that looks for the best detector, clusterer or generator must rank trials by detection,
clustering or likelihood, and ASHA must stop them on it, so these are measured each epoch, not only
by the evaluation suite at the end. They reuse the suite's functions on a fixed subset of the
validation split (at most `evaluation.val_max_samples` rows, the same rows every epoch and every
trial), so that an epoch's overhead stays small and every trial is judged on the same rows:

- val/anomaly_auroc, val/anomaly_ap: the anomaly score (`evaluation.anomaly_score`, fitted as
  scoring.py fits it) of the validation rows, for the anomaly classes;
- val/cluster_ari, val/cluster_nmi, val/cluster_accuracy: the clusters of the validation codes
  (`clustering.clusterer`, or a refinement's centres); val/knn_accuracy: their nearest
  neighbours among (at most val_max_samples) training codes;
- val/nll, val/elbo: the IWAE bound (`evaluation.val_iwae_samples` samples) and the ELBO under the
  likelihood the test/nll uses;
- val/denoise_psnr_<kind> (data in [0, 1]) or val/denoise_mse_<kind>: the reconstruction of
  validation inputs corrupted at `evaluation.denoise_levels[kind]`.

Their randomness comes from a generator of their own with a fixed seed, as the suite's does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from aesearch.metrics import denoised_kind
from aesearch.training.evaluate import (
    EVALUATION_SEED,
    anomaly_metrics,
    denoising_metrics,
    encode,
    gaussian_latent_metrics,
    latent_quality,
)
from aesearch.training.scoring import FittedScorer, fit_scorer, fixed_subset, seen

if TYPE_CHECKING:
    from aesearch.config import EvaluationConfig
    from aesearch.parts.clustering import ClusteringConfig
    from aesearch.parts.data import Data
    from aesearch.parts.models import Autoencoder

class UseMetrics:
    """The per-epoch metrics a run was asked for (`evaluation.val_metrics`), on fixed rows."""

    def __init__(self, names: list[str], data: Data, settings: EvaluationConfig,
                 clustering: ClusteringConfig | None = None):
        self.names, self.settings, self.spec, self.data = list(names), settings, data.spec, data
        self.clustering = clustering
        self.scorer: FittedScorer | None = None  # fitted by the last call that measured detection
        rows = fixed_subset(len(data.val_x), settings.val_max_samples, data.val_x.device)
        self.x = data.val_x[rows]
        self.y = None if data.val_y is None else data.val_y[rows]
        train_rows = fixed_subset(len(data.train_x), settings.val_max_samples, data.train_x.device)
        self.train_x = data.train_x[train_rows]
        self.train_y = None if data.train_y is None else data.train_y[train_rows]

    def __bool__(self) -> bool:
        return bool(self.names)

    @torch.no_grad()
    def __call__(self, model: Autoencoder, centres: torch.Tensor | None = None) -> dict[str, float]:
        """The metrics of `model`; clusters by `centres` where a refinement placed them."""
        wanted, settings, batch = set(self.names), self.settings, self.settings.batch_size
        model.eval()
        generator = torch.Generator(self.x.device).manual_seed(EVALUATION_SEED)
        measured: dict[str, float] = {}
        self.scorer = None
        if wanted & {"val/anomaly_auroc", "val/anomaly_ap"}:
            self.scorer = fit_scorer(model, self.data, settings)
            measured |= anomaly_metrics(self.scorer(seen(model, self.x, batch)), self.y, self.spec)
        if wanted & {"val/cluster_ari", "val/cluster_nmi", "val/cluster_accuracy", "val/knn_accuracy"}:
            train_labels = self.train_y if "val/knn_accuracy" in wanted else None
            train_codes = encode(model, self.train_x, batch) if train_labels is not None else torch.empty(0)
            measured |= latent_quality(train_codes, train_labels, encode(model, self.x, batch), self.y, settings,
                                       self.clustering, centres)
        if wanted & {"val/nll", "val/elbo"}:
            measured |= gaussian_latent_metrics(model, self.x, "val", settings.val_iwae_samples, batch, generator,
                                                self.spec)
        kinds = {denoised_kind(name) for name in wanted if denoised_kind(name)}
        if kinds:
            levels = {kind: settings.denoise_levels[kind] for kind in kinds}
            measured |= denoising_metrics(model, self.x, levels, batch, generator, self.spec)
        # NaN where the rows cannot tell (no anomaly among them): the search refuses such data up front
        return {name: float(measured.get(name.removeprefix("val/"), float("nan"))) for name in self.names}
