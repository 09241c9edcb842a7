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
pack, `why_not_packable` why a config cannot be packed at all. Latent widths may differ: the pack
pads each member's weights to the widest code with zeros and masks the padded code units, so
they stay zero, get no gradient and add nothing to any term. Reconstruction losses and sparsity
penalties may differ too: the pack computes each kind its members use and weighs it per member
with 1 or 0 (exact in floats). The terms are the objective's own (`Objective.terms_with`, mapped
over the members), and each member's update its optimiser's own, in the functional form that the
optimiser registry gives (`aesearch.parts.optimizers`): the pack has no loss or optimiser of its own.
"""

from __future__ import annotations

import json
import math
import time

import torch
from torch import nn
from torch.func import functional_call, vmap

from aesearch.config import TrainConfig
from aesearch.errors import DivergedError
from aesearch.parts.clustering import REFINEMENTS
from aesearch.parts.models import ARCHITECTURES, Autoencoder, LatentOutput, Output, build_model
from aesearch.parts.objectives import Choice, Objective, weighted_sum
from aesearch.parts.optimizers import OPTIMIZERS
from aesearch.schema import flatten
from aesearch.training.trainer import EpochEnd, Trainer, deterministic_cudnn

# What may differ between the members of one pack: per-member numbers of the step (tensors with
# one entry per member), host-side schedules, and what is not training at all.
MEMBER_FIELDS = {
    "name", "seed", "epochs",
    "model.latent_dim",  # padded to the widest member's (PaddedStack)
    "objective.reconstruction", "objective.sparsity.kind",  # every kind in the pack computed, weighed per member
    "optimizer.name", "optimizer.lr", "optimizer.weight_decay",
    "corruption.kind", "corruption.level",  # the encoder's input is made per member, outside the fused step
    "objective.kl.beta", "objective.kl.schedule", "objective.kl.warmup_epochs", "objective.kl.cycles",
    "objective.kl.ramp_fraction",
    "objective.sparsity.weight", "objective.sparsity.rho", "objective.contractive_weight",
}  # fmt: skip
MEMBER_SECTIONS = ("evaluation.", "optimizer.schedule.")  # a schedule sets its member's lr between epochs


def why_not_packable(config: TrainConfig) -> str | None:
    """Why trials of this config cannot be packed, or None."""
    model = config.model
    if not ARCHITECTURES[model.architecture].packs:
        return f"model.architecture={model.architecture!r} does not pack (vmap runs fused attention one member at a time)"
    if REFINEMENTS[config.clustering.refinement].trains:
        return (f"clustering.refinement={config.clustering.refinement!r} does not pack (its centres and targets "
                "are the trainer's own, outside the fused step)")
    name = config.optimizer.name
    if OPTIMIZERS[name].packed is None:
        return f"optimizer.name={name!r} does not pack (it has no functional update in aesearch.parts.optimizers)"
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


class MemberPass(nn.Module):
    """One member's forward pass and loss terms: the function a packed step maps over members.
    A module, so that `functional_call` swaps in a member's weights for the objective too (the
    contractive closed form reads the latent's weight). The terms are the objective's own
    (`Objective.terms_with`), with the members' choices of kinds stacked (`Choice.stack`)."""

    def __init__(self, model: Autoencoder, objective: Objective, estimates_contractive: bool):
        super().__init__()
        self.model, self.objective = model, objective
        self.estimates_contractive = estimates_contractive  # no closed form: d code / d x along directions

    def forward(self, x, x_in, noise, directions, choice: Choice) -> dict[str, torch.Tensor]:
        def encode(x_in):
            latent = self.model.encode(x_in, sample=True, noise=noise)
            latent.z, latent.code = latent.z * choice.units, latent.code * choice.units  # padded units: 0, no gradient
            return latent.code, {name: value for name, value in vars(latent).items() if value is not None}

        pullback = None
        if self.estimates_contractive:  # torch.func's vector-Jacobian product: autograd.grad does not run in vmap
            _, vjp, fields = torch.func.vjp(encode, x_in, has_aux=True)

            def pullback(v: torch.Tensor) -> torch.Tensor:
                return vjp(v)[0]
        else:
            _, fields = encode(x_in)
        latent = LatentOutput(**fields)
        output = Output(self.model.decode(latent.z), latent, self.model.spec)
        return self.objective.terms_with(self.model, x, output, choice, pullback, directions)


class PaddedStack:
    """The members' weights stacked along a new first dimension, each padded with zeros to the
    widest member's latent width: along a dimension that scales with the width (k * latent_dim:
    the latent's output, 2 chunks for a gaussian's mean and log-variance; the decoder's input), a
    member's k chunks of d sit at 0, D, 2D... of the padded k * D. `template` is a model of the
    padded shape: the skeleton that `functional_call` fills with each member's weights."""

    def __init__(self, models: list[Autoencoder], template: Autoencoder):
        self.models, self.width = models, template.latent_dim
        self.shapes = [{name: tensor.shape for name, tensor in [*m.named_parameters(), *m.named_buffers()]}
                       for m in models]  # each member's own, by name
        self.params = {name: self._stack(name, [dict(m.named_parameters())[name] for m in models], param)
                       for name, param in template.named_parameters()}
        for stacked in self.params.values():
            stacked.requires_grad_(True)
        self.buffers = {name: self._stack(name, [dict(m.named_buffers())[name] for m in models], buffer)
                        for name, buffer in template.named_buffers()}

    def where(self, i: int, name: str, padded_shape: torch.Size) -> tuple:
        """The index of member i's tensor `name` inside its padded slice."""
        shape, latent_dim = self.shapes[i][name], self.models[i].latent_dim
        if shape == padded_shape:
            return (...,)
        axes = []
        for size, padded in zip(shape, padded_shape):
            chunks = padded // self.width
            if size == padded:
                axes.append(torch.arange(size))
            elif size == chunks * latent_dim and padded == chunks * self.width:
                axes.append(torch.cat([torch.arange(latent_dim) + c * self.width for c in range(chunks)]))
            else:
                raise ValueError(f"{name} of shape {tuple(shape)} does not fit {tuple(padded_shape)}")
        return torch.meshgrid(*axes, indexing="ij")

    @torch.no_grad()
    def _stack(self, name: str, members: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        stacked = torch.zeros((len(members), *like.shape), dtype=members[0].dtype, device=members[0].device)
        for i, tensor in enumerate(members):
            stacked[i][self.where(i, name, like.shape)] = tensor
        return stacked

    def padded(self, i: int, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A member's tensor (a weight or its optimiser state) padded to the stack's shape."""
        out = torch.zeros_like(self.params[name][i])
        out[self.where(i, name, out.shape)] = tensor
        return out

    def unpadded(self, i: int, name: str, padded: torch.Tensor) -> torch.Tensor:
        """Member i's tensor inside its padded one (a weight or its optimiser state)."""
        return padded[self.where(i, name, padded.shape)]


class PackedOptimizer:
    """Each member's own optimiser (its settings, its state, its step counts), run on its slice of
    the stacked weights and gradients by the functional update that the optimiser registry gives
    (`OPTIMIZERS[name].packed`): the update it would make alone, in one launch per member."""

    def __init__(self, stack: PaddedStack, trainers: list[Trainer]):
        self.stack, self.trainers = stack, trainers
        self.updates = [OPTIMIZERS[t.config.optimizer.name].packed for t in trainers]
        self.states: list[dict[str, list[torch.Tensor]]] = []  # per member: each state's tensors, padded
        self.steps: list[list[torch.Tensor]] = []  # per member: each parameter's step count
        for i, (trainer, update) in enumerate(zip(trainers, self.updates)):
            group, params = trainer.optimizer.param_groups[0], dict(trainer.model.named_parameters())
            saved = {name: trainer.optimizer.state.get(params[name], {}) for name in stack.params}
            self.states.append({
                key: [stack.padded(i, name, state[key]) if state else torch.zeros_like(stack.params[name][i])
                      for name, state in saved.items()]
                for key in update.state_names
            })  # fmt: skip
            self.steps.append([update.step_count(state, group, stack.params[name].device)
                               for name, state in saved.items()])

    @torch.no_grad()
    def step(self) -> None:
        params = self.stack.params.values()
        for i, (trainer, update) in enumerate(zip(self.trainers, self.updates)):
            update([p[i] for p in params], [p.grad[i] for p in params], self.states[i], self.steps[i],
                   trainer.optimizer.param_groups[0])

    def write_back(self) -> None:
        """Each member's part of its state into its own optimiser, as torch keeps it."""
        for i, trainer in enumerate(self.trainers):
            params = dict(trainer.model.named_parameters())
            for j, name in enumerate(self.stack.params):
                trainer.optimizer.state[params[name]] = {
                    "step": self.steps[i][j].clone(),
                    **{key: self.stack.unpadded(i, name, tensors[j]) for key, tensors in self.states[i].items()},
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
    device = first.device
    for trainer in trainers:
        trainer.model.train()
    width = max(t.model.latent_dim for t in trainers)
    with torch.device("meta"):  # shapes only (functional_call supplies the weights), and no draw from torch's RNG
        template = build_model(first.config.model.model_copy(update={"latent_dim": width}), first.data.spec)
    stack = PaddedStack([t.model for t in trainers], template)
    params, buffers = stack.params, stack.buffers
    optimizer = PackedOptimizer(stack, trainers)
    objective = first.objective  # whether it has a KL and a contractive term: the pack's (pack_key)
    member_pass = MemberPass(template.train(), objective, first.input_grad)
    units = torch.stack([torch.arange(width, device=device) < t.model.latent_dim for t in trainers]).float()
    choice = Choice.stack([t.objective.choice for t in trainers], units)
    term_names = objective.names(choice)

    def terms_of_one(params, buffers, x, x_in, noise, directions, choice):
        state = {f"model.{name}": value for name, value in (params | buffers).items()}
        return functional_call(member_pass, state, (x, x_in, noise, directions, choice))

    images, batch_size = first.data.train_x, first.config.optimizer.batch_size
    steps = math.ceil(len(images) / batch_size)
    orders = torch.stack([t.shuffled_order() for t in trainers])  # (members, images)
    # Per-member weights of the terms: the KL weight moves every step (each member on its own
    # schedule and epoch), so the epoch's weights are computed up front and sent to the device once.
    host_betas = [[t.objective.beta(t.epoch + step / steps) for step in range(steps)] for t in trainers]
    host_weights = [[t.objective.weights(beta) for t, beta in zip(trainers, betas)] for betas in zip(*host_betas)]
    weights = {name: torch.tensor([[w[name] for w in members] for members in host_weights], device=device)
               for name in host_weights[0][0]}  # name -> (steps, members)
    stochastic, estimates = first.model.stochastic, member_pass.estimates_contractive
    mapped = vmap(terms_of_one, in_dims=(0, 0, 0, 0, 0 if stochastic else None, 0 if estimates else None, 0),
                  randomness="error")

    def widened(draws: list[torch.Tensor]) -> torch.Tensor:
        """The members' draws over code units, stacked, padded to the pack's code width."""
        return torch.stack([nn.functional.pad(d, (0, width - d.shape[-1])) for d in draws])

    sums = torch.zeros(count, 1 + len(term_names), device=device)
    with deterministic_cudnn(device):  # as the trainer's own pass: bit-for-bit repeatable on CUDA
        for step in range(steps):
            start = step * batch_size
            batch = images[orders[:, start : start + batch_size]]  # (members, batch, C, H, W)
            # Each member's corruption, latent noise and directions from its own generator, in its own order.
            drawn = [t.inputs(batch[i], training=True) for i, t in enumerate(trainers)]
            x = torch.stack([d.x for d in drawn]) if first.binarize_batches else batch  # each member's own bits
            x_in = torch.stack([d.x_in.detach() for d in drawn])
            noise = widened([d.noise for d in drawn]) if stochastic else None
            directions = widened([d.directions for d in drawn]) if estimates else None
            with first.forward_context():
                terms = mapped(params, buffers, x, x_in, noise, directions, choice)
                losses = weighted_sum(terms, {name: w[step] for name, w in weights.items()})  # (members,)
            for param in params.values():
                param.grad = None
            losses.sum().backward()  # members are independent: each gets the gradient of its own loss
            optimizer.step()
            per_member = torch.stack([losses.detach(), *(t.detach() for t in terms.values())], dim=1)
            sums.add_(per_member, alpha=x.shape[1])

    with torch.no_grad():
        for i, trainer in enumerate(trainers):
            for name, param in trainer.model.named_parameters():
                param.copy_(stack.unpadded(i, name, params[name][i]))
            for name, buffer in trainer.model.named_buffers():
                buffer.copy_(stack.unpadded(i, name, buffers[name][i]))
    optimizer.write_back()

    values = (sums / len(images)).tolist()  # the one host sync of the pass
    names = ["loss", *term_names]
    return [
        ({f"train/{n}": v for n, v in zip(names, row) if n == "loss" or n in trainer.objective.term_names},
         sum(betas_of_member) / steps)
        for row, trainer, betas_of_member in zip(values, trainers, host_betas)
    ]
