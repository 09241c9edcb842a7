"""Packed training: trials that share a model shape, trained together in one fused step.

A small autoencoder leaves most of a GPU idle: its step is a handful of small kernels, and the
GPU waits on their launches. Packing (HFTA, Wang et al., MLSys 2021) stacks the weights of M
models of the same shape and runs their M forward and backward passes as one: `torch.func.vmap`
over the stacked weights turns M small matrix products into one batched product, and one
optimiser update covers all M.

Each member stays an ordinary `Trainer`, with its own config (seed, learning rate, weight decay,
noise level, KL and sparsity settings, epochs), its own data order and random draws (its
generator), its own history, best weights and checkpoint. `train_packed_epoch(trainers)` trains
one epoch of each: it stacks their weights and optimiser state, runs the epoch's steps fused,
writes weights and state back into each trainer, and lets each finish its epoch (validation,
best weights) as it would alone. So a member's epoch is the epoch it would have trained alone, up
to float rounding, and the pack keeps nothing between epochs: members join (a new trial, a
restored checkpoint) and leave (an early stop, a divergence) at any epoch boundary.

Members must agree on everything but MEMBER_FIELDS: `pack_key` says which trainers can share a
pack, `why_not_packable` why a config cannot be packed at all.
"""

from __future__ import annotations

import json
import math
import time

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.optim.adam import adam
from torch.optim.adamw import adamw

from aesearch.config import TrainConfig, flatten
from aesearch.errors import DivergedError
from aesearch.models import ARCHITECTURES, Autoencoder
from aesearch.objectives import Objective, weighted_sum
from aesearch.train import EpochEnd, Trainer

# What may differ between the members of one pack: per-member numbers of the step (tensors with
# one entry per member), host-side schedules, and what is not training at all.
MEMBER_FIELDS = {
    "name", "seed", "epochs",
    "optimizer.name", "optimizer.lr", "optimizer.weight_decay",
    "corruption.kind", "corruption.level",  # the encoder's input is made per member, outside the fused step
    "objective.kl.beta", "objective.kl.schedule", "objective.kl.warmup_epochs", "objective.kl.cycles",
    "objective.kl.ramp_fraction",
    "objective.sparsity.weight", "objective.sparsity.rho", "objective.contractive_weight",
}  # fmt: skip
MEMBER_SECTIONS = ("evaluation.",)


def why_not_packable(config: TrainConfig) -> str | None:
    """Why trials of this config cannot be packed, or None."""
    model = config.model
    if not ARCHITECTURES[model.architecture].packs:
        return f"model.architecture={model.architecture!r} does not pack (vmap runs fused attention one member at a time)"
    if config.objective.contractive_weight > 0 and not (model.architecture == "dense" and not model.hidden_dims):
        return (
            "the contractive penalty's estimator differentiates the code with respect to the input, "
            "which a packed step does not; only the closed form (a dense model without hidden layers) packs"
        )
    return None


def pack_key(config: TrainConfig) -> str | None:
    """Trainers whose configs have the same key can train in one pack; None: never packs."""
    if why_not_packable(config) is not None:
        return None
    flat = flatten(config.model_dump(mode="json"))
    shared = {
        name: value
        for name, value in flat.items()
        if name not in MEMBER_FIELDS and not name.startswith(MEMBER_SECTIONS)
    }
    shared["objective.contractive"] = config.objective.contractive_weight > 0  # which terms exist
    return json.dumps(shared, sort_keys=True)


class MemberTerms(nn.Module):
    """One member's forward pass and loss terms: the function a packed step maps over members.
    A module, so that `functional_call` swaps in a member's weights for the objective too (the
    contractive closed form reads the latent's weight)."""

    def __init__(self, model: Autoencoder, objective: Objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, x, x_in, noise, rho) -> dict[str, torch.Tensor]:
        output = self.model(x_in, sample=True, noise=noise)
        return self.objective.terms(self.model, x, x_in, output, rho)


ADAM_STEPS = {False: adam, True: adamw}  # decoupled weight decay?


class PackedAdam:
    """Each member's own Adam or AdamW (its settings, its moments, its step count), run on its
    slice of the stacked weights and gradients by torch's own functional optimiser, with the
    kernel the member's optimiser uses alone (fused on CPU and CUDA): the update is exactly the
    one it would make alone, in one launch per member."""

    def __init__(self, params: dict[str, torch.Tensor], trainers: list[Trainer]):
        self.params, self.trainers = params, trainers
        self.exp_avg, self.exp_avg_sq, self.steps = {}, {}, []
        for name, stacked in params.items():
            self.exp_avg[name] = torch.zeros_like(stacked)
            self.exp_avg_sq[name] = torch.zeros_like(stacked)
        for i, trainer in enumerate(trainers):
            group = trainer.optimizer.param_groups[0]
            scalar_device = stacked.device if (group.get("fused") or group.get("capturable")) else "cpu"
            steps = []
            for name, param in trainer.model.named_parameters():
                state = trainer.optimizer.state.get(param, {})
                if state:
                    self.exp_avg[name][i].copy_(state["exp_avg"])
                    self.exp_avg_sq[name][i].copy_(state["exp_avg_sq"])
                steps.append(torch.tensor(float(state.get("step", 0.0)), dtype=torch.float32, device=scalar_device))
            self.steps.append(steps)

    @torch.no_grad()
    def step(self) -> None:
        for i, trainer in enumerate(self.trainers):
            group = trainer.optimizer.param_groups[0]
            ADAM_STEPS[isinstance(trainer.optimizer, torch.optim.AdamW)](
                [p[i] for p in self.params.values()],
                [p.grad[i] for p in self.params.values()],
                [m[i] for m in self.exp_avg.values()],
                [v[i] for v in self.exp_avg_sq.values()],
                [],
                self.steps[i],
                foreach=group["foreach"],
                fused=group["fused"],
                amsgrad=False,
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
            )

    def write_back(self) -> None:
        """Each member's slice of the state into its own optimiser, as torch's Adam keeps it."""
        for i, trainer in enumerate(self.trainers):
            for (name, param), step in zip(trainer.model.named_parameters(), self.steps[i]):
                trainer.optimizer.state[param] = {
                    "step": step.clone(),
                    "exp_avg": self.exp_avg[name][i].clone(),
                    "exp_avg_sq": self.exp_avg_sq[name][i].clone(),
                }


def check_packable(trainers: list[Trainer]) -> None:
    """Refuse a pack whose members could not share a step."""
    first = trainers[0]
    for trainer in trainers:
        reason = why_not_packable(trainer.config)
        if reason:
            raise ValueError(f"trial {trainer.config.name!r} cannot be packed: {reason}")
        if pack_key(trainer.config) != pack_key(first.config):
            raise ValueError(
                f"trials {first.config.name!r} and {trainer.config.name!r} differ in more than "
                "per-member settings; they cannot share a pack"
            )
        if trainer.device != first.device or trainer.data.fingerprint != first.data.fingerprint:
            raise ValueError(f"trial {trainer.config.name!r} is on other data or another device than the pack")


def pack_groups(configs: dict[str, TrainConfig], pack: int) -> list[list[str]]:
    """The ids of `configs` grouped for training: one pack key together, at most `pack` to a
    group; a config that cannot be packed alone."""
    by_key: dict[str, list[str]] = {}
    groups = []
    for name, config in configs.items():
        key = pack_key(config)
        if key is None:
            groups.append([name])
        else:
            by_key.setdefault(key, []).append(name)
    for same in by_key.values():
        groups += [same[i : i + pack] for i in range(0, len(same), pack)]
    return groups


def train_group_epoch(trainers: list[Trainer]) -> list[EpochEnd | DivergedError]:
    """One epoch of each trainer of a group: fused, or the trainer's own epoch when it is alone
    (any architecture)."""
    if len(trainers) > 1:
        return train_packed_epoch(trainers)
    try:
        return [trainers[0].run_epoch()]
    except DivergedError as error:
        return [error]


def train_packed_epoch(trainers: list[Trainer]) -> list[EpochEnd | DivergedError]:
    """One epoch of every trainer, trained in one fused step per batch. Each member's result
    is its EpochEnd, or the DivergedError that ends that member alone."""
    check_packable(trainers)
    started = time.perf_counter()
    passes = _packed_train_pass(trainers)
    results: list[EpochEnd | DivergedError] = []
    for trainer, (train, mean_beta) in zip(trainers, passes):
        try:
            results.append(trainer.finish_epoch(train, mean_beta, started))
        except DivergedError as error:
            results.append(error)
    return results


def _packed_train_pass(trainers: list[Trainer]) -> list[tuple[dict[str, float], float]]:
    """The training pass of `Trainer._train_pass`, for all members at once."""
    first, count = trainers[0], len(trainers)
    device, objective = first.device, first.objective
    for trainer in trainers:
        trainer.model.train()
    params, buffers = stack_module_state([t.model for t in trainers])
    optimizer = PackedAdam(params, trainers)
    member_terms = MemberTerms(first.model, objective)

    def terms_of_one(params, buffers, x, x_in, noise, rho):
        state = {f"model.{name}": value for name, value in (params | buffers).items()}
        return functional_call(member_terms, state, (x, x_in, noise, rho))

    images, batch_size = first.data.train_x, first.config.optimizer.batch_size
    steps = math.ceil(len(images) / batch_size)
    orders = torch.stack([t.shuffled_order() for t in trainers])  # (members, images)
    # Per-member weights: the KL weight moves every step (each member on its own schedule and
    # epoch), so the epoch's betas are computed up front and sent to the device once.
    host_betas = [[t.objective.beta(t.epoch + step / steps) for step in range(steps)] for t in trainers]
    betas = torch.tensor(host_betas, device=device)
    weights = {
        name: torch.tensor([t.objective.weights(0.0)[name] for t in trainers], device=device)
        for name in ("sparsity", "contractive")
    }
    rho = torch.tensor([t.config.objective.sparsity.rho for t in trainers], device=device)
    stochastic = first.model.stochastic
    mapped = vmap(terms_of_one, in_dims=(0, 0, 0, 0, 0 if stochastic else None, 0), randomness="error")

    sums = torch.zeros(count, 1 + len(objective.term_names), device=device)
    for step in range(steps):
        start = step * batch_size
        batch = images[orders[:, start : start + batch_size]]  # (members, batch, C, H, W)
        # Each member's corruption and latent noise from its own generator, in its own order.
        drawn = [t.inputs(batch[i]) for i, t in enumerate(trainers)]
        x = batch
        x_in = torch.stack([d[1] for d in drawn])
        noise = torch.stack([d[2] for d in drawn]) if stochastic else None
        with first.forward_context():
            terms = mapped(params, buffers, x, x_in, noise, rho)
            losses = weighted_sum(terms, {"kl": betas[:, step], **weights})  # (members,)
        for param in params.values():
            param.grad = None
        losses.sum().backward()  # members are independent: each gets the gradient of its own loss
        optimizer.step()
        per_member = torch.stack([losses.detach(), *(terms[n].detach() for n in objective.term_names)], dim=1)
        sums.add_(per_member, alpha=x.shape[1])

    with torch.no_grad():
        for i, trainer in enumerate(trainers):
            for name, param in trainer.model.named_parameters():
                param.copy_(params[name][i])
            for name, buffer in trainer.model.named_buffers():
                buffer.copy_(buffers[name][i])
    optimizer.write_back()

    values = (sums / len(images)).tolist()  # the one host sync of the pass
    names = ["train/loss", *(f"train/{n}" for n in objective.term_names)]
    return [(dict(zip(names, row)), sum(member) / steps) for row, member in zip(values, host_betas)]
