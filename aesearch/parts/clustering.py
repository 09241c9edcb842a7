"""The clustering stage: which group each input belongs to, read from its code.

Two choices, both in the `clustering` section:

- the clusterer, which groups codes: `kmeans`; `gmm`, a Gaussian mixture with full covariances;
  `umap_gmm`, N2D's manifold step (McConville et al. 2019): UMAP of the codes down to k dimensions,
  then a Gaussian mixture. It groups the codes being evaluated (as DEC, IDEC and N2D report their
  tables), and it places the first cluster centres of a refinement;
- the refinement, which goes on training the autoencoder toward its own clusters for the last
  `refine_epochs` epochs: `idec` (Guo et al. 2017), loss = the objective + gamma * KL(P || Q), Q the
  Student-t soft assignment of each code to k trainable centres, P its sharpened target, recomputed
  every `update_interval` steps; `dec` (Xie et al. 2016), the KL term alone (the decoder idles);
  `none`. Training stops early once fewer than `tol` of the assignments change between two updates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field, model_validator

from aesearch.parts.data.spec import DataSpec
from aesearch.registry import Registry
from aesearch.schema import Bounded, Float, Named, PositiveInt, Section, broken_rule

# (codes (N, d), k clusters, restarts, UMAP neighbours, seed) -> a cluster per code, 0..k-1
Group = Callable[[np.ndarray, int, int, int, int], np.ndarray]


@dataclass(frozen=True)
class Clusterer:
    description: str
    group: Group


CLUSTERERS: Registry[Clusterer] = Registry("clusterer")


def kmeans(codes: np.ndarray, k: int, restarts: int, neighbors: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=restarts, random_state=seed).fit_predict(codes)


def gaussian_mixture(codes: np.ndarray, k: int, restarts: int, neighbors: int, seed: int) -> np.ndarray:
    from sklearn.mixture import GaussianMixture

    # a small ridge on the covariances: a code unit that barely varies would make one singular
    return GaussianMixture(k, covariance_type="full", n_init=restarts, reg_covar=1e-4,
                           random_state=seed).fit_predict(codes)


def umap_then_gaussian_mixture(codes: np.ndarray, k: int, restarts: int, neighbors: int, seed: int) -> np.ndarray:
    """N2D: the codes' manifold, learnt by UMAP (min_dist 0, k dimensions), clustered by a mixture."""
    import umap

    manifold = umap.UMAP(n_neighbors=min(neighbors, len(codes) - 1), n_components=k, min_dist=0.0,
                         random_state=seed, n_jobs=1).fit_transform(codes)
    return gaussian_mixture(manifold, k, restarts, neighbors, seed)


CLUSTERERS.add("kmeans", Clusterer("KMeans on the codes", kmeans))
CLUSTERERS.add("gmm", Clusterer("a Gaussian mixture (full covariances) on the codes", gaussian_mixture))
CLUSTERERS.add("umap_gmm", Clusterer("N2D: UMAP of the codes to k dimensions, then a Gaussian mixture",
                                     umap_then_gaussian_mixture))


@dataclass(frozen=True)
class Refinement:
    description: str
    trains: bool  # does it train the autoencoder after the clusterer placed the centres?
    reconstruction_weight: float = 1.0  # the objective's weight beside gamma * KL(P || Q)


REFINEMENTS: Registry[Refinement] = Registry("clustering refinement")
REFINEMENTS.add("none", Refinement("the codes as the autoencoder left them", trains=False))
REFINEMENTS.add("idec", Refinement("IDEC: the objective + gamma * KL(P || Q), so the codes keep the data's "
                                   "structure while they gather around the centres", trains=True))
REFINEMENTS.add("dec", Refinement("DEC: KL(P || Q) alone (the decoder is not trained)", trains=True,
                                  reconstruction_weight=0.0))


class ClusteringConfig(Section):
    """How codes are grouped: by val/cluster_*, test/cluster_*, the served model and a refinement."""

    clusterer: Named(CLUSTERERS) = "kmeans"
    clusters: PositiveInt | None = Field(None, le=10_000)  # k; None: the data's number of classes
    umap_neighbors: Bounded(1000) = 10  # UMAP's n_neighbors (umap_gmm); N2D's setting
    refinement: Named(REFINEMENTS) = "none"
    refine_epochs: int = Field(0, ge=0, le=100_000)  # the run's last epochs that refine (refinement != none)
    gamma: Float = Field(0.1, gt=0.0, le=1000.0)  # the KL term's weight (IDEC: 0.1)
    update_interval: Bounded(1_000_000) = 140  # training steps between two targets P (IDEC on MNIST: 140)
    tol: Float = Field(0.001, ge=0.0, lt=1.0)  # stop once fewer than this share of assignments change

    @model_validator(mode="after")
    def _refinement_has_epochs(self) -> ClusteringConfig:
        trains = REFINEMENTS[self.refinement].trains
        if trains and self.refine_epochs == 0:
            raise broken_rule(f"clustering.refine_epochs=0: clustering.refinement={self.refinement!r} needs at "
                              "least one epoch to refine in (the last refine_epochs of the run's epochs)")
        if not trains and self.refine_epochs:
            raise broken_rule(f"clustering.refine_epochs={self.refine_epochs}: it applies only with a "
                              "clustering.refinement (idec or dec), and clustering.refinement is 'none'")
        return self


def number_of_clusters(config: ClusteringConfig, classes: int) -> int | None:
    """k: the section's, else the data's number of classes; None where neither says."""
    return config.clusters or (classes or None)


def clustering_problem(config: ClusteringConfig, spec: DataSpec) -> str | None:
    """Why this section cannot cluster this data, or None."""
    if REFINEMENTS[config.refinement].trains and number_of_clusters(config, len(spec.classes)) is None:
        return (f"clustering.clusters: not set, and clustering.refinement={config.refinement!r} needs a number of "
                "clusters: the data has no class labels to take it from (set clustering.clusters)")
    return None


def soft_assignment(codes: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Q: q_ij proportional to (1 + |z_i - mu_j|^2)^-1, the Student-t kernel with one degree of freedom."""
    kernel = 1.0 / (1.0 + torch.cdist(codes.float(), centres.float()).pow(2))
    return kernel / kernel.sum(1, keepdim=True)


def target_distribution(q: torch.Tensor) -> torch.Tensor:
    """P: q squared, divided by each cluster's frequency, renormalised: confident assignments weigh
    more, and a large cluster cannot swallow the others."""
    weight = q.pow(2) / q.sum(0)
    return weight / weight.sum(1, keepdim=True)


def clustering_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q), summed over clusters, averaged over rows."""
    tiny = torch.finfo(q.dtype).tiny
    return (p * (p.clamp_min(tiny).log() - q.clamp_min(tiny).log())).sum(1).mean()


def cluster_means(codes: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """The mean code of each cluster (k, d); an empty cluster keeps the overall mean."""
    sums = torch.zeros(k, codes.shape[1], dtype=codes.dtype, device=codes.device).index_add_(0, labels, codes)
    counts = torch.bincount(labels, minlength=k).to(codes.dtype).unsqueeze(1)
    return torch.where(counts > 0, sums / counts.clamp_min(1), codes.mean(0))
