"""Optimisers and learning-rate schedules by name.

An optimiser builds from the parameters, lr, weight decay and whether to use the fused kernel (one kernel for
all parameters: ~12% faster epochs for small models on a CPU), and says whether a packed step
(aesearch.packing.fused) can run it: with torch's functional form of the optimiser, on each member's slice of
the stacked weights; one without cannot be packed.

A schedule is one of torch's schedulers, stepped once an epoch after validation (reduce-on-plateau with the
validation loss). It sets the lr of the optimiser's group, which a packed step reads for each member, so every
schedule packs; its state goes into every checkpoint, so a resumed run goes on exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import math
import warnings

import torch
from pydantic import Field, model_validator
from torch.optim import lr_scheduler
from torch.optim.adam import adam as adam_update
from torch.optim.adamw import adamw as adamw_update

from aesearch.registry import Registry
from aesearch.schema import Bounded, Float, Int, Named, PositiveInt, Section, broken_rule

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


# --- learning-rate schedules -------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """A registered schedule: torch's scheduler for an optimiser, from the schedule's settings and the run's
    epochs; `fields`: the settings it reads (any other one set is refused)."""

    build: Callable[[torch.optim.Optimizer, ScheduleConfig, int], Any]
    fields: tuple[str, ...] = ()
    on_validation: bool = False  # stepped with the validation loss

    def advance(self, scheduler: Any, validation_loss: float) -> None:
        """After an epoch: the next epoch's lr. A packed trial's optimiser is stepped by the pack's
        functional update, which torch does not see: its warning that the scheduler stepped first would
        be wrong there (and is shown to no one else: every other epoch steps the optimiser)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            if self.on_validation:
                scheduler.step(validation_loss)
            else:
                scheduler.step()


SCHEDULES: Registry[Schedule] = Registry("learning-rate schedule")


def constant(optimizer: torch.optim.Optimizer, settings: ScheduleConfig, epochs: int) -> Any:
    return lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def cosine(optimizer: torch.optim.Optimizer, settings: ScheduleConfig, epochs: int) -> Any:
    """A linear warm-up from lr / (warmup_epochs + 1), then a half cosine down to lr * min_factor at the last epoch."""
    warmup = settings.warmup_epochs
    decay = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs - warmup),
                                           eta_min=optimizer.param_groups[0]["lr"] * settings.min_factor)
    if not warmup:
        return decay
    rise = lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [rise, decay], milestones=[warmup])


def step(optimizer: torch.optim.Optimizer, settings: ScheduleConfig, epochs: int) -> Any:
    return lr_scheduler.StepLR(optimizer, step_size=settings.step_epochs, gamma=settings.factor)


def plateau(optimizer: torch.optim.Optimizer, settings: ScheduleConfig, epochs: int) -> Any:
    return lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=settings.factor, patience=settings.patience)


@dataclass
class Staged:
    """The IWAE paper's protocol (Burda et al. 2015): stage i lasts 3^i epochs at lr * 10^(-i/7)."""

    def __call__(self, epoch: int) -> float:
        stage = int(math.log(2 * epoch + 1, 3) + 1e-9)  # epochs before stage i: (3^i - 1) / 2
        return 10 ** (-stage / 7)


def staged(optimizer: torch.optim.Optimizer, settings: ScheduleConfig, epochs: int) -> Any:
    return lr_scheduler.LambdaLR(optimizer, Staged())


SCHEDULES.add("constant", Schedule(constant))
SCHEDULES.add("cosine", Schedule(cosine, ("warmup_epochs", "min_factor")))
SCHEDULES.add("step", Schedule(step, ("step_epochs", "factor")))
SCHEDULES.add("plateau", Schedule(plateau, ("factor", "patience"), on_validation=True))
SCHEDULES.add("staged", Schedule(staged))


# --- this part's section of the config --------------------------------------------------------


class ScheduleConfig(Section):
    """How the learning rate moves over the epochs (see SCHEDULES); each setting belongs to the kinds that read it."""

    kind: Named(SCHEDULES) = "constant"
    warmup_epochs: Int = Field(0, ge=0)  # cosine: epochs of linear warm-up before the decay
    min_factor: Float = Field(0.0, ge=0.0, lt=1.0)  # cosine: the last epoch's lr, as a share of lr
    step_epochs: PositiveInt = 30  # step: epochs between two reductions
    factor: Float = Field(0.1, gt=0.0, lt=1.0)  # step and plateau: each reduction multiplies lr by it
    patience: Int = Field(5, ge=0)  # plateau: epochs without a better validation loss before a reduction

    @model_validator(mode="after")
    def _settings_fit_the_kind(self) -> ScheduleConfig:
        """A setting the kind does not read must keep its default (a config written out in full reads back)."""
        read = SCHEDULES[self.kind].fields
        stray = [name for name, field in type(self).model_fields.items()
                 if name not in ("kind", *read) and getattr(self, name) != field.default]
        if stray:
            takes = f"it takes {', '.join(read)}" if read else "it takes no settings"
            raise broken_rule(f"optimizer.schedule.{stray[0]}={getattr(self, stray[0])!r} does not apply to the "
                              f"{self.kind} schedule: {takes}")
        return self


class OptimizerConfig(Section):
    name: Named(OPTIMIZERS) = "adam"
    lr: Float = Field(1e-3, gt=0.0, le=10.0)
    weight_decay: Float = Field(0.0, ge=0.0)
    batch_size: Bounded(65536) = 128
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
