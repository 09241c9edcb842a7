"""What every architecture shares: activations, latents, what a forward pass returns, and the
`Autoencoder` that composes an encoder, a latent and a decoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aesearch.parts.data.spec import DataSpec
from aesearch.parts.models.config import ACTIVATIONS, CODE_ACTIVATIONS, LATENTS, CodeActivation, ModelConfig

ACTIVATIONS.add("relu", nn.ReLU)
ACTIVATIONS.add("gelu", nn.GELU)
ACTIVATIONS.add("silu", nn.SiLU)
ACTIVATIONS.add("tanh", nn.Tanh)
ACTIVATIONS.add("elu", nn.ELU)
ACTIVATIONS.add("leaky_relu", lambda: nn.LeakyReLU(0.1))


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
    spec: DataSpec  # how logits become values: the data decides (sigmoid, identity, softmax per group)

    @property
    def x_hat(self) -> torch.Tensor:
        """The reconstruction in the data's space, float32 even when the logits came from bf16."""
        return self.spec.values(self.logits)


class Autoencoder(nn.Module):
    def __init__(self, encoder: nn.Module, latent: nn.Module, decoder: nn.Module, spec: DataSpec):
        super().__init__()
        self.encoder, self.latent, self.decoder = encoder, latent, decoder
        self.spec = spec
        self.input_shape = tuple(spec.shape)

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
        return Output(self.decode(latent.z), latent, self.spec)

    def exact_jacobian_norm(self, latent: LatentOutput) -> torch.Tensor | None:
        """||d code / d x||_F^2 per sample in closed form, when the encoder is one affine layer
        followed by an elementwise activation (Rifai et al.'s contractive AE); else None."""
        if not getattr(self.encoder, "is_identity", False):
            return None
        return self.latent.jacobian_norm(latent)


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


LATENTS.add("deterministic", DeterministicLatent)
LATENTS.add("gaussian", GaussianLatent)
