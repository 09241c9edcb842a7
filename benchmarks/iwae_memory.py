"""Peak memory and time of the test NLL (the IWAE bound) of the IWAE paper's VAE on MNIST's 10,000 test images.

    uv run python benchmarks/iwae_memory.py [--k 1000]
    MALLOC_ARENA_MAX=1 uv run python benchmarks/iwae_memory.py      # an allocator setting beside it

The bound runs in chunks of tens of MB of temporaries; `evaluate` hands freed memory back every
`TRIM_EVERY` chunks (glibc otherwise kept it: 24 GB in one run). Untrained weights: the memory and
the time depend on the shapes, not on the values.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import IWAE_VAE  # noqa: E402
from trainer_speed import mnist_dir  # noqa: E402

from aesearch.config import parse_config  # noqa: E402
from aesearch.parts.data import load_data  # noqa: E402
from aesearch.parts.models import build_model  # noqa: E402
from aesearch.training.evaluate import gaussian_latent_metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=1000, help="importance samples (the benchmark's test NLL: 1000)")
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args()
    config = parse_config(IWAE_VAE | {"name": "iwae-memory", "seed": 0, "epochs": 1})
    data = load_data(config.data, mnist_dir(args.data_dir))
    model = build_model(config.model, data.spec).eval()
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    started = time.perf_counter()
    with torch.no_grad():
        gaussian_latent_metrics(model, data.test_x, "test", args.k, config.evaluation.batch_size,
                                torch.Generator().manual_seed(0), data.spec)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"IWAE bound, k={args.k}, {len(data.test_x)} images: {time.perf_counter() - started:.1f} s, "
          f"peak memory {peak:.2f} GB ({loaded:.2f} GB after loading)")


if __name__ == "__main__":
    main()
