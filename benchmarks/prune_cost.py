"""What the checkpoint pruner costs the driver at each save of a large search's state.

    uv run python benchmarks/prune_cost.py [--trials 10000] [--epochs 1]

A stored search state of `--trials` real Tune trial records (each with `--epochs` results of ~24
numbers and a checkpoint per result, compacted as the driver keeps a finished trial's) is written to a temporary
folder, with its trials' checkpoint folders; `prune_checkpoints` then runs as `CheckpointPruner` runs
it in the driver: a first time (every record decoded, every trial's folder listed), and again after
one record in a hundred changed (the trials still running), with the records it has seen, beside
what the same pruning cost before it kept them (every record decoded at each pruning); and once more
as the search's end runs it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from aesearch.search.ray_api import compact_finished_trial
from aesearch.search.storage import prune_checkpoints, restorable_checkpoint, stored_trials


def stored_state(folder: Path, trials: int, epochs: int) -> list:
    """Writes the state and the checkpoint folders; returns the Tune trials, for changing some later."""
    from ray import tune
    from ray.train._internal.checkpoint_manager import _TrainingResult
    from ray.tune.experiment import Trial

    records = []
    for number in range(trials):
        trial = Trial("run_trial", stub=True, config={"optimizer.lr": 0.001 * (number + 1), "model.latent_dim": 16})
        trial.relative_logdir = f"run_trial_{number:05d}"
        for epoch in range(epochs):
            result = {"epoch": float(epoch + 1), "training_iteration": epoch + 1,  # ~24 numbers, as a trial's
                      **{f"{split}/metric_{i}": 0.1 / (epoch + 1 + i) for split in ("train", "val", "test")
                         for i in range(8)}}
            trial.update_last_result(result)
            checkpoint = folder / trial.relative_logdir / f"checkpoint_{epoch:06d}"
            checkpoint.mkdir(parents=True)
            trial.run_metadata.checkpoint_manager.register_checkpoint(
                _TrainingResult(tune.Checkpoint.from_directory(str(checkpoint)), result))
        compact_finished_trial(trial, {"val/metric_0"})  # as the driver keeps a finished trial's record
        records.append(trial)
    return records


def save(folder: Path, trials: list, stamp: int) -> int:
    text = json.dumps({"trial_data": [trial.get_json_state() for trial in trials]})
    (folder / f"experiment_state-2026-12-07_00-00-{stamp:02d}.json").write_text(text)
    return len(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        trials = stored_state(folder, args.trials, args.epochs)
        size = save(folder, trials, 1)
        seen: set[int] = set()
        started = time.perf_counter()
        prune_checkpoints(str(folder), seen=seen)
        first = time.perf_counter() - started
        for trial in trials[:: 100]:  # the trials still running reported since
            trial.update_last_result({**trial.last_result, "epoch": trial.last_result["epoch"] + 1})
            trial.invalidate_json_state()
        save(folder, trials, 2)
        started = time.perf_counter()
        prune_checkpoints(str(folder), seen=seen)
        again = time.perf_counter() - started
        started = time.perf_counter()  # what a later pruning read before: every record decoded, no folder listed
        _, _, records = stored_trials(str(folder))
        for record in records:
            restorable_checkpoint(record)
        decoded = time.perf_counter() - started
        started = time.perf_counter()  # the search's end: one listing of the whole folder, every record decoded
        prune_checkpoints(str(folder), search_ended=True, seen=seen)
        ended = time.perf_counter() - started
    print(f"{args.trials:,} trial records, {args.epochs} result(s) each: the stored state {size / 1e6:.0f} MB")
    print(f"  first pruning (every record decoded, every folder listed)     {first:.2f} s")
    print(f"  a later one, 1% of the records changed, with those it saw    {again:.2f} s")
    print(f"  the same, every record decoded (the pruner before 2026-12-07) {decoded:.2f} s")
    print(f"  the search's end (one listing of the whole folder)            {ended:.2f} s")


if __name__ == "__main__":
    main()
