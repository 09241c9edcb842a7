"""Autoencoders by composition: encoder + latent + decoder.

An architecture (`dense`, `conv`, `attention`) is a matching encoder/decoder pair that declares
the inputs it takes: images (channels, height, width), vectors (the rows of a table, a feature
matrix), or both. A latent (`deterministic`, `gaussian`) turns encoder features into a code and
the decoder's input. Every named variant is one `Autoencoder` built from these parts by
`build_model(config, spec)`: a VAE is any architecture with a gaussian latent, a sparse AE a
deterministic latent with a penalty on its code (see `objectives`), a denoising AE any model fed
corrupted inputs (see `corruption`).

Decoders return logits; the data's `DataSpec` maps them into its values (`Output.x_hat`): a
sigmoid for data in [0, 1], numeric values as they are, a softmax over each categorical group.
"""

from aesearch.parts.models.attention import (
    AttentionDecoder,
    AttentionEncoder,
    ColumnDecoder,
    ColumnEncoder,
    patches_problem,
)
from aesearch.parts.models.compose import build_model, input_problem
from aesearch.parts.models.config import (
    ACTIVATIONS,
    ARCHITECTURES,
    CODE_ACTIVATIONS,
    LATENTS,
    Architecture,
    CodeActivation,
    ModelConfig,
)
from aesearch.parts.models.conv import ConvDecoder, ConvEncoder
from aesearch.parts.models.core import (
    Autoencoder,
    DeterministicLatent,
    GaussianLatent,
    LatentOutput,
    Output,
    parameter_count,
)
from aesearch.parts.models.dense import DenseDecoder, DenseEncoder

__all__ = [
    "ACTIVATIONS", "ARCHITECTURES", "CODE_ACTIVATIONS", "LATENTS",
    "Architecture", "AttentionDecoder", "AttentionEncoder", "Autoencoder", "CodeActivation",
    "ColumnDecoder", "ColumnEncoder", "ConvDecoder", "ConvEncoder", "DenseDecoder", "DenseEncoder",
    "DeterministicLatent", "GaussianLatent", "LatentOutput", "ModelConfig", "Output",
    "build_model", "input_problem", "parameter_count", "patches_problem",
]
