"""Trials per hour on one device: one trial at a time, against the same trials packed.

    uv run python benchmarks/packing_speed.py [--device cpu|cuda] [--trials 16] [--epochs 2]
                                              [--space shared|dense] [--pack 16] [--data-dir DIR]

Trials are drawn (Optuna's random sampler, seed 0) from the dense subspace of
the shipped space mnist_variants and trained for a fixed number of epochs on MNIST:

- shared: the model and its objective fixed (hidden [512, 256, 128], latent 32, relu, a
          deterministic latent, MSE, no sparsity or contractive term), the rest searched as in
          the space (noise kind and level, optimiser, learning rate, weight decay): every trial
          shares one pack key, as in a second-stage search once an architecture is chosen
          (HFTA's case);
- dense:  the whole dense subspace (hidden widths, activations, latents, objectives): trials
          pack only where their shapes happen to agree.

Each set of trials is trained two ways, on one device, one after the other:

- alone:  one trial after another, each with the device to itself (one trial per GPU);
- packed: the trials grouped by pack key, up to --pack to a group, each group in one fused
          step per batch (`aesearch.packing.fused.train_packed_epoch`); a group of one trains alone.

It prints trials per hour of each (wall time of all epochs, validation included, evaluation
not), their ratio, and the largest relative difference of any trial's per-epoch val/recon_mse
between the two ways (packing must not change results), beside the yardstick of float rounding:
the same difference between each trial alone with torch's fused Adam and alone with its unfused
multi-tensor Adam (the same arithmetic in other kernels; training amplifies rounding, and a
batched matrix product rounds differently from single ones). Without CUDA, `--device cuda`
says that it skips and why.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import optuna
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from subspaces import dense_subspace as dense_document  # noqa: E402
from trainer_speed import mnist_dir  # noqa: E402

from aesearch.errors import ConfigError, DivergedError  # noqa: E402
from aesearch.packing.fused import pack_groups, train_group_epoch  # noqa: E402
from aesearch.parts.data import load_data  # noqa: E402
from aesearch.parts.optimizers import OPTIMIZERS  # noqa: E402
from aesearch.search.space import DefineByRun, SearchSpace, decode_params, trial_config  # noqa: E402
from aesearch.training.trainer import Trainer  # noqa: E402

SHARED_SHAPE = {"architecture": "dense", "hidden_dims": [512, 256, 128], "latent_dim": 32, "activation": "relu",
                "latent": "deterministic"}
SHAPE_PARAMETERS = ("model.architecture", "model.hidden_dims", "model.activation", "model.latent", "model.latent_dim",
                    "objective.reconstruction", "objective.sparsity.kind", "objective.contractive_weight")


def dense_subspace(kind: str) -> SearchSpace:
    document = dense_document()
    if kind == "shared":
        for name in SHAPE_PARAMETERS:
            del document["space"][name]
        document["base"]["model"] = SHARED_SHAPE
        document["base"]["objective"] = {"reconstruction": "mse"}
        document["space"] = {  # what is left: the noise and the optimiser
            name: parameter for name, parameter in document["space"].items()
            if name.startswith(("corruption.", "optimizer.")) or parameter.get("path", "").startswith("corruption.")
        }
    return SearchSpace.model_validate(document)


def draw_configs(space: SearchSpace, count: int, epochs: int, device: str) -> list:
    """`count` valid trial configs from the space, as a search's random sampler would draw them."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    define = DefineByRun(space)
    configs = []
    while len(configs) < count:
        trial = study.ask()
        define(trial)
        try:
            config = trial_config(space, decode_params(space, trial.params))
        except ConfigError:
            continue
        configs.append(config.model_copy(update={
            "name": f"t{len(configs)}", "seed": len(configs), "epochs": epochs,
            "runtime": config.runtime.model_copy(update={"device": device}),
        }))
    return configs


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def alone(configs, data, device: str, unfused_adam: bool = False) -> tuple[float, list[list[float]]]:
    """Each trial on its own; `unfused_adam`: with torch's multi-tensor Adam instead of the fused one
    (the same arithmetic in other kernels: how far float rounding alone moves a trial)."""
    sync(device)
    started = time.perf_counter()
    curves = []
    for config in configs:
        trainer = Trainer(config, data)
        if unfused_adam:
            opt = config.optimizer
            trainer.optimizer = OPTIMIZERS[opt.name](trainer.model.parameters(), opt.lr, opt.weight_decay, False)
        curve = []
        try:
            for _ in range(config.epochs):
                curve.append(trainer.run_epoch().metrics["val/recon_mse"])
        except DivergedError:
            curve.append(float("nan"))
        curves.append(curve)
    sync(device)
    return time.perf_counter() - started, curves


def packed(configs, data, device: str, pack: int) -> tuple[float, list[list[float]], list[int]]:
    sync(device)
    started = time.perf_counter()
    groups = pack_groups(dict(enumerate(configs)), pack)
    curves: list[list[float]] = [[] for _ in configs]
    for group in groups:
        trainers = {i: Trainer(configs[i], data) for i in group}
        while trainers:
            ends = train_group_epoch(list(trainers.values()))
            for i, end in zip(list(trainers), ends):
                diverged = isinstance(end, DivergedError)
                curves[i].append(float("nan") if diverged else end.metrics["val/recon_mse"])
                if diverged or trainers[i].epoch == configs[i].epochs:
                    del trainers[i]
    sync(device)
    return time.perf_counter() - started, curves, [len(g) for g in groups]


def largest_difference(one: list[list[float]], other: list[list[float]]) -> float:
    worst = 0.0
    for a, b in zip(one, other):
        for x, y in zip(a, b):
            if x == x and y == y:  # both numbers (a diverged epoch is NaN in both)
                worst = max(worst, abs(x - y) / max(abs(x), 1e-12))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--space", choices=["shared", "dense"], default="shared")
    parser.add_argument("--pack", type=int, default=16)
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"skipped: --device {args.device} asks for CUDA, and this machine has no CUDA device "
              f"(torch {torch.__version__}, {platform.machine()})")
        return
    device = args.device
    data = load_data(dense_subspace(args.space).data, mnist_dir(args.data_dir)).to(device)
    configs = draw_configs(dense_subspace(args.space), args.trials, args.epochs, device)
    hardware = torch.cuda.get_device_name() if device.startswith("cuda") else f"{platform.machine()}, {torch.get_num_threads()} threads"
    print(f"{args.trials} trials x {args.epochs} epochs of the {args.space} dense subspace of mnist_variants.yaml on "
          f"{device} ({hardware}); torch {torch.__version__}")
    packed_seconds, packed_curves, sizes = packed(configs, data, device, args.pack)
    alone_seconds, alone_curves = alone(configs, data, device)
    _, rounding_curves = alone(configs, data, device, unfused_adam=True)
    per_hour = {name: args.trials / seconds * 3600 for name, seconds in (("alone", alone_seconds), ("packed", packed_seconds))}
    print(f"  alone   {alone_seconds:8.1f} s   {per_hour['alone']:8.0f} trials/hour")
    print(f"  packed  {packed_seconds:8.1f} s   {per_hour['packed']:8.0f} trials/hour   groups: {sorted(sizes, reverse=True)}")
    print(f"packed / alone: {per_hour['packed'] / per_hour['alone']:.2f}x trials per hour")
    print(f"largest relative difference of a trial's val/recon_mse: packed vs alone "
          f"{largest_difference(alone_curves, packed_curves):.1e}; alone with unfused vs fused Adam (float rounding "
          f"alone) {largest_difference(alone_curves, rounding_curves):.1e}")


if __name__ == "__main__":
    main()
