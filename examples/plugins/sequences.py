"""A plug-in: `conv1d`, a 1-D convolutional autoencoder that reads each input as a sequence.

A table's row, or an image read row by row (the digits' 64 pixels, as "sequential MNIST" reads its
784), is one channel of length L; strided 1-D convolutions (kernel 5) shorten it, transposed ones
lengthen it back. It takes the model section's own fields: `conv_channels`, `activation`, `latent_dim`.

    plugins: [sequences.py]                  # in a search space or a config (relative to its folder)
    model: {architecture: conv1d}

It registers its architecture with the decorators aesearch's own parts use; a search imports it
before it reads the space, and ships it to every Ray node.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from aesearch.parts.data import IMAGE, VECTOR, DataSpec
from aesearch.parts.models import ACTIVATIONS, ARCHITECTURES, Architecture, ModelConfig

KERNEL, STRIDE, PADDING = 5, 2, 2  # each layer halves the length, rounding up


def lengths(length: int, layers: int) -> list[int]:
    """The sequence's length before each layer and after the last."""
    sizes = [length]
    for _ in range(layers):
        sizes.append((sizes[-1] + 2 * PADDING - KERNEL) // STRIDE + 1)
    return sizes


class SequenceEncoder(nn.Module):
    def __init__(self, config: ModelConfig, spec: DataSpec):
        super().__init__()
        channels = [1, *config.conv_channels]
        layers: list[nn.Module] = [nn.Flatten(), nn.Unflatten(1, (1, math.prod(spec.shape)))]
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv1d(c_in, c_out, KERNEL, stride=STRIDE, padding=PADDING), ACTIVATIONS[config.activation]()]
        self.layers = nn.Sequential(*layers, nn.Flatten())
        self.out_features = channels[-1] * lengths(math.prod(spec.shape), len(config.conv_channels))[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SequenceDecoder(nn.Module):
    """Linear to the encoder's last sequence, then transposed convolutions back to the input's length."""

    def __init__(self, config: ModelConfig, spec: DataSpec):
        super().__init__()
        channels = [1, *config.conv_channels]
        sizes = lengths(math.prod(spec.shape), len(config.conv_channels))
        layers: list[nn.Module] = [nn.Linear(config.latent_dim, channels[-1] * sizes[-1]),
                                   ACTIVATIONS[config.activation](), nn.Unflatten(1, (channels[-1], sizes[-1]))]
        for i in reversed(range(len(config.conv_channels))):
            grown = (sizes[i + 1] - 1) * STRIDE - 2 * PADDING + KERNEL  # the length a transposed layer gives
            layers.append(nn.ConvTranspose1d(channels[i + 1], channels[i], KERNEL, stride=STRIDE, padding=PADDING,
                                             output_padding=sizes[i] - grown))
            if i > 0:
                layers.append(ACTIVATIONS[config.activation]())
        self.layers = nn.Sequential(*layers, nn.Flatten(), nn.Unflatten(1, tuple(spec.shape)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


ARCHITECTURES.add("conv1d", Architecture(SequenceEncoder, SequenceDecoder, modalities=(IMAGE, VECTOR)))
