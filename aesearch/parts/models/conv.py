"""The conv architecture: strided convolutions down, transposed convolutions back up (images only)."""

from __future__ import annotations

import torch
from torch import nn

from aesearch.parts.data.spec import DataSpec
from aesearch.parts.models.config import ACTIVATIONS, ModelConfig


def _conv_sizes(size: int, layers: int) -> list[int]:
    """Spatial sizes through stride-2, kernel-3, padding-1 convolutions: ceil(n / 2) each."""
    sizes = [size]
    for _ in range(layers):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


class ConvEncoder(nn.Module):
    def __init__(self, config: ModelConfig, spec: DataSpec):
        super().__init__()
        shape = spec.shape
        channels = [shape[0], *config.conv_channels]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), ACTIVATIONS[config.activation]()]
        self.layers = nn.Sequential(*layers, nn.Flatten())
        heights = _conv_sizes(shape[1], len(config.conv_channels))
        widths = _conv_sizes(shape[2], len(config.conv_channels))
        self.out_features = channels[-1] * heights[-1] * widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ConvDecoder(nn.Module):
    """Linear to the encoder's last feature map, then transposed convolutions back up."""

    def __init__(self, config: ModelConfig, spec: DataSpec):
        super().__init__()
        shape = spec.shape
        channels = [shape[0], *config.conv_channels]
        heights = _conv_sizes(shape[1], len(config.conv_channels))
        widths = _conv_sizes(shape[2], len(config.conv_channels))
        layers: list[nn.Module] = [
            nn.Linear(config.latent_dim, channels[-1] * heights[-1] * widths[-1]),
            ACTIVATIONS[config.activation](),
            nn.Unflatten(1, (channels[-1], heights[-1], widths[-1])),
        ]
        for i in reversed(range(len(config.conv_channels))):
            # (n - 1) * 2 - 2 + 3 + padding = 2n - 1 + padding: pad by 1 where the size was even.
            padding = (int(heights[i] % 2 == 0), int(widths[i] % 2 == 0))
            layers.append(
                nn.ConvTranspose2d(channels[i + 1], channels[i], 3, stride=2, padding=1, output_padding=padding)
            )
            if i > 0:
                layers.append(ACTIVATIONS[config.activation]())
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)
