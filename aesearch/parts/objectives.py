"""Objective = reconstruction loss + weighted terms.

    loss = recon(logits, x) + beta_t * KL(q(z|x) || N(0, I)) + lambda_s * sparsity(h)
           + lambda_c * ||dh/dx||_F^2

Every per-sample quantity is summed over its dimensions (values, latent units) and averaged over
the batch, so beta = 1 with `bce` (data in [0, 1]) or `mixed` (any data) is exactly the negative
ELBO of the decoder's likelihood. The reconstruction always compares with the clean input x,
whatever the encoder was fed, and knows the data (`DataSpec`): what the decoder's logits mean
(`spec.values`), which outputs are categorical groups, whether values lie in [0, 1].
Terms that a config does not use are not computed, and not reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field

from aesearch.errors import ConfigError
from aesearch.registry import Registry
from aesearch.schema import Bounded, Float, Named, Section

if TYPE_CHECKING:
    from aesearch.parts.data.spec import DataSpec
    from aesearch.parts.models import Autoencoder, Output

# --- reconstruction: (logits, x, spec) -> per-sample loss, summed over values -------------------

Reconstruction = Callable[[torch.Tensor, torch.Tensor, "DataSpec"], torch.Tensor]
RECONSTRUCTIONS: Registry[Reconstruction] = Registry("reconstruction loss")
UNIT_RANGE_ONLY = frozenset({"bce"})  # losses that are a likelihood only for values in [0, 1]
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@RECONSTRUCTIONS.register("mse")
def squared_error(logits: torch.Tensor, x: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    return (spec.values(logits) - x).pow(2).flatten(1).sum(1)


@RECONSTRUCTIONS.register("bce")
def binary_cross_entropy(logits: torch.Tensor, x: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    """-log p(x|z) of a Bernoulli decoder (x may be grey levels in [0, 1]; only for such data)."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


@RECONSTRUCTIONS.register("l1")
def absolute_error(logits: torch.Tensor, x: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    return (spec.values(logits) - x).abs().flatten(1).sum(1)


@RECONSTRUCTIONS.register("mixed")
def mixed_likelihood(logits: torch.Tensor, x: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    """-log p(x|z) in nats of a decoder that suits tables: a unit-variance Gaussian around each
    numeric value (`spec.values`: the logit itself for real-valued data) and a categorical
    (softmax) over each one-hot group. For images, every value is numeric."""
    x = x.flatten(1)
    numeric = spec.numeric_positions
    error = spec.values(logits).flatten(1)[:, numeric] - x[:, numeric]
    nll = (0.5 * error.pow(2) + HALF_LOG_2PI).sum(1)
    flat = logits.float().flatten(1)
    for group in spec.categorical_groups:
        nll = nll - (x[:, group] * F.log_softmax(flat[:, group], dim=1)).sum(1)
    return nll


def likelihood(spec: DataSpec) -> tuple[str, bool]:
    """The decoder the NLL and ELBO are measured under: (reconstruction loss = -log p(x|z), whether
    the inputs are binarised). Bernoulli on stochastically binarised inputs for data in [0, 1], the
    literature's protocol, comparable across VAEs whatever their training loss; otherwise the
    Gaussian/categorical `mixed` decoder on the inputs as given."""
    return ("bce", True) if spec.unit_range else ("mixed", False)


def reconstruction_problem(kind: str, spec: DataSpec) -> str | None:
    """Why objective.reconstruction=kind does not suit this data, in one line, or None."""
    if kind not in UNIT_RANGE_ONLY or spec.unit_range:
        return None
    fitting = [repr(name) for name in RECONSTRUCTIONS.names() if name not in UNIT_RANGE_ONLY]
    return (f"objective.reconstruction={kind!r} needs values in [0, 1], but {spec.name} is real-valued; "
            f"use {', '.join(fitting[:-1])} or {fitting[-1]}")


# --- KL to the prior, and how beta is annealed --------------------------------------------------


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per sample: 1/2 sum_j (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(1)


# Each schedule maps training progress (in epochs, fractional: annealing moves every step), the
# run's total epochs and the KL settings to a factor in [0, 1] applied to beta.
BETA_SCHEDULES: Registry[Callable[[float, int, KLConfig], float]] = Registry("beta schedule")


@BETA_SCHEDULES.register("constant")
def constant(progress: float, epochs: int, kl: KLConfig) -> float:
    return 1.0


@BETA_SCHEDULES.register("linear")
def linear_warmup(progress: float, epochs: int, kl: KLConfig) -> float:
    """0 at the first step, rising linearly to 1 after `warmup_epochs` (Bowman et al. 2016)."""
    return min(1.0, progress / kl.warmup_epochs)


@BETA_SCHEDULES.register("cyclical")
def cyclical(progress: float, epochs: int, kl: KLConfig) -> float:
    """`cycles` repetitions over the run of: 0 rising to 1 over `ramp_fraction` of the cycle,
    then 1 (Fu et al. 2019)."""
    period = epochs / kl.cycles
    position = (progress % period) / period
    return min(1.0, position / kl.ramp_fraction)


# --- sparsity penalties: (code, rho, units) -> batch-level penalty ------------------------------
# `units`: None, or 1 for the code units that exist and 0 for padding (see Choice); padded units
# add nothing.

SPARSITY_PENALTIES: Registry[Callable[..., torch.Tensor]] = Registry("sparsity penalty")


@SPARSITY_PENALTIES.register("l1")
def l1_sparsity(code: torch.Tensor, rho: float, units: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j |h_j| per sample, averaged over the batch (rho is not used)."""
    magnitude = code.abs() if units is None else code.abs() * units
    return magnitude.sum(1).mean()


@SPARSITY_PENALTIES.register("kl")
def kl_sparsity(code: torch.Tensor, rho: float | torch.Tensor, units: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j KL(rho || rho_hat_j), rho_hat_j the mean activation of unit j over the batch."""
    rho_hat = code.mean(0).clamp(1e-6, 1 - 1e-6)
    per_unit = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
    return (per_unit if units is None else per_unit * units).sum()


# --- contractive: ||d code / d x||_F^2 -----------------------------------------------------------


def random_directions(
    projections: int, code_shape: tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """(projections, *code_shape) random signs for the estimator below (Rademacher: E[v v^T] = I,
    with less variance than gaussian v); drawn by the caller, from the run's generator."""
    return torch.randint(0, 2, (projections, *code_shape), generator=generator, device=device).float() * 2 - 1


def jacobian_norm_estimate(pullback: Callable[[torch.Tensor], torch.Tensor], directions: torch.Tensor) -> torch.Tensor:
    """Unbiased estimate of ||J||_F^2 per sample, J = d code / d x: the mean of ||J^T v||^2 over
    the random sign vectors v in `directions` (see random_directions). `pullback(v)` is J^T v,
    per sample: autograd's vector-Jacobian product here, torch.func's in a packed step.

    One vector-Jacobian product per projection (a backward pass), instead of one per code unit.
    """
    return sum(pullback(v).pow(2).flatten(1).sum(1) for v in directions) / len(directions)


def contractive_penalty(
    model: Autoencoder, output: Output, pullback: Callable[[torch.Tensor], torch.Tensor] | None,
    directions: torch.Tensor | None,
) -> torch.Tensor:
    """The batch mean of ||d code / d x||_F^2: in closed form where there is one, else estimated
    along `directions` with `pullback(v)` = J^T v (autograd's for one run, torch.func's in a
    packed step, where autograd.grad does not run)."""
    exact = model.exact_jacobian_norm(output.latent)
    if exact is None:
        dtype = output.latent.code.dtype
        exact = jacobian_norm_estimate(lambda v: pullback(v.to(dtype)), directions)
    return exact.mean()


# --- the objective ------------------------------------------------------------------------------


class Choice(NamedTuple):
    """Which reconstruction loss and sparsity penalty a loss uses, as a weight per kind: 1 for the
    kind chosen. One run's weights are floats. A packed step stacks its members' (`stack`) into
    tensors with one entry per member and maps over them, so that members that chose differently
    share one step: every kind any member chose is computed, and weighed 1 or 0 (exact in floats).
    `units`: None, or 1 for the code units that exist and 0 for padding (a packed step pads the
    codes of its members to one width, see aesearch.packing.fused)."""

    reconstruction: dict[str, float | torch.Tensor]
    sparsity: dict[str, float | torch.Tensor]  # empty: no sparsity term
    rho: float | torch.Tensor
    units: torch.Tensor | None = None

    @staticmethod
    def stack(choices: list[Choice], units: torch.Tensor) -> Choice:
        """The members' choices as one, each weight and rho a tensor with one entry per member; a
        member weighs 0 the kinds it did not choose."""

        def per_member(weights: list[dict[str, float]]) -> dict[str, torch.Tensor]:
            kinds = sorted({kind for chosen in weights for kind in chosen})
            return {kind: torch.tensor([w.get(kind, 0.0) for w in weights], device=units.device) for kind in kinds}

        rho = torch.tensor([c.rho for c in choices], device=units.device)
        return Choice(per_member([c.reconstruction for c in choices]), per_member([c.sparsity for c in choices]), rho,
                      units)


class Objective:
    """Computes the loss and its named terms for one batch; knows beta for each epoch."""

    def __init__(self, config: ObjectiveConfig, gaussian_latent: bool, epochs: int, spec: DataSpec):
        problem = reconstruction_problem(config.reconstruction, spec)
        if problem:
            raise ConfigError(problem)
        self.config = config
        self.spec = spec  # what the reconstruction losses compare in (see RECONSTRUCTIONS)
        self.epochs = epochs
        self.uses_kl = gaussian_latent
        sparsity = config.sparsity
        self.choice = Choice({config.reconstruction: 1.0}, {} if sparsity.kind == "none" else {sparsity.kind: 1.0},
                             sparsity.rho)
        self.uses_contractive = config.contractive_weight > 0

    @property
    def term_names(self) -> list[str]:
        return self.names(self.choice)

    def names(self, choice: Choice) -> list[str]:
        """The names of the terms `terms_with(choice)` computes, in its order."""
        return [
            "recon",
            *(["kl"] if self.uses_kl else []),
            *(["sparsity"] if choice.sparsity else []),
            *(["contractive"] if self.uses_contractive else []),
        ]

    def beta(self, progress: float) -> float:
        """The annealed KL weight after `progress` epochs of training (fractional)."""
        kl = self.config.kl
        return kl.beta * BETA_SCHEDULES[kl.schedule](progress, self.epochs, kl)

    @property
    def full_beta(self) -> float:
        """The KL weight the config asks for, once annealing is done: validation uses it."""
        return self.config.kl.beta

    def needs_input_grad(self, model: Autoencoder) -> bool:
        """The contractive estimator differentiates the code with respect to the input."""
        return self.uses_contractive and not getattr(model.encoder, "is_identity", False)

    def weights(self, beta: float) -> dict[str, float]:
        """Each term's weight in the loss, with the KL weight `beta` in effect."""
        cfg = self.config
        return {"recon": 1.0, "kl": beta, "sparsity": cfg.sparsity.weight, "contractive": cfg.contractive_weight}

    def terms(
        self, model: Autoencoder, x: torch.Tensor, x_in: torch.Tensor, output: Output, directions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The unweighted terms (batch means) for clean x, the encoder's input x_in and the
        model's output on x_in; `directions`: the contractive estimator's (needs_input_grad)."""
        code = output.latent.code

        def pullback(v: torch.Tensor) -> torch.Tensor:  # x_in requires grad, and the code was computed from it
            return torch.autograd.grad(code, x_in, v, create_graph=model.training, retain_graph=True)[0]

        return self.terms_with(model, x, output, self.choice, pullback, directions)

    def terms_with(
        self, model: Autoencoder, x: torch.Tensor, output: Output, choice: Choice,
        pullback: Callable[[torch.Tensor], torch.Tensor] | None = None, directions: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The unweighted terms with the kinds weighed by `choice`: this objective's own (terms),
        or a packed step's for each of its members, so that both train on the same terms.
        `pullback(v)`: J^T v, J = d code / d x, for the contractive estimator (contractive_penalty)."""
        logits, code = output.logits.float(), output.latent.code.float()
        terms = {"recon": sum(w * RECONSTRUCTIONS[kind](logits, x, self.spec).mean()
                              for kind, w in choice.reconstruction.items())}
        if self.uses_kl:
            terms["kl"] = gaussian_kl(output.latent.mu.float(), output.latent.logvar.float()).mean()
        if choice.sparsity:
            terms["sparsity"] = sum(w * SPARSITY_PENALTIES[kind](code, choice.rho, choice.units)
                                    for kind, w in choice.sparsity.items())
        if self.uses_contractive:
            terms["contractive"] = contractive_penalty(model, output, pullback, directions).float()
        return terms

    def __call__(
        self, model: Autoencoder, x: torch.Tensor, x_in: torch.Tensor, output: Output, beta: float,
        directions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, terms): the terms weighted and summed, in the order they are named."""
        terms = self.terms(model, x, x_in, output, directions)
        return weighted_sum(terms, self.weights(beta)), terms


def weighted_sum(terms: dict[str, torch.Tensor], weights: dict[str, float | torch.Tensor]) -> torch.Tensor:
    """recon + beta * kl + ...; a packed step passes per-member weights and stacked terms."""
    names = iter(terms)
    loss = terms[next(names)]
    for name in names:
        loss = loss + weights[name] * terms[name]
    return loss


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dimension."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) / logvar.exp()).sum(-1)


# --- this part's section of the config --------------------------------------------------------


class KLConfig(Section):
    """KL(q(z|x) || N(0, I)) weighted by beta (>1 for beta-VAE), annealed per epoch."""

    beta: Float = Field(1.0, ge=0.0)
    schedule: Named(BETA_SCHEDULES) = "constant"
    warmup_epochs: Bounded(100_000) = 10  # linear: beta reaches its full value after this many epochs
    cycles: Bounded(10_000) = 4  # cyclical: number of ramps over the whole run
    ramp_fraction: Float = Field(0.5, gt=0.0, le=1.0)  # cyclical: share of each cycle spent ramping


class SparsityConfig(Section):
    """A sparsity penalty on the code: `l1` (sum |h_j|) or `kl` (sum_j KL(rho || rho_hat_j))."""

    kind: Named(SPARSITY_PENALTIES, "none") = "none"
    weight: Float = Field(1.0, ge=0.0)
    rho: Float = Field(0.05, gt=0.0, lt=1.0)


class ObjectiveConfig(Section):
    """Reconstruction loss (summed over values, averaged over the batch) + weighted terms."""

    reconstruction: Named(RECONSTRUCTIONS) = "mse"  # mse, l1, bce (values in [0, 1]), mixed (Gaussian/categorical NLL)
    kl: KLConfig = Field(default_factory=KLConfig)
    sparsity: SparsityConfig = Field(default_factory=SparsityConfig)
    contractive_weight: Float = Field(0.0, ge=0.0)
    contractive_projections: Bounded(64) = 1  # random projections when no closed form exists
