"""The evaluation suite: what a trained autoencoder is worth, on the test split.

Every metric is named `test/...` and computed the same way for every variant, so a search can
rank VAEs against sparse or denoising AEs on common ground:

- reconstruction of clean inputs: recon_mse, recon_bce, recon_l1 (per value), psnr (per image);
- denoising: PSNR of reconstructions from corrupted inputs against the clean ones, for each
  corruption at a standard level (and the corrupted input's own PSNR, for scale);
- gaussian latents: ELBO, KL, the NLL by importance sampling (IWAE bound, nats, binarised
  inputs) and the active units (Burda et al.: Cov_x(E_q[z_u|x]) > 0.01);
- latent quality: linear-probe and kNN accuracy (train codes -> test), KMeans ARI and NMI;
- sparsity of the code: mean |h|, fraction of active values, dead units;
- anomaly detection: AUROC of the reconstruction error when a class was held out of training.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from aesearch.parts.corruption import corrupt
from aesearch.parts.objectives import gaussian_kl, log_normal

if TYPE_CHECKING:
    from aesearch.config import EvaluationConfig
    from aesearch.parts.data import Data
    from aesearch.parts.models import Autoencoder

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016)
EVALUATION_SEED = 0  # the noise of the denoising metrics and the IWAE samples


@torch.no_grad()
def evaluate(model: Autoencoder, data: Data, settings: EvaluationConfig) -> dict[str, float]:
    """Run the whole suite on data.test_x / test_y; returns {'test/<metric>': value}.

    Its randomness (corruptions, importance samples) comes from a generator of its own with a
    fixed seed: the metrics depend on the weights and data alone, so a stored checkpoint
    evaluates to what its trial logged, and the caller's random state is left untouched.
    """
    model.eval()
    x, batch = data.test_x, settings.batch_size
    generator = torch.Generator(x.device).manual_seed(EVALUATION_SEED)
    x_hat = reconstruct(model, x, batch)  # once: the reconstruction and anomaly metrics share it
    metrics = reconstruction_metrics(x_hat, x)
    metrics |= denoising_metrics(model, x, settings.denoise_levels, batch, generator)
    if model.stochastic:
        metrics |= gaussian_latent_metrics(model, x, settings.iwae_samples, batch, generator)
    train_codes = encode(model, data.train_x[: settings.probe_max_samples], batch)
    test_codes = encode(model, x, batch)
    metrics |= latent_quality(
        train_codes, data.train_y[: settings.probe_max_samples], test_codes, data.test_y, settings
    )
    metrics |= sparsity_metrics(test_codes, settings.activation_threshold)
    if data.anomaly_class is not None:
        metrics |= anomaly_metrics((x_hat - x).pow(2).flatten(1).mean(1), data.test_y, data.anomaly_class)
    return {f"test/{name}": float(value) for name, value in metrics.items()}


def _batches(x: torch.Tensor, size: int):
    for start in range(0, len(x), size):
        yield x[start : start + size]


@torch.no_grad()
def encode(model: Autoencoder, x: torch.Tensor, batch: int) -> torch.Tensor:
    """The code of each input (the mean, for gaussian latents), on the CPU."""
    model.eval()
    return torch.cat([model.encode(chunk, sample=False).code.float().cpu() for chunk in _batches(x, batch)])


@torch.no_grad()
def reconstruct(model: Autoencoder, x: torch.Tensor, batch: int) -> torch.Tensor:
    """x_hat through the latent mean (no sampling)."""
    model.eval()
    return torch.cat([model(chunk, sample=False).x_hat.float() for chunk in _batches(x, batch)])


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB, for values in [0, 1]."""
    mse = (x_hat - x).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def reconstruction_metrics(x_hat: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    return {
        "recon_mse": (x_hat - x).pow(2).mean().item(),
        "recon_l1": (x_hat - x).abs().mean().item(),
        "recon_bce": F.binary_cross_entropy(x_hat.clamp(1e-6, 1 - 1e-6), x).item(),
        "psnr": psnr(x_hat, x).mean().item(),
    }


def denoising_metrics(
    model: Autoencoder, x: torch.Tensor, levels: dict[str, float], batch: int, generator: torch.Generator
) -> dict[str, float]:
    metrics = {}
    for kind, level in levels.items():
        noisy = corrupt(x, kind, level, generator)
        metrics[f"denoise_psnr_{kind}"] = psnr(reconstruct(model, noisy, batch), x).mean().item()
        metrics[f"noisy_psnr_{kind}"] = psnr(noisy, x).mean().item()
    return metrics


def gaussian_latent_metrics(
    model: Autoencoder, x: torch.Tensor, k: int, batch: int, generator: torch.Generator
) -> dict[str, float]:
    """ELBO and IWAE_k bound (nats per image) under the Bernoulli decoder on binarised inputs,
    the usual benchmark protocol, comparable across VAEs whatever their training loss; KL and
    active units on the inputs as given. The samples z_i are drawn from `generator`.

    log p(x) >= IWAE_k = E[log 1/k sum_i p(x, z_i) / q(z_i|x)] >= ELBO, z_i ~ q(z|x).
    """
    binary = (x > 0.5).float()
    elbo, iwae = [], []
    for xb in _batches(binary, max(1, 10 * batch // k)):  # about 10 * batch decodes at once
        latent = model.encode(xb, sample=False)
        mu, logvar = latent.mu.float(), latent.logvar.float()
        noise = torch.randn((k, *mu.shape), device=mu.device, generator=generator)
        z = mu + noise * torch.exp(0.5 * logvar)  # (k, B, d)
        logits = model.decode(z.reshape(-1, mu.shape[1]).to(latent.mu.dtype)).float()
        targets = xb.expand(k, *xb.shape).reshape(-1, *xb.shape[1:])
        log_px_z = -F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).sum(1)
        log_px_z = log_px_z.view(k, -1)
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
    train_labels: torch.Tensor,
    test_codes: torch.Tensor,
    test_labels: torch.Tensor,
    settings: EvaluationConfig,
) -> dict[str, float]:
    """How much class structure the codes carry, without labels in training."""
    from sklearn.cluster import KMeans
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, x_test = train_codes.numpy().astype(np.float64), test_codes.numpy().astype(np.float64)
    y_train, y_test = train_labels.cpu().numpy(), test_labels.cpu().numpy()
    clusters = KMeans(
        n_clusters=min(len(np.unique(y_test)), len(x_test)), n_init=settings.kmeans_restarts, random_state=0
    ).fit_predict(x_test)
    metrics = {
        "kmeans_ari": adjusted_rand_score(y_test, clusters),
        "kmeans_nmi": normalized_mutual_info_score(y_test, clusters),
    }
    if len(np.unique(y_train)) >= 2:  # a classifier needs two classes to learn from
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x_train, y_train)
        knn = KNeighborsClassifier(n_neighbors=min(settings.knn_neighbors, len(x_train))).fit(x_train, y_train)
        metrics |= {"probe_accuracy": probe.score(x_test, y_test), "knn_accuracy": knn.score(x_test, y_test)}
    return metrics


def sparsity_metrics(codes: torch.Tensor, threshold: float) -> dict[str, float]:
    magnitude = codes.abs()
    active = magnitude > threshold
    return {
        "mean_activation": magnitude.mean().item(),
        "active_fraction": active.float().mean().item(),
        "dead_units": (~active.any(dim=0)).sum().item(),
    }


def anomaly_metrics(errors: torch.Tensor, labels: torch.Tensor, anomaly_class: int) -> dict[str, float]:
    """AUROC of the per-image reconstruction error as a score for 'is the held-out class'."""
    from sklearn.metrics import roc_auc_score

    scores = errors.cpu().numpy()
    is_anomaly = (labels == anomaly_class).cpu().numpy()
    return {"anomaly_auroc": roc_auc_score(is_anomaly, scores)}
