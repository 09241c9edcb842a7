"""Input corruption for denoising autoencoders.

Each corruption maps a clean batch x to a corrupted x~ on the same device, drawing from the
given generator (the trainer's own, saved in checkpoints; None: torch's global RNG). Only the
encoder's input is corrupted: the objective always compares the reconstruction with the clean x.

`level` is the one knob of each kind: sigma (gaussian), p (salt_pepper, masking), a (uniform).
Images live in [0, 1]; additive noises are clipped back to that range.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import model_validator

from aesearch.registry import Registry
from aesearch.schema import Float, Named, Section, broken_rule

V_MIN, V_MAX = 0.0, 1.0


@dataclass(frozen=True)
class Corruption:
    apply: Callable[[torch.Tensor, float, torch.Generator | None], torch.Tensor]
    level_name: str | None  # what `level` means for this kind; None: takes no level
    level_rule: Callable[[float], bool] = lambda level: True
    rule_text: str = ""


CORRUPTIONS: Registry[Corruption] = Registry("corruption")


def _is_probability(p: float) -> bool:
    return 0.0 < p < 1.0


def _is_positive(v: float) -> bool:
    return v > 0.0


def _rand(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(x.shape, dtype=x.dtype, device=x.device, generator=generator)


def identity(x: torch.Tensor, level: float | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """No corruption: a plain (non-denoising) autoencoder."""
    return x


def gaussian(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + N(0, sigma^2), clipped to the image range."""
    noise = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
    return (x + sigma * noise).clamp_(V_MIN, V_MAX)


def salt_pepper(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each value becomes v_min with probability p/2, v_max with p/2, else stays."""
    u = _rand(x, generator)
    out = torch.where(u < p / 2, torch.full_like(x, V_MIN), x)
    return torch.where((u >= p / 2) & (u < p), torch.full_like(x, V_MAX), out)


def masking(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x * m with m ~ Bernoulli(1 - p): each value is zeroed with probability p."""
    return x * (_rand(x, generator) >= p).to(x.dtype)


def uniform(x: torch.Tensor, a: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + U(-a, a), clipped to the image range."""
    return (x + (2 * _rand(x, generator) - 1) * a).clamp_(V_MIN, V_MAX)


CORRUPTIONS.add("none", Corruption(identity, None))
CORRUPTIONS.add("gaussian", Corruption(gaussian, "sigma", _is_positive, "sigma must be > 0"))
CORRUPTIONS.add("salt_pepper", Corruption(salt_pepper, "p", _is_probability, "p must be in (0, 1)"))
CORRUPTIONS.add("masking", Corruption(masking, "p", _is_probability, "p must be in (0, 1)"))
CORRUPTIONS.add("uniform", Corruption(uniform, "a", _is_positive, "a must be > 0"))


def corrupt(x: torch.Tensor, kind: str, level: float | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The encoder's input for a batch."""
    return CORRUPTIONS[kind].apply(x, level, generator)


# --- this part's section of the config --------------------------------------------------------


class CorruptionConfig(Section):
    """Denoising: corrupt the encoder's input; `level` is sigma, p or a depending on `kind`."""

    kind: Named(CORRUPTIONS) = "none"
    level: Float | None = None


    @model_validator(mode="after")
    def _level_fits_kind(self) -> CorruptionConfig:
        problem = corruption_level_problem(self.kind, self.level, field="corruption.level")
        if problem:
            raise broken_rule(problem)
        return self


def corruption_level_problem(kind: str, level: float | None, field: str) -> str | None:
    """What is wrong with `level` for a corruption of this kind, or None."""
    corruption = CORRUPTIONS[kind]
    if corruption.level_name is None:
        return f"{field}={level} given, but corruption {kind!r} takes no level" if level is not None else None
    if level is None:
        return f"{field} is required for corruption {kind!r} (its {corruption.level_name}; {corruption.rule_text})"
    if not corruption.level_rule(level):
        return f"{field}={level}: for {kind} the level is {corruption.level_name}, and {corruption.rule_text}"
    return None
