"""Optimisers by name. Each builds from the parameters, lr, weight decay and whether to use the
fused kernel (one kernel for all parameters: ~12% faster epochs for small models on a CPU), and
says whether a packed step (aesearch.packing.fused) can run it: with torch's functional form of
the optimiser, on each member's slice of the stacked weights; one without cannot be packed."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch.optim.adam import adam as adam_update
from torch.optim.adamw import adamw as adamw_update

from aesearch.registry import Registry
from aesearch.schema import Bounded, Float, Named, Section

OptimizerBuilder = Callable[[Iterable[torch.nn.Parameter], float, float, bool], torch.optim.Optimizer]


@dataclass(frozen=True)
class FunctionalAdam:
    """Adam or AdamW as torch's functional update (`torch.optim.adam.adam` or `adamw`), run by a
    packed step on one member's slice of the stacked weights with that member's settings and
    state: the update it makes alone, with the kernel it uses alone (fused on CPU and CUDA)."""

    update: Callable[..., None]
    state_names = ("exp_avg", "exp_avg_sq")  # per parameter, shaped like it, beside its step count

    def step_count(self, state: dict[str, Any], group: dict[str, Any], device: torch.device) -> torch.Tensor:
        """A parameter's step count as torch's Adam keeps it: a float32 scalar, on the parameter's
        device for the fused and capturable kernels, else on the CPU."""
        on = device if (group.get("fused") or group.get("capturable")) else "cpu"
        return torch.tensor(float(state.get("step", 0.0)), dtype=torch.float32, device=on)

    def __call__(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], state: dict[str, list[torch.Tensor]],
        steps: list[torch.Tensor], group: dict[str, Any],
    ) -> None:
        """One update of `params` in place; `state`: each of state_names' tensors, per parameter."""
        self.update(
            params, grads, state["exp_avg"], state["exp_avg_sq"], [], steps,
            foreach=group["foreach"], fused=group["fused"], amsgrad=False,
            beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
        )  # fmt: skip


@dataclass(frozen=True)
class Optimizer:
    """A registered optimiser: how a run builds it, and how a packed step runs it (None: trials
    with it train alone)."""

    build: OptimizerBuilder
    packed: FunctionalAdam | None = None

    def __call__(self, params, lr: float, weight_decay: float, fused: bool) -> torch.optim.Optimizer:
        return self.build(params, lr, weight_decay, fused)


OPTIMIZERS: Registry[Optimizer] = Registry("optimizer")


def register(name: str, packed: FunctionalAdam | None) -> Callable[[OptimizerBuilder], OptimizerBuilder]:
    """Register a builder under `name`, with its packed update (None: it does not pack)."""

    def add(build: OptimizerBuilder) -> OptimizerBuilder:
        OPTIMIZERS.add(name, Optimizer(build, packed))
        return build

    return add


@register("adam", packed=FunctionalAdam(adam_update))
def adam(params, lr: float, weight_decay: float, fused: bool) -> torch.optim.Optimizer:
    """Adam; weight decay is L2 added to the gradient (classic)."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


@register("adamw", packed=FunctionalAdam(adamw_update))
def adamw(params, lr: float, weight_decay: float, fused: bool) -> torch.optim.Optimizer:
    """AdamW; weight decay decoupled from the gradient (Loshchilov & Hutter)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


# --- this part's section of the config --------------------------------------------------------


class OptimizerConfig(Section):
    name: Named(OPTIMIZERS) = "adam"
    lr: Float = Field(1e-3, gt=0.0, le=10.0)
    weight_decay: Float = Field(0.0, ge=0.0)
    batch_size: Bounded(65536) = 128
