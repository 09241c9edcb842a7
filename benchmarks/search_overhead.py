"""Platform overhead per trial of `aesearch search`, against the same search without actor reuse.

    uv run python benchmarks/search_overhead.py [--trials 32] [--concurrent 2]

Overhead per trial = (search wall time - sum of the trials' own time) / trials, where a trial's
own time is what `run_trial` spends from its start to its last report (training, evaluation,
reporting, checkpoints) less what it spends on MLflow tracking, which counts as overhead. The
wall time is that of `aesearch.search.driver.search()`: data loading, starting a local Ray instance,
the MLflow search run, scheduling, the searcher, result handling, registering the best model,
shutting Ray down. Tracking goes to an embedded SQLite store in a temporary folder.

Both searches run here, one after the other, on the same space: 32 one-epoch trials of small
dense autoencoders on digits, 2 at a time (this machine has 2 cores):

- aesearch:   actors reused across trials (a trial pays no process start and no `import torch`);
- no reuse:   Ray Tune's default, a fresh worker process per trial.

    uv run python benchmarks/search_overhead.py --view command [--rounds 3]

The whole command as a user meets it: `aesearch search quickstart --num-samples 8
--max-epochs 1` (a new process: imports, data, Ray, MLflow, 8 one-epoch trials 2 at a time, the best
model registered, exit), its wall time and the phases it prints (`aesearch: time: ...`), side by
side, round by round, with the same 8 trials run by plain Optuna in one new process: the same
configs (the space's first `start_with` points, enqueued), the same trainer and evaluation, one
at a time, no Ray, no MLflow. Their ratio is the platform's tax on a small search.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from aesearch import settings

settings.apply()  # before Ray is imported, as the CLI does: Ray's workers in this environment, even under `uv run`

from aesearch.locations import sqlite_uri  # noqa: E402
from aesearch.search.driver import SearchOptions, search  # noqa: E402
from aesearch.search.space import parse_space  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "aesearch" / "spaces" / "quickstart.yaml"
COMMAND_TRIALS = 8

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
                            tracking_uri=sqlite_uri(storage / "mlflow.db"))
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


def timed_command(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:5])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall, done.stdout + done.stderr


def cli_search(folder: Path, name: str) -> dict[str, float]:
    """The 8-trial quickstart search from the command line: wall time and its printed phases."""
    wall, output = timed_command([
        str(Path(sys.executable).with_name("aesearch")), "search", str(QUICKSTART), "--num-samples",
        str(COMMAND_TRIALS), "--max-epochs", "1", "--name", name, "--storage", str(folder / "results"),
        "--tracking-uri", sqlite_uri(folder / "mlflow.db")], os.environ.copy())
    assert f"{COMMAND_TRIALS} trials: {COMMAND_TRIALS} completed" in output, output[-3000:]
    timing = re.search(r"aesearch: time: (.*) = ", output).group(1)
    phases = {name.strip(): float(seconds) for name, seconds in re.findall(r"([^|]+?) ([\d.]+) s(?: \||$)", timing)}
    # what is left: the interpreter's start before Python could read the clock, and the exit
    return {"wall": wall, **phases, "exit": max(0.0, wall - sum(phases.values()))}


def plain_optuna() -> None:
    """The same trials, the same trainer: Optuna's TPE in this one process, no Ray, no MLflow."""
    import optuna

    from aesearch.parts.data import load_data
    from aesearch.search.space import DefineByRun, decode_params, load_space, start_points, trial_config
    from aesearch.training.trainer import train

    space = load_space(QUICKSTART, {"budget.num_samples": COMMAND_TRIALS, "budget.max_epochs": 1})
    data = load_data(space.data)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize" if space.primary.mode == "min" else "maximize",
                                sampler=optuna.samplers.TPESampler(seed=space.seed))
    for point in start_points(space)[:COMMAND_TRIALS]:
        study.enqueue_trial(point)
    suggest = DefineByRun(space)

    def objective(trial: optuna.Trial) -> float:
        suggest(trial)
        result = train(trial_config(space, decode_params(space, trial.params)), data)
        return result.history[-1][space.primary.metric]

    study.optimize(objective, n_trials=COMMAND_TRIALS)
    print(f"{len(study.trials)} trials, best {space.primary.metric} {study.best_value:.4g}")


def whole_command(rounds: int) -> None:
    cli, plain = [], []
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(rounds):  # interleaved, so that drift on the machine hits both alike
            cli.append(cli_search(Path(folder) / f"round{round_}", f"overhead-cli-{round_}"))
            plain.append(timed_command([sys.executable, __file__, "--view", "plain-optuna"], os.environ.copy())[0])
    print(f"{COMMAND_TRIALS}-trial quickstart search, 1 epoch each, {rounds} rounds (medians); {platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}")
    phases = [name for name in cli[0] if name != "wall"]
    walls = [r["wall"] for r in cli]
    print(f"  aesearch CLI  wall {statistics.median(walls):5.1f} s  (all: {', '.join(f'{w:.1f}' for w in walls)})")
    for name in phases:
        print(f"      {name:<42} {statistics.median(r[name] for r in cli):5.1f} s")
    print(f"  plain Optuna  wall {statistics.median(plain):5.1f} s  (all: {', '.join(f'{w:.1f}' for w in plain)}; "
          "one process: imports, data, the same 8 trials one at a time)")
    tax = statistics.median(wall / alone for wall, alone in zip(walls, plain))
    print(f"platform tax: aesearch CLI / plain Optuna = {tax:.2f}x (median of the rounds' ratios)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--view", choices=["per-trial", "command", "plain-optuna"], default="per-trial")
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.view == "command":
        return whole_command(args.rounds)
    if args.view == "plain-optuna":
        return plain_optuna()
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
