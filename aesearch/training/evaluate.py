"""The evaluation suite: what a trained autoencoder is worth, on the test split.

Every metric is named `test/...` and computed the same way for every variant, so a search can
rank VAEs against sparse or denoising AEs on common ground. What applies depends on the data
(`data.spec`): images and [0, 1] tables, real-valued vectors, labelled or not.

- reconstruction of clean inputs: recon_mse and recon_l1 per value, in the model's input units
  (scaled, for tables); for data in [0, 1] also recon_bce and psnr (per image); for tables with
  numeric columns recon_mse_original, the numeric columns' error in their original units;
- denoising: for each corruption of `evaluation.denoise_levels` that suits the data, the
  reconstruction from corrupted inputs against the clean ones, and the corrupted input's own
  error for scale: PSNR for data in [0, 1], MSE otherwise;
- gaussian latents: ELBO, KL, the NLL by importance sampling (IWAE bound, nats) and the active
  units (Burda et al.: Cov_x(E_q[z_u|x]) > 0.01). The likelihood: for data in [0, 1] a
  Bernoulli decoder on the inputs binarised stochastically once, from a fixed seed (the VAE
  literature's protocol; the same bits whatever `data.binarize` trained on: binarize.py);
  otherwise the `mixed` decoder (unit-variance Gaussian per numeric value, categorical per
  one-hot group) on the inputs as given;
- latent quality, for labelled data only: linear-probe and kNN accuracy (train codes -> test),
  KMeans ARI, NMI and accuracy (clusters matched to classes one-to-one, as DEC reports it);
- sparsity of the code: mean |h|, fraction of active values, dead units;
- anomaly detection, when the data names anomaly classes and the test split has labels: AUROC
  and average precision of the anomaly score `evaluation.anomaly_score` names (scoring.py).

A metric that does not apply is absent, never zero.
"""

from __future__ import annotations

import ctypes
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from aesearch.parts.corruption import corrupt, corruption_problem
from aesearch.parts.data.binarize import fixed_bits
from aesearch.parts.clustering import (
    CLUSTERERS,
    REFINEMENTS,
    ClusteringConfig,
    number_of_clusters,
    soft_assignment,
)
from aesearch.parts.data.spec import CATEGORICAL, NUMERIC
from aesearch.parts.objectives import RECONSTRUCTIONS, gaussian_kl, likelihood, log_normal
from aesearch.training.scoring import fit_scorer, seen

if TYPE_CHECKING:
    from aesearch.config import EvaluationConfig
    from aesearch.parts.data import Data
    from aesearch.parts.data.spec import DataSpec
    from aesearch.parts.models import Autoencoder

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016)
EVALUATION_SEED = 0  # the noise of the denoising metrics and the IWAE samples
TRIM_EVERY = 50  # chunks of the IWAE bound between two releases of freed memory (seconds of work)


@torch.no_grad()
def evaluate(
    model: Autoencoder,
    data: Data,
    settings: EvaluationConfig,
    clustering: ClusteringConfig | None = None,
    centres: torch.Tensor | None = None,
) -> dict[str, float]:
    """Run the whole suite on data.test_x / test_y; returns {'test/<metric>': value}.

    The codes are grouped by `clustering`'s clusterer (default: KMeans), or, for a refined model,
    assigned to its `centres` (`clustering.soft_assignment`).

    Its randomness (corruptions, importance samples) comes from a generator of its own with a
    fixed seed: the metrics depend on the weights and data alone, so a stored checkpoint
    evaluates to what its trial logged, and the caller's random state is left untouched.
    """
    model.eval()
    spec, x, batch = data.spec, data.test_x, settings.batch_size
    generator = torch.Generator(x.device).manual_seed(EVALUATION_SEED)
    test = seen(model, x, batch)  # once: the reconstruction, latent and anomaly metrics share it
    metrics = reconstruction_metrics(test.x_hat, x, spec)
    metrics |= denoising_metrics(model, x, settings.denoise_levels, batch, generator, spec)
    if model.stochastic:
        metrics |= gaussian_latent_metrics(model, x, "test", settings.iwae_samples, batch, generator, spec)
    test_codes = test.codes.cpu()
    if spec.classes and data.test_y is not None:
        train_labels = None if data.train_y is None else data.train_y[: settings.probe_max_samples]
        train_codes = encode(model, data.train_x[: settings.probe_max_samples], batch)
        metrics |= latent_quality(train_codes, train_labels, test_codes, data.test_y, settings, clustering, centres)
    metrics |= sparsity_metrics(test_codes, settings.activation_threshold)
    if spec.anomalies and data.test_y is not None:
        metrics |= anomaly_metrics(fit_scorer(model, data, settings)(test), data.test_y, spec)
    return {f"test/{name}": float(value) for name, value in metrics.items()}


def _batches(x: torch.Tensor, size: int):
    for start in range(0, len(x), size):
        yield x[start : start + size]


def release_freed_memory() -> None:
    """Hands the memory torch has freed back to the system (glibc's `malloc_trim`; elsewhere nothing).

    glibc keeps what each of torch's threads frees in that thread's arena: the IWAE bound's thousands
    of chunks, tens of MB of temporaries each, grew a process evaluating 10,000 MNIST images with
    k = 1,000 to 24 GB, where trimming every 50 chunks keeps it at 1.5 GB (benchmarks/README.md).
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator is not the one that hoards
        pass


@torch.no_grad()
def encode(model: Autoencoder, x: torch.Tensor, batch: int) -> torch.Tensor:
    """The code of each input (the mean, for gaussian latents), on the CPU."""
    model.eval()
    return torch.cat([model.encode(chunk, sample=False).code.float().cpu() for chunk in _batches(x, batch)])


@torch.no_grad()
def reconstruct(model: Autoencoder, x: torch.Tensor, batch: int) -> torch.Tensor:
    """x_hat through the latent mean (no sampling), in the data's space (the model's spec.values)."""
    model.eval()
    return torch.cat([model(chunk, sample=False).x_hat.float() for chunk in _batches(x, batch)])


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB, for values in [0, 1]."""
    mse = (x_hat - x).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def reconstruction_metrics(x_hat: torch.Tensor, x: torch.Tensor, spec: DataSpec) -> dict[str, float]:
    """Errors per value in the model's units; BCE and PSNR where values are in [0, 1]; the
    numeric columns' MSE in their original units (error times each column's scale)."""
    error = x_hat - x
    metrics = {"recon_mse": error.pow(2).mean().item(), "recon_l1": error.abs().mean().item()}
    if spec.unit_range:
        metrics["recon_bce"] = F.binary_cross_entropy(x_hat.clamp(1e-6, 1 - 1e-6), x).item()
        metrics["psnr"] = psnr(x_hat, x).mean().item()
    numeric = [column for column in spec.columns if column.kind == NUMERIC]
    if numeric:
        positions = [column.start for column in numeric]
        scales = torch.tensor([column.scale for column in numeric], device=x.device)
        metrics["recon_mse_original"] = (error.flatten(1)[:, positions] * scales).pow(2).mean().item()
    return metrics


def column_errors(x_hat: torch.Tensor, x: torch.Tensor, spec: DataSpec) -> dict[str, torch.Tensor]:
    """Each sample's error in each column, by column name: the squared error of a numeric column,
    in the model's input units (scaled, so that columns compare), and 1 where a categorical
    column is misread (x_hat's most likely level is not x's, or x's level was never seen in
    training: all zeros), else 0. Data without columns
    (images, plain vectors): the squared error of each position, named by its flat index."""
    x_hat, x = x_hat.flatten(1), x.flatten(1)
    if not spec.columns:
        return {str(i): error for i, error in enumerate((x_hat - x).pow(2).unbind(1))}
    errors = {}
    for column in spec.columns:
        group = column.positions
        if column.kind == CATEGORICAL:
            unseen = x[:, group].sum(1) == 0
            errors[column.name] = ((x_hat[:, group].argmax(1) != x[:, group].argmax(1)) | unseen).float()
        else:
            errors[column.name] = (x_hat[:, group] - x[:, group]).pow(2).sum(1)
    return errors


def feature_errors(x_hat: torch.Tensor, x: torch.Tensor, spec: DataSpec) -> dict[str, float]:
    """How well each column is reconstructed, by column name (see column_errors): the mean squared
    error of a numeric column, the misclassification rate of a categorical one."""
    return {name: errors.mean().item() for name, errors in column_errors(x_hat, x, spec).items()}


def denoising_metrics(
    model: Autoencoder, x: torch.Tensor, levels: dict[str, float], batch: int, generator: torch.Generator,
    spec: DataSpec,
) -> dict[str, float]:
    """For each corruption kind that suits the data: how close the reconstruction of corrupted
    inputs comes to the clean ones, and the corrupted inputs themselves (the baseline). PSNR for
    data in [0, 1], MSE per value otherwise."""
    if spec.unit_range:
        name, score = "psnr", lambda y: psnr(y, x).mean()
    else:
        name, score = "mse", lambda y: (y - x).pow(2).mean()
    metrics = {}
    for kind, level in levels.items():
        if corruption_problem(kind, spec):
            continue
        noisy = corrupt(x, kind, level, generator, spec)
        metrics[f"denoise_{name}_{kind}"] = score(reconstruct(model, noisy, batch)).item()
        metrics[f"noisy_{name}_{kind}"] = score(noisy).item()
    return metrics


def gaussian_latent_metrics(
    model: Autoencoder, x: torch.Tensor, split: str, k: int, batch: int, generator: torch.Generator, spec: DataSpec
) -> dict[str, float]:
    """ELBO and IWAE_k bound (nats per sample) under the decoder `likelihood(spec)` names, on the
    split's fixed bits where it binarises (`fixed_bits(x, split)`: already x when the data was
    binarised at loading); KL and active units on the inputs as given. The samples z_i are drawn
    from `generator`.

    log p(x) >= IWAE_k = E[log 1/k sum_i p(x, z_i) / q(z_i|x)] >= ELBO, z_i ~ q(z|x).
    """
    loss, binarise = likelihood(spec)
    negative_log_likelihood = RECONSTRUCTIONS[loss]
    targets_all = fixed_bits(x, split) if binarise else x.float()
    elbo, iwae = [], []
    for step, xb in enumerate(_batches(targets_all, max(1, 10 * batch // k))):  # about 10 * batch decodes at once
        if step % TRIM_EVERY == 0:
            release_freed_memory()
        latent = model.encode(xb, sample=False)
        mu, logvar = latent.mu.float(), latent.logvar.float()
        noise = torch.randn((k, *mu.shape), device=mu.device, generator=generator)
        z = mu + noise * torch.exp(0.5 * logvar)  # (k, B, d)
        logits = model.decode(z.reshape(-1, mu.shape[1]).to(latent.mu.dtype)).float()
        targets = xb.expand(k, *xb.shape).reshape(-1, *xb.shape[1:])
        log_px_z = -negative_log_likelihood(logits, targets, spec).view(k, -1)
        log_w = log_px_z + log_normal(z, torch.zeros_like(z), torch.zeros_like(z)) - log_normal(z, mu, logvar)
        iwae.append(torch.logsumexp(log_w, dim=0) - math.log(k))
        elbo.append(log_px_z.mean(0) - gaussian_kl(mu, logvar))
    latents = [model.encode(chunk, sample=False) for chunk in _batches(x, batch)]
    mu = torch.cat([latent.mu.float() for latent in latents])
    logvar = torch.cat([latent.logvar.float() for latent in latents])
    return {
        "elbo": torch.cat(elbo).mean().item(),
        "nll": -torch.cat(iwae).mean().item(),
        "kl": gaussian_kl(mu, logvar).mean().item(),
        "active_units": (mu.var(dim=0) > ACTIVE_UNIT_THRESHOLD).sum().item(),
    }


def latent_quality(
    train_codes: torch.Tensor,
    train_labels: torch.Tensor | None,
    test_codes: torch.Tensor,
    test_labels: torch.Tensor,
    settings: EvaluationConfig,
    clustering: ClusteringConfig | None = None,
    centres: torch.Tensor | None = None,
) -> dict[str, float]:
    """How much class structure the codes carry, without labels in training. The clusters need the
    test labels only; the probe and kNN learn from the training codes' labels, when there are."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train = train_codes.numpy().astype(np.float64)
    y_test = test_labels.cpu().numpy()
    clusters = cluster_codes(test_codes, len(np.unique(y_test)), settings, clustering, centres)
    metrics = {
        "cluster_ari": adjusted_rand_score(y_test, clusters),
        "cluster_nmi": normalized_mutual_info_score(y_test, clusters),
        "cluster_accuracy": cluster_accuracy(y_test, clusters),
    }
    x_test = test_codes.numpy().astype(np.float64)
    y_train = None if train_labels is None else train_labels.cpu().numpy()
    if y_train is not None and len(np.unique(y_train)) >= 2:  # a classifier needs two classes to learn from
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x_train, y_train)
        knn = KNeighborsClassifier(n_neighbors=min(settings.knn_neighbors, len(x_train))).fit(x_train, y_train)
        metrics |= {"probe_accuracy": probe.score(x_test, y_test), "knn_accuracy": knn.score(x_test, y_test)}
    return metrics


def cluster_codes(
    codes: torch.Tensor,
    classes: int,
    settings: EvaluationConfig,
    clustering: ClusteringConfig | None = None,
    centres: torch.Tensor | None = None,
) -> np.ndarray:
    """A cluster per code: for a refined model, its nearest of the refinement's `centres`; else the
    group the clusterer puts it in (k: `clustering.clusters`, else the `classes` of the labels;
    seed 0, so that a model's metric is a function of its weights), as the papers measure it."""
    clustering = clustering or ClusteringConfig()
    if centres is not None and REFINEMENTS[clustering.refinement].trains:
        return soft_assignment(codes.float(), centres.to(codes.device)).argmax(1).cpu().numpy()
    k = min(number_of_clusters(clustering, classes), len(codes))
    group = CLUSTERERS[clustering.clusterer].group
    return group(codes.cpu().numpy().astype(np.float64), k, settings.kmeans_restarts, clustering.umap_neighbors, 0)


def cluster_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Unsupervised clustering accuracy (DEC, Xie et al. 2016): the share of samples whose cluster
    is matched to their class by the best one-to-one matching of clusters to classes (Hungarian)."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics.cluster import contingency_matrix

    counts = contingency_matrix(labels, clusters)  # classes x clusters
    rows, columns = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, columns].sum() / len(labels))


def sparsity_metrics(codes: torch.Tensor, threshold: float) -> dict[str, float]:
    magnitude = codes.abs()
    active = magnitude > threshold
    return {
        "mean_activation": magnitude.mean().item(),
        "active_fraction": active.float().mean().item(),
        "dead_units": (~active.any(dim=0)).sum().item(),
    }


def anomaly_metrics(scores: torch.Tensor, labels: torch.Tensor, spec: DataSpec) -> dict[str, float]:
    """AUROC and average precision of per-sample anomaly scores for 'is one of spec.anomalies';
    absent when the labels hold only normal samples or only anomalies."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    scores = scores.double().cpu().numpy()
    is_anomaly = spec.is_anomaly(labels).cpu().numpy()
    if is_anomaly.all() or not is_anomaly.any():
        return {}
    return {"anomaly_auroc": roc_auc_score(is_anomaly, scores),
            "anomaly_ap": average_precision_score(is_anomaly, scores)}
