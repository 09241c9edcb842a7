"""The dense architecture: a stacked MLP, for images (flattened) and vectors alike."""

from __future__ import annotations

import math

import torch
from torch import nn

from aesearch.parts.data.spec import DataSpec
from aesearch.parts.models.config import ACTIVATIONS, ModelConfig


def _mlp(widths: list[int], activation: str) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths, widths[1:]):
        layers += [nn.Linear(width_in, width_out), ACTIVATIONS[activation]()]
    return layers


class DenseEncoder(nn.Module):
    """Flatten (a no-op on vectors), then Linear + activation for each of `hidden_dims` (none:
    the input values themselves)."""

    def __init__(self, config: ModelConfig, spec: DataSpec):
        super().__init__()
        widths = [math.prod(spec.shape), *config.hidden_dims]
        self.layers = nn.Sequential(nn.Flatten(), *_mlp(widths, config.activation))
        self.out_features = widths[-1]
        self.is_identity = not config.hidden_dims  # features == flattened input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DenseDecoder(nn.Module):
    """The encoder mirrored: latent -> reversed hidden widths -> the input's values, in its shape."""

    def __init__(self, config: ModelConfig, spec: DataSpec):
        super().__init__()
        shape = tuple(spec.shape)
        widths = [config.latent_dim, *reversed(config.hidden_dims)]
        self.layers = nn.Sequential(
            *_mlp(widths, config.activation), nn.Linear(widths[-1], math.prod(shape)), nn.Unflatten(1, shape)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)
