"""Architectures by name, what each accepts, this part's section of the config, and `build_model`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pydantic import Field, model_validator
from torch import nn

from aesearch.parts.data.spec import IMAGE, VECTOR, DataSpec
from aesearch.parts.models.attention import (
    AttentionDecoder,
    AttentionEncoder,
    ColumnDecoder,
    ColumnEncoder,
    patches_problem,
)
from aesearch.parts.models.conv import ConvDecoder, ConvEncoder
from aesearch.parts.models.core import ACTIVATIONS, CODE_ACTIVATIONS, LATENTS, Autoencoder
from aesearch.parts.models.dense import DenseDecoder, DenseEncoder
from aesearch.registry import Registry
from aesearch.schema import Bounded, Named, Section, broken_rule


def no_problem(config: ModelConfig, spec: DataSpec) -> str | None:
    return None


def by_modality(choices: Mapping[str, Callable]) -> Callable:
    """One of `choices` per modality, called with (config, spec): the spec's modality picks."""
    return lambda config, spec: choices[spec.modality](config, spec)


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


ARCHITECTURES: Registry[Architecture] = Registry("architecture")
ARCHITECTURES.add("dense", Architecture(DenseEncoder, DenseDecoder, modalities=(IMAGE, VECTOR)))
ARCHITECTURES.add("conv", Architecture(ConvEncoder, ConvDecoder, modalities=(IMAGE,)))
ARCHITECTURES.add("attention", Architecture(
    by_modality({IMAGE: AttentionEncoder, VECTOR: ColumnEncoder}),
    by_modality({IMAGE: AttentionDecoder, VECTOR: ColumnDecoder}),
    modalities=(IMAGE, VECTOR),
    packs=False,
    problem=by_modality({IMAGE: patches_problem, VECTOR: no_problem}),
))

# How the problem line names what an architecture takes, and what the data is.
TAKES = {IMAGE: "images (channels x height x width)", VECTOR: "vectors (features)"}
IS = {
    IMAGE: lambda spec: f"an image of {'x'.join(map(str, spec.shape))}",
    VECTOR: lambda spec: f"a vector of {spec.features} features",
}


def input_problem(config: ModelConfig, spec: DataSpec) -> str | None:
    """What is wrong with this data for the model, in one line naming the field, the value and
    the rule; or None. The architecture says what it takes."""
    architecture = ARCHITECTURES[config.architecture]
    if spec.modality in architecture.modalities:
        return architecture.problem(config, spec)
    takes = " or ".join(TAKES[modality] for modality in architecture.modalities)
    others = [repr(name) for name in ARCHITECTURES if spec.modality in ARCHITECTURES[name].modalities]
    return (f"model.architecture={config.architecture!r} takes {takes}; "
            f"{spec.name} is {IS[spec.modality](spec)}: use {' or '.join(others)}")


def build_model(config: ModelConfig, spec: DataSpec) -> Autoencoder:
    architecture = ARCHITECTURES[config.architecture]
    encoder = architecture.encoder(config, spec)
    latent = LATENTS[config.latent](encoder.out_features, config)
    decoder = architecture.decoder(config, spec)
    return Autoencoder(encoder, latent, decoder, spec)


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
