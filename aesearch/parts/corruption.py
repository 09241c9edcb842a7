"""Input corruption for denoising autoencoders.

Each corruption maps a clean batch x to a corrupted x~ on the same device, drawing from the
given generator (the trainer's own, saved in checkpoints; None: torch's global RNG). Only the
encoder's input is corrupted: the objective always compares the reconstruction with the clean x.

`level` is the one knob of each kind: sigma (gaussian), p (salt_pepper, masking, swap), a (uniform).
Every kind knows the data (`DataSpec`): additive noises are clipped back to [0, 1] only for data
in that range; salt-and-pepper (values set to 0 or 1) applies only to such data; masking and swap
act per column, a categorical column's one-hot group as a whole (per value for images and plain
vectors), so that a corrupted row is still a valid row of the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from pydantic import model_validator

from aesearch.errors import ConfigError
from aesearch.registry import Registry
from aesearch.schema import Float, Named, Section, broken_rule

if TYPE_CHECKING:
    from aesearch.parts.data.spec import DataSpec

V_MIN, V_MAX = 0.0, 1.0

Apply = Callable[[torch.Tensor, float, "torch.Generator | None", "DataSpec"], torch.Tensor]


@dataclass(frozen=True)
class Corruption:
    apply: Apply  # (x, level, generator, spec) -> x~
    level_name: str | None  # what `level` means for this kind; None: takes no level
    level_rule: Callable[[float], bool] = lambda level: True
    rule_text: str = ""
    needs_unit_range: str = ""  # why this kind makes sense only for values in [0, 1]; "": any data


CORRUPTIONS: Registry[Corruption] = Registry("corruption")


def _is_probability(p: float) -> bool:
    return 0.0 < p < 1.0


def _is_positive(v: float) -> bool:
    return v > 0.0


def _rand(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(x.shape, dtype=x.dtype, device=x.device, generator=generator)


def _clip(x: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    return x.clamp_(V_MIN, V_MAX) if spec.unit_range else x


def _column_index(spec: DataSpec, device: torch.device) -> tuple[torch.Tensor, int]:
    """(the column of each position of the flattened input, the number of columns): a table's
    columns (a one-hot group is one column), else one column per value."""
    if not spec.columns:
        return torch.arange(spec.features, device=device), spec.features
    index = [0] * spec.features  # built here, sent to the device once
    for number, column in enumerate(spec.columns):
        index[column.positions] = [number] * column.width
    return torch.tensor(index, device=device), len(spec.columns)


def _column_draws(x: torch.Tensor, spec: DataSpec, generator: torch.Generator | None) -> torch.Tensor:
    """U(0, 1) per row and column, spread over each column's positions, as x.flatten(1)."""
    index, count = _column_index(spec, x.device)
    return torch.rand((len(x), count), dtype=x.dtype, device=x.device, generator=generator)[:, index]


def identity(x: torch.Tensor, level: float | None, generator: torch.Generator | None, spec: DataSpec) -> torch.Tensor:
    """No corruption: a plain (non-denoising) autoencoder."""
    return x


def gaussian(x: torch.Tensor, sigma: float, generator: torch.Generator | None, spec: DataSpec) -> torch.Tensor:
    """x + N(0, sigma^2), clipped to [0, 1] for data in that range."""
    noise = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
    return _clip(x + sigma * noise, spec)


def salt_pepper(x: torch.Tensor, p: float, generator: torch.Generator | None, spec: DataSpec) -> torch.Tensor:
    """Each value becomes v_min with probability p/2, v_max with p/2, else stays."""
    u = _rand(x, generator)
    out = torch.where(u < p / 2, torch.full_like(x, V_MIN), x)
    return torch.where((u >= p / 2) & (u < p), torch.full_like(x, V_MAX), out)


def masking(x: torch.Tensor, p: float, generator: torch.Generator | None, spec: DataSpec) -> torch.Tensor:
    """x * m with m ~ Bernoulli(1 - p) per column: each value, or one-hot group, is zeroed with
    probability p."""
    keep = (_column_draws(x, spec, generator) >= p).to(x.dtype)
    return x * keep.view(x.shape)


def swap(x: torch.Tensor, p: float, generator: torch.Generator | None, spec: DataSpec) -> torch.Tensor:
    """Swap noise (the tabular denoising of the Porto Seguro-winning DAE): each column of each row
    is, with probability p, replaced by the same column of another row of the batch, drawn
    uniformly; the corrupted row keeps each column's marginal distribution."""
    rows = len(x)
    if rows < 2:
        return x
    flat = x.flatten(1)
    index, count = _column_index(spec, x.device)
    swapped = torch.rand((rows, count), device=x.device, generator=generator)[:, index] < p
    offset = torch.randint(1, rows, (rows, count), device=x.device, generator=generator)  # never the row itself
    donor = (torch.arange(rows, device=x.device).unsqueeze(1) + offset[:, index]) % rows
    return torch.where(swapped, flat.gather(0, donor), flat).view(x.shape)


def uniform(x: torch.Tensor, a: float, generator: torch.Generator | None, spec: DataSpec) -> torch.Tensor:
    """x + U(-a, a), clipped to [0, 1] for data in that range."""
    return _clip(x + (2 * _rand(x, generator) - 1) * a, spec)


CORRUPTIONS.add("none", Corruption(identity, None))
CORRUPTIONS.add("gaussian", Corruption(gaussian, "sigma", _is_positive, "sigma must be > 0"))
CORRUPTIONS.add("salt_pepper", Corruption(salt_pepper, "p", _is_probability, "p must be in (0, 1)",
                                            "it sets values to 0 and 1"))
CORRUPTIONS.add("masking", Corruption(masking, "p", _is_probability, "p must be in (0, 1)"))
CORRUPTIONS.add("swap", Corruption(swap, "p", _is_probability, "p must be in (0, 1)"))
CORRUPTIONS.add("uniform", Corruption(uniform, "a", _is_positive, "a must be > 0"))


def corrupt(
    x: torch.Tensor, kind: str, level: float | None, generator: torch.Generator | None, spec: DataSpec
) -> torch.Tensor:
    """The encoder's input for a batch of the data `spec` describes (x: the batch as the model
    takes it, (N, C, H, W) or (N, features)). Refuses a kind that does not suit the data."""
    problem = corruption_problem(kind, spec)
    if problem:
        raise ConfigError(problem)
    return CORRUPTIONS[kind].apply(x, level, generator, spec)


def corruption_problem(kind: str, spec: DataSpec, field: str = "corruption.kind") -> str | None:
    """Why a corruption of this kind does not suit this data, in one line, or None."""
    reason = CORRUPTIONS[kind].needs_unit_range
    if not reason or spec.unit_range:
        return None
    fitting = [repr(name) for name in CORRUPTIONS.names() if not CORRUPTIONS[name].needs_unit_range and name != "none"]
    return (f"{field}={kind!r} needs values in [0, 1] ({reason}), but {spec.name} is real-valued; "
            f"use {', '.join(fitting[:-1])} or {fitting[-1]}")


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
