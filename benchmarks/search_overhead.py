"""Platform overhead per trial of `aesearch search`, against the same search without actor reuse.

    uv run python benchmarks/search_overhead.py [--trials 32] [--concurrent 2]

Overhead per trial = (search wall time - sum of the trials' own time) / trials, where a trial's
own time is what `run_trial` spends from its start to its last report (training, evaluation,
reporting, checkpoints) less what it spends on MLflow tracking, which counts as overhead. The
wall time is that of `aesearch.search.search()`: data loading, starting a local Ray instance,
the MLflow search run, scheduling, the searcher, result handling, registering the best model,
shutting Ray down. Tracking goes to an embedded SQLite store in a temporary folder.

Both searches run here, one after the other, on the same space: 32 one-epoch trials of small
dense autoencoders on digits, 2 at a time (this machine has 2 cores):

- aesearch:   actors reused across trials (a trial pays no process start and no `import torch`);
- no reuse:   Ray Tune's default, a fresh worker process per trial.

"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from aesearch.search import SearchOptions, search
from aesearch.space import parse_space

SPACE = {
    "name": "overhead",
    "data": {"name": "digits"},
    "base": {"model": {"hidden_dims": [64]}, "evaluation": {"kmeans_restarts": 1}},
    "space": {
        "model.latent_dim": {"type": "categorical", "choices": [8, 16, 32]},
        "optimizer.lr": {"type": "float", "low": 0.0003, "high": 0.003, "log": True},
    },
    "budget": {"max_epochs": 1, "grace_period": 1},
    "resources": {"cpu": 1},
}


def measure(trials: int, concurrent: int, reuse_actors: bool, storage: Path) -> dict[str, float]:
    space = parse_space({**SPACE, "budget": {**SPACE["budget"], "num_samples": trials}, "max_concurrent": concurrent})
    name = f"overhead-{'reuse' if reuse_actors else 'fresh'}"
    options = SearchOptions(name=name, storage=str(storage), reuse_actors=reuse_actors,
                            tracking_uri=f"sqlite:///{storage / 'mlflow.db'}")
    started = time.perf_counter()
    board = search(space, options)
    wall = time.perf_counter() - started
    assert len(board) == trials and (board["outcome"] == "completed").all(), board["outcome"].value_counts()
    tracking = float(board["time/tracking_seconds"].sum())
    trial_time = float(board["time/trial_seconds"].sum()) - tracking
    return {
        "wall": wall,
        "trial_sum": trial_time,
        "tracking": tracking / trials,
        # Trials run `concurrent` at a time: their own time overlaps, so spread it over the slots.
        "overhead": (wall - trial_time) / trials,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--concurrent", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = {
            "aesearch": measure(args.trials, args.concurrent, True, Path(folder)),
            "no reuse": measure(args.trials, args.concurrent, False, Path(folder)),
        }
    print(f"{args.trials} one-epoch trials on digits, {args.concurrent} at a time; "
          f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, r in results.items():
        print(f"  {name:<9} wall {r['wall']:6.1f} s ({r['wall'] / args.trials:.2f} s/trial)   "
              f"trials' own time {r['trial_sum']:6.1f} s   overhead {r['overhead']:.2f} s/trial "
              f"(of which MLflow inside the trial {r['tracking']:.2f} s)")
    fresh, reuse = results["no reuse"], results["aesearch"]
    print(f"no reuse / aesearch: wall time {fresh['wall'] / reuse['wall']:.2f}x, "
          f"overhead {fresh['overhead'] / reuse['overhead']:.2f}x")
    print("(without reuse, each trial's own time also holds its process's first imports of "
          "scikit-learn and friends, which reuse pays once per worker)")


if __name__ == "__main__":
    main()
