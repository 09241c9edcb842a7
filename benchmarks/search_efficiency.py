"""Search efficiency: TPE + ASHA against random search without early stopping, side by side.

    uv run python benchmarks/search_efficiency.py [--trials 24] [--epochs 10] [--train-samples 12000]
                                                  [--concurrent 2] [--seeds 1] [--first-seed 0] [--data-dir DIR]
                                                  [--tpe-startup-trials N] [--tpe-group] [--aesearch-trials N]

Two searches of the dense subspace of search_spaces/mnist_variants.yaml on MNIST (the first
--train-samples training images; validation and test as usual), same trials, same epochs per
trial, same seed, run one after the other by `aesearch.search.driver.search()`:

- baseline: Optuna's random sampler, every trial trained for all its epochs (no early stopping);
- aesearch: TPE (define-by-run, conditional parameters) and ASHA (grace 1 epoch, reduction 3).

Target: the best val/recon_mse the full-budget random search finds, within 1% (x 1.01). For
each search it prints the epochs trained (all trials together, in the order they were reported)
and the wall time until some trial first reported a val/recon_mse at or below the target, and
the epochs and wall time of the whole search, then the ratios; with --seeds N, N pairs (seeds
S..S+N-1, S = --first-seed) and the medians of the ratios. Optuna's TPE starts with random
trials (its first 10), which with the same seed are the baseline's first 10: a baseline that
finds its best among them is met by aesearch at about the same epoch. The issue's target: >= 3x fewer epochs.

--tpe-startup-trials / --tpe-group: aesearch's TPE with other settings than the shipped ones
(Optuna's defaults), to compare samplers on the same seeds. --aesearch-trials: more trials for
aesearch than the baseline's (ASHA stops most early: about the baseline's epochs for 2.5x its trials).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from subspaces import dense_subspace  # noqa: E402
from trainer_speed import mnist_dir  # noqa: E402

from aesearch.search.driver import SearchOptions, search  # noqa: E402
from aesearch.search.space import parse_space  # noqa: E402

METRIC = "val/recon_mse"


def space_document(name: str, trials: int, epochs: int, train_samples: int, concurrent: int, baseline: bool) -> dict:
    document = dense_subspace()
    document["name"] = name
    document["data"] = {"name": "mnist", "max_train_samples": train_samples}
    document["base"]["evaluation"] = {"iwae_samples": 10, "kmeans_restarts": 1, "probe_max_samples": 2000}
    document["budget"] = {"num_samples": trials, "max_epochs": epochs, "grace_period": 1, "reduction_factor": 3,
                          "max_failures": 0}
    document["max_concurrent"] = concurrent
    document["sampler"], document["early_stopping"] = ("random", "none") if baseline else ("tpe", "asha")
    return document


def epoch_reports(experiment: Path) -> list[dict]:
    """Every epoch report of every trial, in the order they were made."""
    reports = []
    for log in experiment.glob("*/result.json"):
        for line in log.read_text().splitlines():
            if line.strip():
                report = json.loads(line)
                if report.get("epoch", 0) >= 1 and isinstance(report.get(METRIC), float):
                    reports.append(report)
    return sorted(reports, key=lambda r: (r["timestamp"], r["time_total_s"]))


def run_search(document: dict, storage: Path, data_dir: Path) -> tuple[list[dict], float, float]:
    options = SearchOptions(name=document["name"], storage=str(storage), data_dir=data_dir,
                            tracking_uri=f"sqlite:///{storage / 'mlflow.db'}")
    started_at, started = time.time(), time.perf_counter()
    search(parse_space(document), options)
    return epoch_reports(storage / document["name"]), started_at, time.perf_counter() - started


def first_within(reports: list[dict], target: float, started_at: float) -> tuple[int, float] | None:
    """(epochs trained, seconds since the search began) when a report first met the target."""
    for count, report in enumerate(reports, start=1):
        if report[METRIC] <= target:
            return count, report["timestamp"] - started_at
    return None


def compare(args: argparse.Namespace, seed: int, data_dir: Path) -> dict[str, float]:
    """One pair of searches with this seed; prints its figures, returns the ratios."""
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, baseline in (("baseline", True), ("aesearch", False)):
            trials = args.trials if baseline else args.aesearch_trials or args.trials
            document = space_document(f"efficiency-{name}-{seed}", trials, args.epochs, args.train_samples,
                                      args.concurrent, baseline)
            document["seed"] = seed
            results[name] = run_search(document, Path(folder) / name, data_dir)
    target = 1.01 * min(r[METRIC] for r in results["baseline"][0])
    print(f"seed {seed}: target {METRIC} <= {target:.5f} (the random search's best x 1.01)")
    reached = {}
    for name, (reports, started_at, wall) in results.items():
        reached[name] = first_within(reports, target, started_at)
        when = f"{reached[name][0]:4d} epochs, {reached[name][1]:5.0f} s" if reached[name] else "     not reached"
        print(f"  {name:<9} to the target: {when}   whole search: {len(reports):4d} epochs, {wall:5.0f} s, "
              f"best {METRIC} {min(r[METRIC] for r in reports):.5f}")
    ratios = {
        "whole_epochs": len(results["baseline"][0]) / len(results["aesearch"][0]),
        "whole_wall": results["baseline"][2] / results["aesearch"][2],
    }
    if reached["aesearch"]:
        (base_epochs, base_s), (ours_epochs, ours_s) = reached["baseline"], reached["aesearch"]
        ratios |= {"target_epochs": base_epochs / ours_epochs, "target_wall": base_s / max(ours_s, 1)}
    print("  baseline / aesearch: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    return ratios


def use_tpe_settings(startup_trials: int | None, group: bool) -> None:
    """Make the search's `tpe` sampler Optuna's TPE with these settings (the searcher runs in
    this driver process, so replacing the factory here is enough)."""
    import optuna

    import aesearch.search.driver

    options = {"group": group} | ({"n_startup_trials": startup_trials} if startup_trials is not None else {})
    aesearch.search.driver.SAMPLERS["tpe"] = lambda seed: optuna.samplers.TPESampler(seed=seed, **options)
    print(f"aesearch's sampler: TPESampler({', '.join(f'{k}={v}' for k, v in options.items())})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-samples", type=int, default=12_000)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=1, help="pairs of searches, seeds S..S+N-1")
    parser.add_argument("--first-seed", type=int, default=0, help="S")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--tpe-startup-trials", type=int, help="TPE's random start-up trials (Optuna's default: 10)")
    parser.add_argument("--tpe-group", action="store_true", help="TPE's group decomposition of a conditional space")
    parser.add_argument("--aesearch-trials", type=int, help="aesearch's trials (default: --trials)")
    args = parser.parse_args()
    if args.tpe_startup_trials is not None or args.tpe_group:
        use_tpe_settings(args.tpe_startup_trials, args.tpe_group)
    data_dir = mnist_dir(args.data_dir)
    aesearch_trials = f" (aesearch: {args.aesearch_trials})" if args.aesearch_trials else ""
    print(f"{args.trials} trials{aesearch_trials} x up to {args.epochs} epochs, dense subspace of mnist_variants.yaml, MNIST "
          f"({args.train_samples} training images), {args.concurrent} at a time; {platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    all_ratios = [compare(args, seed, data_dir) for seed in range(args.first_seed, args.first_seed + args.seeds)]
    if args.seeds > 1:
        for key in ("target_epochs", "target_wall", "whole_epochs", "whole_wall"):
            values = [r[key] for r in all_ratios if key in r]
            if values:
                print(f"median over {len(values)} seeds, baseline / aesearch {key}: {statistics.median(values):.2f}x "
                      f"(all: {', '.join(f'{v:.2f}' for v in values)})")
            else:
                print(f"{key}: aesearch never reached the target")


if __name__ == "__main__":
    main()
