"""The clustering refinement (IDEC, DEC) as the trainer runs it over the run's last epochs.

At the first refining epoch the clusterer groups the codes of every training row, and each group's
mean code becomes a centre: a trainable tensor beside the model's weights, in the same optimiser.
Each refining step then adds gamma * KL(P || Q) of its batch to the objective (weighted by the
refinement's `reconstruction_weight`; gamma weighs the KL against the objective per input value, as
IDEC's mean squared error does). The target P of every training row is recomputed from the
current weights at the start of every epoch and every `update_interval` steps within it; recomputed
at epoch starts, it needs no state of its own to resume exactly. Once fewer than `tol` of the rows
change cluster between two updates the refinement has converged: the run ends with that epoch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from aesearch.parts.clustering import (
    REFINEMENTS,
    ClusteringConfig,
    cluster_means,
    clustering_kl,
    soft_assignment,
    target_distribution,
)
from aesearch.training.evaluate import cluster_codes

if TYPE_CHECKING:
    from aesearch.config import EvaluationConfig
    from aesearch.parts.models import Autoencoder


class Refiner:
    """The centres, the targets and the convergence of one run's refinement."""

    def __init__(self, config: ClusteringConfig, clusters: int, latent_dim: int, values: int, device: torch.device):
        self.config = config
        # IDEC weighs KL(P || Q) against the squared error per value; aesearch's objectives sum an
        # input's values, so the KL term is gamma * values * KL to keep the paper's balance
        self.weight = config.gamma * values
        self.refinement = REFINEMENTS[config.refinement]
        self.centres = torch.nn.Parameter(torch.zeros(clusters, latent_dim, device=device))
        self.started = False  # the clusterer has placed the centres
        self.targets: torch.Tensor | None = None  # P of every training row, at the last update
        self.labels: torch.Tensor | None = None  # each training row's cluster at the last update
        self.converged = False

    @torch.no_grad()
    def start(self, model: Autoencoder, x: torch.Tensor, settings: EvaluationConfig) -> None:
        """Centres: the mean code of each of the clusterer's groups of the training rows."""
        codes = codes_of(model, x, settings.batch_size)
        labels = cluster_codes(codes.cpu(), len(self.centres), settings, self.config)
        labels = torch.as_tensor(labels, dtype=torch.long, device=codes.device)
        self.centres.copy_(cluster_means(codes, labels, len(self.centres)))
        self.started = True

    @torch.no_grad()
    def update(self, model: Autoencoder, x: torch.Tensor, batch: int) -> None:
        """New targets from the current weights; converged once fewer than `tol` rows moved."""
        q = soft_assignment(codes_of(model, x, batch), self.centres)
        labels = q.argmax(1)
        if self.labels is not None and (labels != self.labels).float().mean().item() < self.config.tol:
            self.converged = True
        self.labels, self.targets = labels, target_distribution(q)
        model.train()

    def loss(self, objective_loss: torch.Tensor, codes: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the step's loss, its KL(P || Q)) for the batch of training rows `rows`."""
        kl = clustering_kl(self.targets[rows], soft_assignment(codes, self.centres))
        weight = self.refinement.reconstruction_weight
        if weight == 0:  # DEC: not even a zero gradient, which would let Adam's momentum move the decoder
            return self.weight * kl, kl
        return weight * objective_loss + self.weight * kl, kl

    @torch.no_grad()
    def validation_kl(self, model: Autoencoder, x: torch.Tensor, batch: int) -> float:
        """KL(P || Q) of the validation rows, their P sharpened from their own Q."""
        q = soft_assignment(codes_of(model, x, batch), self.centres)
        return clustering_kl(target_distribution(q), q).item()

    def state(self) -> dict[str, Any]:
        return {"started": self.started, "labels": self.labels, "converged": self.converged}

    def restore(self, state: dict[str, Any]) -> None:
        """The centres come back with the trainer's other parameters; the targets at the next update."""
        self.started, self.labels, self.converged = state["started"], state["labels"], state["converged"]
        if self.labels is not None:
            self.labels = self.labels.to(self.centres.device)


@torch.no_grad()
def fit_centres(model: Autoencoder, x: torch.Tensor, clusters: int, settings: EvaluationConfig,
                config: ClusteringConfig) -> torch.Tensor:
    """The mean code of each of the clusterer's groups of `x`: where new codes are assigned."""
    codes = codes_of(model, x, settings.batch_size)
    labels = cluster_codes(codes.cpu(), clusters, settings, config)
    return cluster_means(codes, torch.as_tensor(labels, dtype=torch.long, device=codes.device), clusters)


@torch.no_grad()
def codes_of(model: Autoencoder, x: torch.Tensor, batch: int) -> torch.Tensor:
    """The code of every row, on x's device, in eval mode (the caller puts training mode back)."""
    model.eval()
    return torch.cat([model.encode(chunk, sample=False).code.float() for chunk in x.split(batch)])
