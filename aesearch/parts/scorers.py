"""Anomaly scores: how unlike the normal data an input is, read from what the model makes of it.

The reconstruction error asks whether the model can redraw an input, and an autoencoder that
generalises redraws some anomalies well too. The code space gives other views, those the classical
detectors take of raw data (the distance to the nearest normal rows; a Gaussian of the normal rows):

- reconstruction: the mean squared error of the input's reconstruction (the default);
- knn: the mean distance of the input's code to the codes of its k nearest normal training rows;
- mahalanobis: the Mahalanobis distance of the code to the Gaussian of the normal training codes
  (covariance shrunk by Ledoit-Wolf: a few thousand codes of a wide latent are near-singular);
- combined: those three, each standardised by its mean and spread on the normal validation rows,
  then summed, so that no one weighs more for its units;
- neg_elbo (gaussian latents): the negative ELBO at the code's mean, -log p(x|mu) under the
  evaluation's likelihood (objectives.likelihood) plus KL(q(z|x) || N(0, I));
- lof: scikit-learn's local outlier factor of the input beside its reconstruction residual, among
  the normal training rows. On raw pixels LOF is the detector to beat on one-class MNIST; the
  residual moves a row the model cannot redraw away from its neighbours in the input space;
- joint_mahalanobis: the Mahalanobis distance of the input beside its reconstruction residual (the
  space lof reads) to their Gaussian over the normal training rows (Ledoit-Wolf). For a linear
  autoencoder the residual is a linear function of the input, and this is the input's own
  Mahalanobis distance, the classical detector of tables; a trained model bends that Gaussian.
  Unlike the reconstruction error it weighs each part of the residual by how much the normal rows
  vary there and whether they err together. It keeps a (2 x features)^2 precision, so inputs are
  capped at `max_features`.

A scorer is fitted once per model on normal rows (`fit`: plain tensors, kept in the checkpoint), then
scores any rows (`score`), so that `aesearch score` and the served model score as the evaluation did.
What scoring builds from the kept tensors (`prepare`: a fitted scikit-learn detector) is built once
per fitted scorer. Higher is more anomalous.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from aesearch.parts.data.spec import DataSpec
from aesearch.parts.objectives import RECONSTRUCTIONS, gaussian_kl, likelihood
from aesearch.registry import Registry

Fitted = dict[str, torch.Tensor]  # what a scorer keeps of the normal rows: plain tensors
Prepared = dict[str, object]  # what scoring builds from them in memory, never in a checkpoint
CHUNK = 1024  # rows whose distances to every kept code are computed at once


@dataclass(frozen=True)
class Seen:
    """What a model makes of some rows, on one device: all any scorer reads."""

    x: torch.Tensor  # the inputs, in the model's units
    logits: torch.Tensor  # the decoder's output from the code (the mean of a gaussian latent)
    codes: torch.Tensor  # (N, latent_dim), float32
    logvar: torch.Tensor | None  # (N, latent_dim) for a gaussian latent
    spec: DataSpec

    @property
    def x_hat(self) -> torch.Tensor:
        return self.spec.values(self.logits).float()


@dataclass(frozen=True)
class AnomalyScorer:
    description: str
    # (N,) scores of the rows seen, higher: more anomalous; reads what `fit` kept and `prepare` built
    score: Callable[[Seen, Fitted], torch.Tensor]
    # (normal training rows, normal validation rows, k neighbours) -> what to keep; None: nothing to fit
    fit: Callable[[Seen, Seen, int], Fitted] | None = None
    prepare: Callable[[Fitted], Prepared] | None = None
    neighbors: int = 5  # k when evaluation.anomaly_neighbors is not set
    gaussian_only: bool = False
    max_features: int | None = None  # the widest input (features) it can score; None: any


ANOMALY_SCORERS: Registry[AnomalyScorer] = Registry("anomaly score")


def reconstruction_error(seen: Seen, fitted: Fitted) -> torch.Tensor:
    """The mean squared error of each row's reconstruction, in the model's units."""
    return (seen.x_hat - seen.x.float()).pow(2).flatten(1).mean(1)


def keep_codes(train: Seen, val: Seen, neighbors: int) -> Fitted:
    return {"codes": train.codes.float(), "neighbors": torch.tensor(min(neighbors, len(train.codes)))}


def nearest_codes_distance(seen: Seen, fitted: Fitted) -> torch.Tensor:
    """The mean Euclidean distance of each code to its k nearest kept codes."""
    kept, k = fitted["codes"].to(seen.codes.device), int(fitted["neighbors"])
    distances = [torch.cdist(chunk.float(), kept).topk(k, dim=1, largest=False).values.mean(1)
                 for chunk in seen.codes.split(CHUNK)]
    return torch.cat(distances) if distances else seen.codes.new_zeros(0)


def gaussian_of(rows: torch.Tensor) -> Fitted:
    """The Gaussian of these rows, its covariance shrunk by Ledoit-Wolf: its mean and precision."""
    from sklearn.covariance import LedoitWolf

    gaussian = LedoitWolf().fit(rows.double().cpu().numpy())
    return {"location": torch.from_numpy(gaussian.location_), "precision": torch.from_numpy(gaussian.precision_)}


def distance_to_gaussian(rows: torch.Tensor, fitted: Fitted) -> torch.Tensor:
    """sqrt((r - mean)^T Precision (r - mean)) of each row, in float64."""
    centred = rows.double() - fitted["location"].to(rows.device)
    squared = ((centred @ fitted["precision"].to(rows.device)) * centred).sum(1)
    return squared.clamp_min(0).sqrt().float()


def fit_gaussian(train: Seen, val: Seen, neighbors: int) -> Fitted:
    return gaussian_of(train.codes)


def mahalanobis_distance(seen: Seen, fitted: Fitted) -> torch.Tensor:
    """The Mahalanobis distance of each code to the Gaussian of the normal training codes."""
    return distance_to_gaussian(seen.codes, fitted)


def negative_elbo(seen: Seen, fitted: Fitted) -> torch.Tensor:
    """-log p(x | mu) + KL(q(z|x) || N(0, I)) in nats per row: the ELBO at the latent mean."""
    loss, _ = likelihood(seen.spec)
    return (RECONSTRUCTIONS[loss](seen.logits.float(), seen.x.float(), seen.spec)
            + gaussian_kl(seen.codes.float(), seen.logvar.float())).float()


def input_and_residual(seen: Seen) -> torch.Tensor:
    """Each row's input beside its reconstruction residual, flattened: the space lof and joint_mahalanobis read."""
    x = seen.x.float().flatten(1)
    return torch.cat([x, seen.x_hat.flatten(1) - x], dim=1)


def fit_joint_gaussian(train: Seen, val: Seen, neighbors: int) -> Fitted:
    return gaussian_of(input_and_residual(train))


def joint_mahalanobis_distance(seen: Seen, fitted: Fitted) -> torch.Tensor:
    """The Mahalanobis distance of each row's (input, residual) to the Gaussian of the normal training rows'."""
    return distance_to_gaussian(input_and_residual(seen), fitted)


def keep_inputs_and_residuals(train: Seen, val: Seen, neighbors: int) -> Fitted:
    return {"rows": input_and_residual(train), "neighbors": torch.tensor(max(1, min(neighbors, len(train.x) - 1)))}


def fit_local_outlier_factor(fitted: Fitted) -> Prepared:
    from sklearn.neighbors import LocalOutlierFactor

    detector = LocalOutlierFactor(n_neighbors=int(fitted["neighbors"]), novelty=True)
    return {"detector": detector.fit(fitted["rows"].cpu().numpy())}


def local_outlier_factor(seen: Seen, fitted: Fitted) -> torch.Tensor:
    """scikit-learn's LOF of each row's input and residual (its score_samples, negated: higher is odder)."""
    rows = input_and_residual(seen).cpu().numpy()
    scores = -fitted["detector"].score_samples(rows) if len(rows) else rows[:, 0]
    return torch.as_tensor(scores, dtype=torch.float32, device=seen.x.device)


COMBINED = ("reconstruction", "knn", "mahalanobis")


def fit_combined(train: Seen, val: Seen, neighbors: int) -> Fitted:
    """Each part fitted on the training rows, then its mean and spread over the normal validation rows
    (over the training rows where validation holds fewer than two normal rows)."""
    fitted: Fitted = {}
    reference = val if len(val.x) >= 2 else train
    for name in COMBINED:
        part = ANOMALY_SCORERS[name]
        kept = part.fit(train, val, neighbors) if part.fit else {}
        scores = part.score(reference, kept).double()
        fitted |= {f"{name}.{key}": value for key, value in kept.items()}
        fitted |= {f"{name}.mean": scores.mean(), f"{name}.std": scores.std().clamp_min(1e-12)}
    return fitted


def combined_score(seen: Seen, fitted: Fitted) -> torch.Tensor:
    total = torch.zeros(len(seen.x), dtype=torch.float64, device=seen.x.device)
    for name in COMBINED:
        kept = {key.removeprefix(f"{name}."): value for key, value in fitted.items() if key.startswith(f"{name}.")}
        total += (ANOMALY_SCORERS[name].score(seen, kept).double() - kept["mean"]) / kept["std"]
    return total.float()


ANOMALY_SCORERS.add("reconstruction", AnomalyScorer("the mean squared reconstruction error", reconstruction_error))
ANOMALY_SCORERS.add("knn", AnomalyScorer("the mean distance of the code to the k nearest normal training codes",
                                         nearest_codes_distance, keep_codes))
ANOMALY_SCORERS.add("mahalanobis", AnomalyScorer("the Mahalanobis distance of the code to the normal training codes",
                                                 mahalanobis_distance, fit_gaussian))
ANOMALY_SCORERS.add("combined", AnomalyScorer("reconstruction + knn + mahalanobis, each standardised on the normal "
                                              "validation rows", combined_score, fit_combined))
ANOMALY_SCORERS.add("neg_elbo", AnomalyScorer("the negative ELBO at the latent mean (gaussian latents)", negative_elbo,
                                              gaussian_only=True))
ANOMALY_SCORERS.add("lof", AnomalyScorer("the local outlier factor of the input and its reconstruction residual among "
                                         "the normal training rows", local_outlier_factor, keep_inputs_and_residuals,
                                         prepare=fit_local_outlier_factor, neighbors=20))  # scikit-learn's default
ANOMALY_SCORERS.add("joint_mahalanobis", AnomalyScorer(
    "the Mahalanobis distance of the input and its reconstruction residual together to the normal training rows'",
    joint_mahalanobis_distance, fit_joint_gaussian, max_features=1024))  # a precision of at most 2048^2 float64: 34 MB


def scorer_input_problem(kind: str, spec: DataSpec) -> str | None:
    """Why evaluation.anomaly_score=kind cannot score inputs this wide, in one line, or None."""
    widest = ANOMALY_SCORERS[kind].max_features
    if widest is not None and spec.features > widest:
        return (f"evaluation.anomaly_score={kind!r} keeps a (2 x features)^2 precision matrix, so it takes inputs of at "
                f"most {widest} features, and {spec.name}'s have {spec.features} {spec.shape}: choose another score")
    return None


def scorer_problem(kind: str, stochastic: bool) -> str | None:
    """Why evaluation.anomaly_score=kind does not suit the model, in one line, or None."""
    if ANOMALY_SCORERS[kind].gaussian_only and not stochastic:
        return (f"evaluation.anomaly_score={kind!r} needs a gaussian latent (model.latent: gaussian), but the model's "
                "latent is deterministic")
    return None
