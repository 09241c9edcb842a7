"""A trained model's figures on the test split, for images and vectors alike (matplotlib's object
API: no pyplot, no global state):

- latent.png: the codes in 2-D (PCA when the code is wider), coloured by class when there are labels;
- feature_errors.png (tables and vectors): the reconstruction error of each column, worst first;
- anomaly_scores.png and roc.png (labelled anomalies): the reconstruction error of normal and
  anomalous inputs, and the ROC curve of that error as an anomaly score.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from aesearch.config import EvaluationConfig
    from aesearch.parts.data import Data
    from aesearch.parts.models import Autoencoder

POINTS = 2000  # inputs drawn in the latent map
SHOWN_FEATURES = 30  # columns in the feature-error chart


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def latent_figure(codes: torch.Tensor, labels: torch.Tensor | None, classes: tuple[str, ...]) -> Figure:
    """The codes in 2-D: the two directions of largest variance when the code is wider."""
    dims = codes.shape[1]
    if dims > 2:
        centred = codes - codes.mean(0)
        codes = centred @ torch.linalg.svd(centred, full_matrices=False).Vh[:2].T
    elif dims == 1:
        codes = torch.cat([codes, torch.zeros_like(codes)], 1)
    figure = Figure(figsize=(5, 5))
    axes = figure.add_subplot()
    if labels is None:
        axes.scatter(codes[:, 0], codes[:, 1], s=4, color="tab:blue")
    else:
        points = axes.scatter(codes[:, 0], codes[:, 1], c=labels.cpu(), cmap="tab10", s=4)
        bar = figure.colorbar(points, ax=axes, label="class")
        if len(classes) <= 12:
            bar.set_ticks(range(len(classes)), labels=list(classes))
    axes.set_title(f"latent codes ({dims}-D{', PCA' if dims > 2 else ''})")
    return figure


def feature_error_figure(errors: dict[str, float]) -> Figure:
    """Horizontal bars of each column's reconstruction error, the worst on top."""
    worst = sorted(errors.items(), key=lambda item: item[1], reverse=True)[:SHOWN_FEATURES]
    figure = Figure(figsize=(6.4, max(2.5, 0.25 * len(worst) + 1)))
    axes = figure.add_subplot()
    axes.barh([name for name, _ in reversed(worst)], [value for _, value in reversed(worst)], color="tab:orange")
    axes.set_xlabel("reconstruction error (scaled units)")
    shown = f"the {len(worst)} worst of {len(errors)} columns" if len(errors) > len(worst) else "every column"
    axes.set_title(f"error per feature ({shown})")
    return figure


def anomaly_figures(scores: np.ndarray, is_anomaly: np.ndarray, scorer: str) -> tuple[Figure, Figure]:
    """The score histograms of normal and anomalous inputs, and the ROC curve of the score."""
    from sklearn.metrics import roc_auc_score, roc_curve

    histogram = Figure(figsize=(6.4, 4.0))
    axes = histogram.add_subplot()
    bins = np.histogram_bin_edges(scores, bins=40)
    axes.hist(scores[~is_anomaly], bins=bins, alpha=0.6, density=True, label=f"normal ({int((~is_anomaly).sum())})")
    axes.hist(scores[is_anomaly], bins=bins, alpha=0.6, density=True, label=f"anomalous ({int(is_anomaly.sum())})")
    axes.set_xlabel(f"anomaly score ({scorer})")
    axes.set_ylabel("density")
    axes.legend()
    roc = Figure(figsize=(4.5, 4.5))
    axes = roc.add_subplot()
    false_positive, true_positive, _ = roc_curve(is_anomaly, scores)
    axes.plot(false_positive, true_positive, color="tab:red", label=f"AUROC {roc_auc_score(is_anomaly, scores):.3f}")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":")
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.legend(loc="lower right")
    return histogram, roc


@torch.no_grad()
def save_figures(model: Autoencoder, data: Data, folder: Path, settings: EvaluationConfig) -> list[Path]:
    """Draw every figure that applies to this model and data into `folder`; returns the files."""
    from aesearch.parts.data import VECTOR
    from aesearch.training.evaluate import feature_errors
    from aesearch.training.scoring import fit_scorer, seen

    model.eval()
    spec, x = data.spec, data.test_x
    codes = model.encode(x[:POINTS], sample=False).code.float().cpu()
    labels = data.test_y[:POINTS] if data.test_y is not None else None
    paths = [_save(latent_figure(codes, labels, spec.classes), folder / "latent.png")]
    needs_reconstruction = spec.modality == VECTOR or (spec.anomalies and data.test_y is not None)
    test = seen(model, x, settings.batch_size) if needs_reconstruction else None
    if spec.modality == VECTOR:
        paths.append(_save(feature_error_figure(feature_errors(test.x_hat, x, spec)), folder / "feature_errors.png"))
    if spec.anomalies and data.test_y is not None:
        is_anomaly = spec.is_anomaly(data.test_y).cpu().numpy()
        if 0 < is_anomaly.sum() < len(is_anomaly):
            scores = fit_scorer(model, data, settings)(test).cpu().numpy()
            histogram, roc = anomaly_figures(scores, is_anomaly, settings.anomaly_score)
            paths += [_save(histogram, folder / "anomaly_scores.png"), _save(roc, folder / "roc.png")]
    return paths
