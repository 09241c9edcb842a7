"""The architectures, registered by name with what each accepts, and `build_model`."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from aesearch.parts.data.spec import IMAGE, VECTOR, DataSpec
from aesearch.parts.models.attention import (
    AttentionDecoder,
    AttentionEncoder,
    ColumnDecoder,
    ColumnEncoder,
    patches_problem,
)
from aesearch.parts.models.conv import ConvDecoder, ConvEncoder
from aesearch.parts.models.config import ARCHITECTURES, LATENTS, Architecture, ModelConfig, no_problem
from aesearch.parts.models.core import Autoencoder
from aesearch.parts.models.dense import DenseDecoder, DenseEncoder


def by_modality(choices: Mapping[str, Callable]) -> Callable:
    """One of `choices` per modality, called with (config, spec): the spec's modality picks."""
    return lambda config, spec: choices[spec.modality](config, spec)


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
