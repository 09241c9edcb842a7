"""Epoch time of the aesearch trainer against a tutorial loop and the compute floor, side by side.

    uv run python benchmarks/trainer_speed.py [--device cpu|cuda] [--rounds N] [--data-dir DIR]

Three ways to train the same autoencoder (MLP 784-128-32-128-784, sigmoid output, Adam 1e-3,
MSE, batch 128) on MNIST, one epoch of each per round, interleaved so that machine drift hits
them alike:

- naive:    torchvision MNIST + ToTensor + DataLoader(batch_size=128, shuffle=True), as the
            tutorials write it (a PIL image and a tensor built per sample, every epoch);
- bare:     the dataset resident on the device, randperm batches, nothing else: the floor;
- aesearch: `Trainer.run_epoch()` on the `dense` config with the same shapes; its epoch also
            runs the validation pass (6,000 images) and tracks every loss term.

Epoch times are normalised to 60,000 training images (the trainer holds 54,000 out of 60,000
for training); the ratios are printed for the medians over the rounds and for the fastest epoch
of each loop (on a shared machine, noise only ever adds time).
MNIST comes from --data-dir (torchvision layout); by default the offline copy in
../shared/datasets is copied into benchmarks/.data first.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
SHARED_MNIST = HERE.parent.parent / "shared" / "datasets" / "MNIST"
IMAGES = 60_000


def tutorial_model() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 32),
        nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 784), nn.Sigmoid(),
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class NaiveLoop:
    """The loop as tutorials write it."""

    def __init__(self, data_dir: Path, device: torch.device):
        from torch.utils.data import DataLoader
        from torchvision import datasets, transforms

        dataset = datasets.MNIST(str(data_dir), train=True, download=False, transform=transforms.ToTensor())
        self.loader = DataLoader(dataset, batch_size=128, shuffle=True)
        self.device = device
        self.model = tutorial_model().to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.loss = nn.MSELoss()

    def epoch(self) -> float:
        started = time.perf_counter()
        for images, _ in self.loader:
            images = images.to(self.device).view(images.size(0), -1)
            self.optimizer.zero_grad()
            loss = self.loss(self.model(images), images)
            loss.backward()
            self.optimizer.step()
            loss.item()  # the tutorial's running-loss bookkeeping
        sync(self.device)
        return time.perf_counter() - started


class BareLoop:
    """Resident tensors and randperm: the compute floor for this model and batch size."""

    def __init__(self, images: torch.Tensor, device: torch.device):
        self.images = images.to(device).flatten(1)
        self.device = device
        self.model = tutorial_model().to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3, fused=True)

    def epoch(self) -> float:
        started = time.perf_counter()
        order = torch.randperm(len(self.images), device=self.device)
        for start in range(0, len(self.images), 128):
            x = self.images[order[start : start + 128]]
            loss = (self.model(x) - x).pow(2).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        sync(self.device)
        return time.perf_counter() - started


class AesearchTrainer:
    def __init__(self, data_dir: Path, device: torch.device):
        from aesearch.config import load_config
        from aesearch.parts.data import load_data
        from aesearch.training.trainer import Trainer

        config = load_config(
            HERE.parent / "aesearch" / "configs" / "dense.yaml",
            ["data.name=mnist", "model.hidden_dims=[128]", "model.latent_dim=32", "optimizer.batch_size=128",
             f"runtime.device={device}", "epochs=1000"],
        )
        self.trainer = Trainer(config, load_data(config.data, data_dir))
        self.scale = IMAGES / len(self.trainer.data.train_x)

    def epoch(self) -> float:
        started = time.perf_counter()
        self.trainer.run_epoch()  # ends with a host sync (it reads the epoch's metrics)
        return (time.perf_counter() - started) * self.scale


def mnist_dir(requested: Path | None) -> Path:
    if requested is not None:
        return requested
    target = HERE / ".data"
    if not (target / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        if not SHARED_MNIST.is_dir():
            sys.exit(f"no MNIST: pass --data-dir, or put the torchvision MNIST files in {SHARED_MNIST}")
        shutil.copytree(SHARED_MNIST, target / "MNIST", dirs_exist_ok=True)
        from torchvision.datasets import MNIST

        MNIST(str(target), download=True)  # verifies the md5 of the local archives and extracts them
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=4, help="epochs of each loop (the first is warm-up)")
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("skipped: --device cuda asked for, but this machine has no CUDA device (torch.cuda.is_available() is False)")
        return

    data_dir = mnist_dir(args.data_dir)
    torch.manual_seed(0)
    naive = NaiveLoop(data_dir, device)
    bare = BareLoop(torch.as_tensor(naive.loader.dataset.data).float().div(255).unsqueeze(1), device)
    ours = AesearchTrainer(data_dir, device)
    loops = {"naive": naive, "bare": bare, "aesearch": ours}

    times: dict[str, list[float]] = {name: [] for name in loops}
    for round_ in range(args.rounds):
        for name, loop in loops.items():
            seconds = loop.epoch()
            if round_ > 0:  # round 0 warms up allocators, kernels and the page cache
                times[name].append(seconds)
    median = {name: statistics.median(values) for name, values in times.items()}
    fastest = {name: min(values) for name, values in times.items()}  # noise on a shared machine only adds

    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device: {device} ({hardware}); torch {torch.__version__}; {args.rounds - 1} timed epochs each")
    for name, seconds in median.items():
        print(f"  {name:<9} {seconds:7.3f} s/epoch (60k images)   all: {', '.join(f'{s:.3f}' for s in times[name])}")
    for label, stat in (("median", median), ("fastest", fastest)):
        print(f"{label:<8} naive / aesearch = {stat['naive'] / stat['aesearch']:.2f}x (faster than the tutorial loop), "
              f"aesearch / bare = {stat['aesearch'] / stat['bare']:.3f}x (over the compute floor)")


if __name__ == "__main__":
    main()
