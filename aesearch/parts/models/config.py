"""This part's section of the config, and the registries its names are checked against.

Activations and latents (parts.models.core) and architectures (parts.models.compose) register
themselves here where they are defined, and each builds itself from this section: so the section
comes first, and imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import Field, model_validator
from torch import nn

from aesearch.parts.data.spec import DataSpec
from aesearch.registry import Registry
from aesearch.schema import Bounded, Named, Section, broken_rule


def no_problem(config: ModelConfig, spec: DataSpec) -> str | None:
    return None


@dataclass(frozen=True)
class Architecture:
    encoder: Callable[[ModelConfig, DataSpec], nn.Module]  # has .out_features
    decoder: Callable[[ModelConfig, DataSpec], nn.Module]
    modalities: tuple[str, ...]  # what inputs it takes: IMAGE, VECTOR
    # Whether trials of this shape gain from packing (`aesearch.packing.fused`): torch.func.vmap has no
    # batching rule for the fused attention kernels, so packed attention models would run one by one.
    packs: bool = True
    # What is wrong with an input of an accepted modality for this architecture, or None.
    problem: Callable[[ModelConfig, DataSpec], str | None] = no_problem


@dataclass(frozen=True)
class CodeActivation:
    """An elementwise squashing of the code, with dh/da for the closed-form contractive term."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    derivative: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (pre-activation a, h) -> dh/da


ARCHITECTURES: Registry[Architecture] = Registry("architecture")
LATENTS: Registry[Callable[[int, ModelConfig], nn.Module]] = Registry("latent")
ACTIVATIONS: Registry[Callable[[], nn.Module]] = Registry("activation")
CODE_ACTIVATIONS: Registry[CodeActivation] = Registry("code activation")


class ModelConfig(Section):
    """Encoder + latent + decoder. Architecture-specific fields are ignored by the others."""

    architecture: Named(ARCHITECTURES) = "dense"
    latent: Named(LATENTS) = "deterministic"
    latent_dim: Bounded(4096) = 16
    activation: Named(ACTIVATIONS) = "relu"
    # "auto": sigmoid when the KL sparsity penalty needs units in (0, 1), otherwise none.
    code_activation: Named(CODE_ACTIVATIONS, "auto") = "auto"
    # dense: widths of the hidden layers from the input side; the decoder mirrors them.
    hidden_dims: list[Bounded(16384)] = Field(default_factory=lambda: [256, 128], max_length=8)
    # conv: output channels of the stride-2 convolutions; the decoder mirrors them.
    conv_channels: list[Bounded(2048)] = Field(default_factory=lambda: [32, 64], min_length=1, max_length=6)
    # attention: square patches (images), transformer width, heads, blocks (encoder and decoder each).
    patch_size: Bounded(64) = 4
    embed_dim: Bounded(2048) = 64
    heads: Bounded(64) = 4
    depth: Bounded(24) = 2
    mlp_ratio: Bounded(8) = 2

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.architecture == "attention" and self.embed_dim % self.heads:
            raise broken_rule(
                f"model.embed_dim={self.embed_dim} must be divisible by model.heads={self.heads}"
            )
        return self
