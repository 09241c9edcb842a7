"""Autoencoders by composition: encoder + latent + decoder.

An architecture (`dense`, `conv`, `attention`) is a matching encoder/decoder pair; a latent
(`deterministic`, `gaussian`) turns encoder features into a code and the decoder's input.
Every named variant is one `Autoencoder` built from these parts by `build_model`: a VAE is any
architecture with a gaussian latent, a sparse AE a deterministic latent with a penalty on its
code (see `objectives`), a denoising AE any model fed corrupted inputs (see `corruption`).

Decoders return logits; `Output.x_hat` squashes them into the image range [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import Field, model_validator
from torch import nn

from aesearch.registry import Registry
from aesearch.schema import Bounded, Named, Section, broken_rule

Shape = tuple[int, int, int]  # (channels, height, width)

ACTIVATIONS: Registry[Callable[[], nn.Module]] = Registry("activation")
ACTIVATIONS.add("relu", nn.ReLU)
ACTIVATIONS.add("gelu", nn.GELU)
ACTIVATIONS.add("silu", nn.SiLU)
ACTIVATIONS.add("tanh", nn.Tanh)
ACTIVATIONS.add("elu", nn.ELU)
ACTIVATIONS.add("leaky_relu", lambda: nn.LeakyReLU(0.1))


@dataclass(frozen=True)
class CodeActivation:
    """An elementwise squashing of the code, with dh/da for the closed-form contractive term."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    derivative: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (pre-activation a, h) -> dh/da


CODE_ACTIVATIONS: Registry[CodeActivation] = Registry("code activation")
CODE_ACTIVATIONS.add("none", CodeActivation(lambda a: a, lambda a, h: torch.ones_like(a)))
CODE_ACTIVATIONS.add("sigmoid", CodeActivation(torch.sigmoid, lambda a, h: h * (1 - h)))
CODE_ACTIVATIONS.add("tanh", CodeActivation(torch.tanh, lambda a, h: 1 - h * h))
CODE_ACTIVATIONS.add("relu", CodeActivation(torch.relu, lambda a, h: (a > 0).to(a.dtype)))


# --- what a forward pass returns --------------------------------------------------------------


@dataclass
class LatentOutput:
    z: torch.Tensor  # what the decoder receives (a sample, for a gaussian latent in training)
    code: torch.Tensor  # the representation (the mean, for a gaussian latent)
    pre_activation: torch.Tensor | None = None  # code before its activation (deterministic)
    mu: torch.Tensor | None = None
    logvar: torch.Tensor | None = None


@dataclass
class Output:
    logits: torch.Tensor
    latent: LatentOutput

    @property
    def x_hat(self) -> torch.Tensor:
        return torch.sigmoid(self.logits.float())  # float32 even when the logits came from bf16


class Autoencoder(nn.Module):
    def __init__(self, encoder: nn.Module, latent: nn.Module, decoder: nn.Module, image_shape: Shape):
        super().__init__()
        self.encoder, self.latent, self.decoder = encoder, latent, decoder
        self.image_shape = tuple(image_shape)

    @property
    def stochastic(self) -> bool:
        return self.latent.stochastic

    @property
    def latent_dim(self) -> int:
        return self.latent.latent_dim

    def encode(self, x: torch.Tensor, sample: bool | None = None, noise: torch.Tensor | None = None) -> LatentOutput:
        """Sample a gaussian latent when `sample` (default: in training mode), else use its mean.
        `noise`: the standard normal draw to sample with, (batch, latent_dim); None draws one."""
        return self.latent(self.encoder(x), self.training if sample is None else sample, noise)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample: bool | None = None, noise: torch.Tensor | None = None) -> Output:
        latent = self.encode(x, sample, noise)
        return Output(self.decode(latent.z), latent)

    def exact_jacobian_norm(self, latent: LatentOutput) -> torch.Tensor | None:
        """||d code / d x||_F^2 per sample in closed form, when the encoder is one affine layer
        followed by an elementwise activation (Rifai et al.'s contractive AE); else None."""
        if not getattr(self.encoder, "is_identity", False):
            return None
        return self.latent.jacobian_norm(latent)


def build_model(config: ModelConfig, image_shape: Shape) -> Autoencoder:
    architecture = ARCHITECTURES[config.architecture]
    encoder = architecture.encoder(config, image_shape)
    latent = LATENTS[config.latent](encoder.out_features, config)
    decoder = architecture.decoder(config, image_shape)
    return Autoencoder(encoder, latent, decoder, image_shape)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- latents ----------------------------------------------------------------------------------


class DeterministicLatent(nn.Module):
    """code = activation(W f + b); the decoder sees the code itself."""

    stochastic = False

    def __init__(self, in_features: int, config: ModelConfig):
        super().__init__()
        self.latent_dim = config.latent_dim
        self.linear = nn.Linear(in_features, config.latent_dim)
        self.activation = CODE_ACTIVATIONS[config.code_activation]

    def forward(self, features: torch.Tensor, sample: bool, noise: torch.Tensor | None = None) -> LatentOutput:
        pre = self.linear(features)
        code = self.activation.forward(pre)
        return LatentOutput(z=code, code=code, pre_activation=pre)

    def jacobian_norm(self, latent: LatentOutput) -> torch.Tensor:
        """sum_j (dh_j/da_j)^2 ||W_j||^2: the Jacobian is diag(h'(a)) W."""
        row_norms = self.linear.weight.pow(2).sum(dim=1)
        slope = self.activation.derivative(latent.pre_activation, latent.code)
        return (slope.pow(2) * row_norms).sum(dim=1)


class GaussianLatent(nn.Module):
    """q(z|x) = N(mu, diag(exp(logvar))); z = mu + eps * sigma (the reparameterisation trick)."""

    stochastic = True

    def __init__(self, in_features: int, config: ModelConfig):
        super().__init__()
        self.latent_dim = config.latent_dim
        self.linear = nn.Linear(in_features, 2 * config.latent_dim)

    def forward(self, features: torch.Tensor, sample: bool, noise: torch.Tensor | None = None) -> LatentOutput:
        mu, logvar = self.linear(features).chunk(2, dim=-1)
        if sample:
            noise = torch.randn_like(mu) if noise is None else noise.to(mu.dtype)
        z = mu + noise * torch.exp(0.5 * logvar) if sample else mu
        return LatentOutput(z=z, code=mu, mu=mu, logvar=logvar)

    def jacobian_norm(self, latent: LatentOutput) -> torch.Tensor:
        """The code is mu = W_mu f + b: its Jacobian is the constant W_mu."""
        w_mu = self.linear.weight[: self.latent_dim]
        return w_mu.pow(2).sum().expand(latent.code.shape[0])


LATENTS: Registry[Callable[[int, ModelConfig], nn.Module]] = Registry("latent")
LATENTS.add("deterministic", DeterministicLatent)
LATENTS.add("gaussian", GaussianLatent)


# --- dense (stacked MLP) ----------------------------------------------------------------------


def _mlp(widths: list[int], activation: str) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths, widths[1:]):
        layers += [nn.Linear(width_in, width_out), ACTIVATIONS[activation]()]
    return layers


class DenseEncoder(nn.Module):
    """Flatten, then Linear + activation for each of `hidden_dims` (none: the pixels themselves)."""

    def __init__(self, config: ModelConfig, shape: Shape):
        super().__init__()
        widths = [math.prod(shape), *config.hidden_dims]
        self.layers = nn.Sequential(nn.Flatten(), *_mlp(widths, config.activation))
        self.out_features = widths[-1]
        self.is_identity = not config.hidden_dims  # features == flattened input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DenseDecoder(nn.Module):
    """The encoder mirrored: latent -> reversed hidden widths -> pixels."""

    def __init__(self, config: ModelConfig, shape: Shape):
        super().__init__()
        widths = [config.latent_dim, *reversed(config.hidden_dims)]
        self.layers = nn.Sequential(
            *_mlp(widths, config.activation), nn.Linear(widths[-1], math.prod(shape)), nn.Unflatten(1, shape)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


# --- conv (strided convolutions / transposed convolutions) ------------------------------------


def _conv_sizes(size: int, layers: int) -> list[int]:
    """Spatial sizes through stride-2, kernel-3, padding-1 convolutions: ceil(n / 2) each."""
    sizes = [size]
    for _ in range(layers):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


class ConvEncoder(nn.Module):
    def __init__(self, config: ModelConfig, shape: Shape):
        super().__init__()
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

    def __init__(self, config: ModelConfig, shape: Shape):
        super().__init__()
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


# --- attention (patch embedding + transformer) ------------------------------------------------


def _transformer(config: ModelConfig) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        config.embed_dim,
        config.heads,
        dim_feedforward=config.mlp_ratio * config.embed_dim,
        dropout=0.0,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )
    return nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)


class AttentionEncoder(nn.Module):
    """Patches -> transformer -> one learned query attends over the patches (attention pooling).

    The pooling weights say which patches the code was read from: `attention_map` returns them
    on the patch grid, to be rendered as an image.
    """

    def __init__(self, config: ModelConfig, shape: Shape):
        super().__init__()
        channels, height, width = shape
        self.grid = (height // config.patch_size, width // config.patch_size)
        self.patches = nn.Conv2d(channels, config.embed_dim, config.patch_size, stride=config.patch_size)
        self.position = nn.Parameter(torch.randn(1, self.grid[0] * self.grid[1], config.embed_dim) * 0.02)
        self.blocks = _transformer(config)
        self.query = nn.Parameter(torch.randn(1, 1, config.embed_dim) * 0.02)
        self.pool = nn.MultiheadAttention(config.embed_dim, config.heads, batch_first=True)
        self.norm = nn.LayerNorm(config.embed_dim)
        self.out_features = config.embed_dim

    def _pool(self, x: torch.Tensor, need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = self.blocks(self.patches(x).flatten(2).transpose(1, 2) + self.position)
        query = self.query.expand(x.shape[0], -1, -1)
        pooled, weights = self.pool(query, tokens, tokens, need_weights=need_weights)
        return self.norm(pooled[:, 0]), weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._pool(x, need_weights=False)[0]

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Pooling attention over patches, averaged over heads: (batch, grid_h, grid_w), rows sum to 1."""
        _, weights = self._pool(x, need_weights=True)
        return weights[:, 0].reshape(x.shape[0], *self.grid)


class AttentionDecoder(nn.Module):
    """Code -> one token per patch (+ position) -> transformer -> pixels of each patch."""

    def __init__(self, config: ModelConfig, shape: Shape):
        super().__init__()
        self.shape, self.patch = shape, config.patch_size
        self.grid = (shape[1] // config.patch_size, shape[2] // config.patch_size)
        tokens = self.grid[0] * self.grid[1]
        self.expand = nn.Linear(config.latent_dim, tokens * config.embed_dim)
        self.position = nn.Parameter(torch.randn(1, tokens, config.embed_dim) * 0.02)
        self.blocks = _transformer(config)
        self.norm = nn.LayerNorm(config.embed_dim)
        self.to_pixels = nn.Linear(config.embed_dim, shape[0] * config.patch_size**2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch, (channels, height, width), p, (gh, gw) = z.shape[0], self.shape, self.patch, self.grid
        tokens = self.expand(z).view(batch, gh * gw, -1) + self.position
        pixels = self.to_pixels(self.norm(self.blocks(tokens)))  # (batch, patches, channels * p * p)
        pixels = pixels.view(batch, gh, gw, channels, p, p).permute(0, 3, 1, 4, 2, 5)
        return pixels.reshape(batch, channels, height, width)


@dataclass(frozen=True)
class Architecture:
    encoder: Callable[[ModelConfig, Shape], nn.Module]  # has .out_features
    decoder: Callable[[ModelConfig, Shape], nn.Module]
    # Whether trials of this shape gain from packing (`aesearch.packing.fused`): torch.func.vmap has no
    # batching rule for the fused attention kernels, so packed attention models would run one by one.
    packs: bool = True
    # What is wrong with these images for this architecture (config, shape, dataset name), or None.
    shape_problem: Callable[[ModelConfig, Shape, str], str | None] = lambda config, shape, dataset: None


def patches_problem(config: ModelConfig, shape: Shape, dataset: str) -> str | None:
    _, height, width = shape
    if height % config.patch_size or width % config.patch_size:
        return f"model.patch_size={config.patch_size} must divide the {height}x{width} images of {dataset}"
    return None


def shape_problem(config: ModelConfig, shape: Shape, dataset: str) -> str | None:
    """What is wrong with images of `shape` for this model, asked of its architecture; or None."""
    return ARCHITECTURES[config.architecture].shape_problem(config, shape, dataset)


ARCHITECTURES: Registry[Architecture] = Registry("architecture")
ARCHITECTURES.add("dense", Architecture(DenseEncoder, DenseDecoder))
ARCHITECTURES.add("conv", Architecture(ConvEncoder, ConvDecoder))
ARCHITECTURES.add("attention", Architecture(AttentionEncoder, AttentionDecoder, packs=False,
                                             shape_problem=patches_problem))


# --- this part's section of the config --------------------------------------------------------


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
    # attention: square patches, transformer width, heads, blocks (encoder and decoder each).
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
