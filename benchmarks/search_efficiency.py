"""Search efficiency where early stopping matters: anytime curves of four searches side by side.

    uv run python benchmarks/search_efficiency.py [--data digits|mnist] [--trials 100] [--epochs 30]
        [--seeds 5] [--first-seed 0] [--concurrent 2] [--grace 1] [--reduction 3] [--brackets 1]
        [--methods random,random+asha,tpe,tpe+asha,...] [--multi-objective] [--data-dir DIR]
        [--out benchmarks/.results] [--replay TABLE] [--runs DIR]

The dense subspace of the shipped space mnist_variants (every objective, noise and optimiser of
the dense family; on digits, widths up to 512 as in the quickstart), searched by `aesearch.search.driver.search()` on a real Ray instance, once per
method and seed, with the same trials and epochs per trial:

- random: Optuna's random sampler, every trial trained for all its epochs;
- random+asha: the same sampler, ASHA stopping weak trials (--grace, --reduction; --brackets);
- tpe: Optuna's TPE (define-by-run, conditional), every trial trained fully;
- tpe+asha: aesearch's default, TPE and ASHA (--brackets, 1 by default as in `budget.brackets`);
- tpe+asha-1bracket, tpe+asha-3brackets: the same with 1 or 3 brackets whatever --brackets says (3:
  Hyperband's hedge, a third of the trials first judged at --grace x --reduction epochs or later);
- tpe+asha-pruned: TPE told the trials ASHA stopped as pruned (`stopped_trials: pruned`:
  ranked below every completed trial) rather than as completed with their values at the stop.

Every epoch report of every trial is a model the search has seen; the anytime curve is the best
val/recon_mse seen against the epochs trained so far (all trials together, in the order reported).
The figure is each method's median and its range over seeds; the table gives, per seed, the epochs
each method needed to reach the random search's final best (and within 1% of it), and the median
over seeds of the epochs the random search took to first reach its final best divided by each
method's (0: never reached). The issue's target: >= 3x for tpe+asha.

--replay TABLE: the trials replay the learning curves benchmarks/curves.py recorded (through the
surrogate fitted on them; `simulate: {replay: TABLE}`), so a search costs the platform's time only and
many seeds become affordable. --runs DIR keeps each method and seed's curve, so that seeds accumulate
over several runs of the script (a run finds the curves already there and does not search again); a
DIR holds the runs of one data set, trial count, epochs, concurrency and table (its settings.json);
ASHA's settings other than the defaults name the curve files of the methods that stop early.

--multi-objective: the `compression` use's two objectives, val/recon_mse and model/latent_dim,
both minimised; the methods are random (full budget), tpe+asha-first (multi-objective TPE, ASHA on
val/recon_mse alone), tpe+moasha (multi-objective TPE, MO-ASHA) and tpe+moasha-pruned, and the curve is the hypervolume
of every vector seen so far, against the fixed reference point --reference (worse than any model
worth keeping: the MSE of a model that outputs the mean image is about 0.06 on digits).
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

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from subspaces import dense_subspace  # noqa: E402

from aesearch import settings  # noqa: E402
from aesearch.locations import sqlite_uri  # noqa: E402
from aesearch.pareto import hypervolume  # noqa: E402

settings.apply()  # before Ray is imported, as the CLI does: Ray's workers in this environment, even under `uv run`

from aesearch.search.driver import SearchOptions, search  # noqa: E402
from aesearch.search.space import parse_space  # noqa: E402

METRIC = "val/recon_mse"
SIZE = "model/latent_dim"
# method -> (sampler, early stopping, what TPE learns of a stopped trial, brackets: None for --brackets); the
# multi-objective ones search both objectives
METHODS = {"random": ("random", "none", "values_at_stop", None),
           "random+asha": ("random", "asha", "values_at_stop", None),
           "tpe": ("tpe", "none", "values_at_stop", None), "tpe+asha": ("tpe", "asha", "values_at_stop", None),
           "tpe+asha-1bracket": ("tpe", "asha", "values_at_stop", 1),
           "tpe+asha-3brackets": ("tpe", "asha", "values_at_stop", 3),
           "tpe+asha-pruned": ("tpe", "asha", "pruned", None)}
MO_METHODS = {"random": ("random", "none", "values_at_stop", None),
              "tpe+asha-first": ("tpe", "asha_first_objective", "values_at_stop", None),
              "tpe+moasha": ("tpe", "asha", "values_at_stop", None),
              "tpe+moasha-pruned": ("tpe", "asha", "pruned", None)}
DEFAULT_METHODS = ["random", "random+asha", "tpe", "tpe+asha", "tpe+asha-3brackets"]


def space_document(args: argparse.Namespace, name: str, method: tuple[str, str, str, int | None], seed: int) -> dict:
    document = dense_subspace()
    document.update(name=name, seed=seed, max_concurrent=args.concurrent)
    document["data"] = {"name": args.data} | ({"max_train_samples": 12_000} if args.data == "mnist" else {})
    if args.data == "digits":  # 64 inputs: widths up to 512, as the quickstart has them
        document["space"]["model.hidden_dims"]["choices"] = [[128], [256, 128], [512, 256, 128]]
    document["base"]["evaluation"] = {"iwae_samples": 10, "kmeans_restarts": 1, "probe_max_samples": 2000}
    sampler, early_stopping, stopped_trials, brackets = method
    document["budget"] = {"num_samples": args.trials, "max_epochs": args.epochs, "grace_period": args.grace,
                          "reduction_factor": args.reduction, "brackets": brackets or args.brackets,
                          "max_failures": 0, "keep_checkpoints": 3}
    document.update(sampler=sampler, early_stopping=early_stopping, stopped_trials=stopped_trials)
    if args.multi_objective:
        document["objective"] = [{"metric": METRIC}, {"metric": SIZE}]
    if getattr(args, "replay", None) is not None:  # recorded curves in place of training
        document["simulate"] = {"seconds_per_epoch": 0, "replay": str(args.replay)}
        # what a trial sends and stores every epoch, at most every 5 s: the same search, in less time
        document["budget"] |= {"tracking_batch_s": 5, "checkpoint_every_s": 5}
    return document


def epoch_reports(experiment: Path, names: list[str]) -> list[tuple[float, ...]]:
    """The objectives of every epoch report of every trial, in the order they were made."""
    reports = []
    for log in experiment.glob("*/result.json"):
        for line in log.read_text().splitlines():
            report = json.loads(line) if line.strip() else {}
            values = [report.get(name) for name in names]
            if report.get("epoch", 0) >= 1 and all(isinstance(v, float) and np.isfinite(v) for v in values):
                reports.append(((report["timestamp"], report["time_total_s"]), tuple(values)))
    return [values for _, values in sorted(reports)]


def anytime(reports: list[tuple[float, ...]], args: argparse.Namespace) -> np.ndarray:
    """Best val/recon_mse (or hypervolume) seen after each epoch trained."""
    if not args.multi_objective:
        return np.minimum.accumulate([values[0] for values in reports])
    points, curve = np.empty((0, 2)), []
    for values in reports:
        points = np.vstack([points, values])
        curve.append(hypervolume(points, ["min", "min"], args.reference))
    return np.array(curve)


def first_reaching(curve: np.ndarray, target: float, better: str) -> int | None:
    """Epochs trained when the curve first reached the target (None: never)."""
    reached = curve <= target if better == "min" else curve >= target
    return int(np.argmax(reached)) + 1 if reached.any() else None


def cached_run(args: argparse.Namespace, method: str, seed: int, folder: Path) -> tuple[np.ndarray, float]:
    """`run_method`, unless --runs holds this method and seed's curve already (seeds accumulate across runs)."""
    if args.runs is None:
        return run_method(args, method, seed, folder)
    check_runs_settings(args)
    kept = args.runs / f"{method}{early_stopping_settings(args, method)}-{seed}.json"
    if not kept.is_file():
        curve, wall = run_method(args, method, seed, folder)
        args.runs.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps({"curve": curve.tolist(), "wall": wall}))
    stored = json.loads(kept.read_text())
    return np.array(stored["curve"]), stored["wall"]


RUN_SETTINGS = ("data", "trials", "epochs", "concurrent", "multi_objective", "replay")


def early_stopping_settings(args: argparse.Namespace, method: str) -> str:
    """What a method's kept curve is named by besides the method and the seed: ASHA's settings where they
    differ from the defaults (a method without early stopping does not depend on them)."""
    _, early_stopping, _, brackets = (MO_METHODS if args.multi_objective else METHODS)[method]
    if early_stopping == "none":
        return ""
    differ = [f"{flag}{value:g}" for flag, value, default in (
        ("-grace", args.grace, 1), ("-eta", args.reduction, 3.0), ("-brackets", brackets or args.brackets, 1))
        if value != default and not (flag == "-brackets" and brackets)]
    return "".join(differ)


def check_runs_settings(args: argparse.Namespace) -> None:
    """--runs DIR keeps the curves of one set of settings (DIR/settings.json): others are refused, not mixed."""
    settings_file = args.runs / "settings.json"
    wanted = {name: getattr(args, name) for name in RUN_SETTINGS} | {"replay": args.replay and args.replay.name}
    if not settings_file.is_file():
        args.runs.mkdir(parents=True, exist_ok=True)
        settings_file.write_text(json.dumps(wanted, indent=1) + "\n")
    kept = json.loads(settings_file.read_text())
    if kept != wanted:
        differ = ", ".join(f"{name} {kept.get(name)!r} there, {wanted[name]!r} here"
                           for name in RUN_SETTINGS if kept.get(name) != wanted[name])
        sys.exit(f"search_efficiency.py: error: --runs {args.runs} holds runs of other settings ({differ})")


def run_method(args: argparse.Namespace, method: str, seed: int, folder: Path) -> tuple[np.ndarray, float]:
    methods = MO_METHODS if args.multi_objective else METHODS
    name = f"efficiency-{method.replace('+', '-')}-{seed}"
    options = SearchOptions(name=name, storage=str(folder / name), data_dir=args.data_dir,
                            tracking_uri=sqlite_uri(folder / name / "mlflow.db"))
    (folder / name).mkdir(parents=True)
    started = time.perf_counter()
    search(parse_space(space_document(args, name, methods[method], seed)), options)
    wall = time.perf_counter() - started
    names = [METRIC, SIZE] if args.multi_objective else [METRIC]
    return anytime(epoch_reports(folder / name / name, names), args), wall


def draw(curves: dict[str, list[np.ndarray]], args: argparse.Namespace, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.2))
    axes = figure.subplots()
    for method, runs in curves.items():
        length = min(len(c) for c in runs)
        stacked = np.stack([c[:length] for c in runs])
        epochs = np.arange(1, length + 1)
        line, = axes.plot(epochs, np.median(stacked, 0), label=f"{method} (median of {len(runs)} seeds)")
        axes.fill_between(epochs, stacked.min(0), stacked.max(0), color=line.get_color(), alpha=0.15)
    label = f"hypervolume of ({METRIC}, {SIZE}), higher is better" if args.multi_objective else \
        f"best {METRIC} so far, lower is better"
    axes.set(xscale="log", xlabel="epochs trained (all trials together)", ylabel=label,
             title=f"{args.data}: {args.trials} trials x up to {args.epochs} epochs")
    if not args.multi_objective:
        axes.set_yscale("log")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--grace", type=int, default=1)
    parser.add_argument("--reduction", type=float, default=3.0)
    parser.add_argument("--brackets", type=int, default=1, help="ASHA's brackets (budget.brackets)")
    parser.add_argument("--methods", help="comma-separated (default: all of the mode)")
    parser.add_argument("--multi-objective", action="store_true")
    parser.add_argument("--reference", type=float, nargs=2, default=[0.06, 129.0], metavar=("MSE", "LATENT_DIM"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/.results"))
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--replay", type=Path, help="a table of learning curves (benchmarks/curves.py): trials replay "
                        "the curves of recorded configurations instead of training (digits only)")
    parser.add_argument("--runs", type=Path, help="keep each method and seed's curve here, and take it from here "
                        "when it is there: seeds accumulate over several runs")
    args = parser.parse_args()
    if args.replay is not None and args.data != "digits":
        parser.error(f"--replay {args.replay}: the recorded curves are of digits; --data {args.data}")
    if args.data == "mnist" and args.data_dir is None:
        from trainer_speed import mnist_dir

        args.data_dir = mnist_dir(None)
    methods = args.methods.split(",") if args.methods else list(MO_METHODS) if args.multi_objective else DEFAULT_METHODS
    better = "max" if args.multi_objective else "min"
    kind = "multi-objective" if args.multi_objective else "single-objective"
    print(f"{kind}: {args.trials} trials x up to {args.epochs} epochs, dense subspace of mnist_variants.yaml on "
          f"{args.data}, {args.concurrent} at a time, ASHA grace {args.grace} reduction {args.reduction:g} "
          f"brackets {args.brackets}; "
          f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    curves: dict[str, list[np.ndarray]] = {method: [] for method in methods}
    ratios: dict[str, list[float]] = {method: [] for method in methods}
    finals: dict[str, list[float]] = {method: [] for method in methods}  # each seed's final / random's
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        with tempfile.TemporaryDirectory() as folder:
            runs = {method: cached_run(args, method, seed, Path(folder)) for method in methods}
        final = runs["random"][0][-1]
        random_reached = first_reaching(runs["random"][0], final, better)
        print(f"seed {seed}: random's final {'hypervolume' if args.multi_objective else 'best'} {final:.5g}, "
              f"first reached at epoch {random_reached} of {len(runs['random'][0])}")
        for method, (curve, wall) in runs.items():
            curves[method].append(curve)
            exact = first_reaching(curve, final, better)
            near = first_reaching(curve, final * (0.99 if better == "max" else 1.01), better)
            ratio = random_reached / exact if exact else 0.0
            ratios[method].append(ratio)
            finals[method].append(curve[-1] / final)
            print(f"  {method:<18} {len(curve):5d} epochs, {wall:5.0f} s, final {curve[-1]:.5g}; reached random's "
                  f"final at {exact or '-':>5} epochs (within 1%: {near or '-':>5}); random's epochs to it / these "
                  f"{ratio:.2f}x", flush=True)
    target = "hypervolume" if args.multi_objective else "best"
    print(f"\nmedian over {args.seeds} seeds of the epochs random took to its final {target} / each method's "
          "epochs to it (0: never reached):")
    for method, values in ratios.items():
        print(f"  {method:<18} {statistics.median(values):.2f}x  (seeds: {', '.join(f'{v:.2f}' for v in values)})")
    print(f"per method: seeds in which it never reached random's final {target}; the median of its final "
          f"{target} / random's; the median of the epochs it trained:")
    for method, values in ratios.items():
        print(f"  {method:<18} never in {sum(v == 0 for v in values)} of {len(values)}; final "
              f"{statistics.median(finals[method]):.2f}x random's; "
              f"{statistics.median(len(curve) for curve in curves[method]):.0f} epochs")
    print("share of the seeds in which each method reached it at least 3x sooner (the issue's goal: >= 80% for "
          "tpe+asha):")
    for method, values in ratios.items():
        print(f"  {method:<18} {sum(v >= 3 for v in values) / len(values):.0%} of {len(values)}")
    args.out.mkdir(parents=True, exist_ok=True)
    figure = args.out / f"search_efficiency_{args.data}_{'mo' if args.multi_objective else 'so'}.png"
    draw(curves, args, figure)
    np.savez(figure.with_suffix(".npz"), **{f"{method}/{i}": curve for method, runs in curves.items()
                                            for i, curve in enumerate(runs)})
    print(f"figure: {figure} (its curves: {figure.with_suffix('.npz')})")


if __name__ == "__main__":
    main()
