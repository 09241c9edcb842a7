"""What the metrics of a use cost per epoch: one trainer, the same runs with and without each.

    uv run python benchmarks/use_metrics_cost.py [--data digits|mnist] [--epochs 5] [--repeats 3] [--data-dir DIR]

A dense autoencoder (and a VAE for the likelihood) trained by `aesearch.training.trainer.train`
for --epochs, with `evaluation.val_metrics` empty and then naming each group of metrics, on the
fixed validation subset (`evaluation.val_max_samples`, default 1,000 rows). Printed: the median
seconds per epoch of --repeats runs, made in turn (the first epoch of each left out: warm-up) and the overhead against
the same run without them.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from aesearch.config import parse_config  # noqa: E402
from aesearch.parts.data import load_data  # noqa: E402
from aesearch.training.trainer import train  # noqa: E402

GROUPS = {  # what a use asks for: (latent, the metrics)
    "none": ("deterministic", []),
    "anomaly (auroc, ap)": ("deterministic", ["val/anomaly_auroc", "val/anomaly_ap"]),
    "clustering (kmeans ari, knn)": ("deterministic", ["val/cluster_ari", "val/knn_accuracy"]),
    "denoising (psnr, gaussian)": ("deterministic", ["val/denoise_psnr_gaussian"]),
    "vae: none": ("gaussian", []),
    "likelihood (nll k=20, elbo)": ("gaussian", ["val/nll", "val/elbo"]),
}


def seconds_per_epoch(data_document: dict, latent: str, metrics: list[str], epochs: int, data) -> float:
    config = parse_config({
        "data": data_document, "epochs": epochs, "runtime": {"device": "cpu"},
        "model": {"latent": latent, "hidden_dims": [256, 128], "latent_dim": 16},
        "optimizer": {"batch_size": 128},
        "evaluation": {"val_metrics": metrics, "kmeans_restarts": 4},
    })
    result = train(config, data, run_evaluation=False)
    return statistics.median(epoch["time/epoch_seconds"] for epoch in result.history[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args()
    document = {"name": args.data, "anomaly": [0]}
    if args.data == "mnist":
        from trainer_speed import mnist_dir

        document["max_train_samples"] = 12_000
        args.data_dir = mnist_dir(args.data_dir)
    data = load_data(parse_config({"data": document}).data, args.data_dir)
    print(f"{args.data}: {len(data.train_x)} training rows, {len(data.val_x)} validation rows (at most 1,000 "
          f"measured); dense 256-128-16, batch 128; {platform.machine()}, {torch.get_num_threads()} threads")
    measured = {name: [] for name in GROUPS}
    for _ in range(args.repeats):  # round robin: a machine that drifts shifts every group alike
        for name, (latent, metrics) in GROUPS.items():
            measured[name].append(seconds_per_epoch(document, latent, metrics, args.epochs, data))
    baseline = {}
    for name, (latent, _) in GROUPS.items():
        seconds = statistics.median(measured[name])
        baseline.setdefault(latent, seconds)
        overhead = seconds / baseline[latent] - 1
        print(f"  {name:<30} {1000 * seconds:7.1f} ms per epoch   overhead {100 * overhead:+6.1f}%")


if __name__ == "__main__":
    main()
