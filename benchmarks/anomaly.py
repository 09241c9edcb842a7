"""Anomaly detection: the searched autoencoder against IsolationForest, LOF and OneClassSVM, on one split.

    uv run python benchmarks/anomaly.py [--datasets wine mnist] [--seeds 5] [--first-seed 0]
                                        [--trials 16] [--epochs 60] [--mnist-trials 12] [--mnist-epochs 15]
                                        [--digit 0] [--mnist-train-samples N] [--data-dir DIR] [--keep DIR] [--quick]
                                        [--objective val/anomaly_auroc|val/anomaly_ap|val/recon_mse]

Two anomaly-detection tasks:

- wine: the shipped tabular example (`aesearch example wine`: cultivars 0 and 1 normal, 10 rows
  of cultivar 2 anomalous, label `Class`, anomaly [1]), searched with the shipped space
  wine_anomaly (dense and attention AEs and VAEs, noise, learning rate);
- mnist-D: one-class MNIST, digit D normal and the other nine anomalous
  (`data: {name: mnist, anomaly: [the other nine]}`), searched with benchmarks/mnist_anomaly.yaml
  (dense and conv AEs and VAEs, narrow codes, noise, learning rate).

For each seed S (S = --first-seed ..): the data is loaded with `aesearch.parts.data.load_data` from
the very DataConfig the search uses (`split_seed: S`; the search's `seed: S`); the three
scikit-learn detectors, with their default settings (`random_state=S` where they take one), are
fitted on `data.train_x` flattened (the normal rows only, as the autoencoders are) and score
`data.test_x`; their test AUROC is taken against `data.spec.is_anomaly(data.test_y)`. Shown beside
them, not a target: the Gaussian of the same rows (the Mahalanobis distance under their empirical
covariance), the detector that the score joint_mahalanobis becomes for a linear autoencoder. The
autoencoder is the rank-1 trial of an aesearch search (`aesearch.api.run_search`) ranked by
--objective: `val/anomaly_auroc` (default: the AUROC of the reconstruction error on the validation
split's labelled normal and anomalous rows, measured every epoch; what `use: anomaly_detection`
searches on), `val/anomaly_ap`, or `val/recon_mse` (the reconstruction error of the normal
validation rows alone, the objective before detection objectives existed). No test label chooses
it. Its figure is that trial's `test/anomaly_auroc` (the AUROC of its
per-sample reconstruction error, logged in its MLflow run). The trial's `dataset_fingerprint` tag
is checked against the fingerprint of the data the baselines saw: the same split, byte for byte.

Also printed, per search, to diagnose the selection (these use the test labels, so they are not
a fair figure for the autoencoder): the best `test/anomaly_auroc` of any completed trial, and the
Spearman rank correlation between the trials' objective and their `test/anomaly_auroc`.

Target (the issue's): the searched autoencoder at least matches the best of the three baselines.
--quick: a smoke run of about a minute: one seed, 2 trials per search (wine: 5 epochs; MNIST: 1 epoch
on 500 training images).
Results and the MLflow store go to a temporary folder (deleted at the end) unless --keep DIR.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from trainer_speed import mnist_dir  # noqa: E402

from aesearch.api import run_search  # noqa: E402
from aesearch.examples import write_wine  # noqa: E402
from aesearch.locations import sqlite_uri  # noqa: E402
from aesearch.parts.data import Data, load_data  # noqa: E402
from aesearch.schema import load_yaml  # noqa: E402
from aesearch.search.phases import Phases  # noqa: E402
from aesearch.search.ray_api import reload_core_config  # noqa: E402
from aesearch.search.space import SearchSpace, parse_space  # noqa: E402

WINE_SPACE = HERE.parent / "aesearch" / "spaces" / "wine_anomaly.yaml"
MNIST_SPACE = HERE / "mnist_anomaly.yaml"
AUROC = "test/anomaly_auroc"
AE = "aesearch AE"
BASELINES = ("IsolationForest", "LocalOutlierFactor", "OneClassSVM")
# Also shown, not a target: the Gaussian of the raw rows (the Mahalanobis distance, scikit-learn's
# EmpiricalCovariance), the classical detector that joint_mahalanobis becomes for a linear autoencoder.
GAUSSIAN = "Gaussian (raw)"
ORACLE = "(best trial)"
SCORED = "chosen model, scored by "  # the rank-1 trial's model under another anomaly score


def ray_environment(folder: Path) -> None:
    """Token authentication for the local Ray instance, with a token of our own (as the tests do)."""
    token = folder / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                   "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    reload_core_config()  # Ray, already imported, cached the mode it found then


@contextmanager
def work_folder(keep: Path | None) -> Iterator[Path]:
    """Where the searches' results and MLflow stores go: `keep` (kept), or a temporary folder deleted at
    the end; the local Ray instance's token is written there."""
    if keep is not None:
        keep = keep.resolve()
        keep.mkdir(parents=True, exist_ok=True)
    with nullcontext(str(keep)) if keep else tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        ray_environment(folder)
        yield folder


def space_for(dataset: str, seed: int, args: argparse.Namespace, folder: Path) -> SearchSpace:
    """The search space of one run: the dataset's space with this seed, split seed and budget."""
    if dataset == "wine":
        document = load_yaml(WINE_SPACE)
        wine = folder / "wine.csv"
        document["data"]["path"] = str(wine if wine.exists() else write_wine(folder))
        trials, epochs = args.trials, args.epochs
    else:
        digit = int(dataset.split("-")[1])
        document = load_yaml(MNIST_SPACE)
        document["data"]["anomaly"] = [d for d in range(10) if d != digit]
        if args.mnist_train_samples:
            document["data"]["max_train_samples"] = args.mnist_train_samples
        trials, epochs = args.mnist_trials, args.mnist_epochs
    document["name"] = f"anomaly-{dataset}-seed{seed}"
    document["objective"] = {"metric": args.objective}
    document["seed"] = seed
    document["data"]["split_seed"] = seed
    document["budget"] |= {"num_samples": trials, "max_epochs": epochs}
    return parse_space(document, source=f"{dataset} space")


def baselines(data: Data, seed: int) -> dict[str, tuple[float, float]]:
    """Each detector's test AUROC and its seconds (fit and score), trained on the normal training rows."""
    from sklearn.covariance import EmpiricalCovariance
    from sklearn.ensemble import IsolationForest
    from sklearn.metrics import roc_auc_score
    from sklearn.neighbors import LocalOutlierFactor
    from sklearn.svm import OneClassSVM

    train = data.train_x.flatten(1).numpy()
    test = data.test_x.flatten(1).numpy()
    is_anomaly = data.spec.is_anomaly(data.test_y).numpy()
    detectors = {"IsolationForest": IsolationForest(random_state=seed),
                 "LocalOutlierFactor": LocalOutlierFactor(novelty=True),
                 "OneClassSVM": OneClassSVM(), GAUSSIAN: EmpiricalCovariance()}
    results = {}
    for name, detector in detectors.items():
        started = time.perf_counter()
        detector.fit(train)
        # scikit-learn: lower is more abnormal; a covariance gives the squared Mahalanobis distance
        score = detector.mahalanobis(test) if name == GAUSSIAN else -detector.score_samples(test)
        results[name] = (float(roc_auc_score(is_anomaly, score)), time.perf_counter() - started)
    return results


def spearman(x: list[float], y: list[float]) -> float:
    if len(x) < 3:
        return math.nan
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def searched(board, tracking_uri: str, data: Data, objective: str) -> dict[str, Any]:
    """The rank-1 trial's test AUROC (from its MLflow run) and the diagnostics of the selection."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    trials = []
    for _, row in board.iterrows():
        if not row["mlflow_run_id"]:
            continue
        run = client.get_run(row["mlflow_run_id"])
        trials.append({"rank": row["rank"], "family": row["family"], "outcome": row["outcome"],
                       "epochs": row["epochs"], objective: row[objective], "params": row["params"],
                       "auroc": run.data.metrics.get(AUROC, math.nan), "run_id": row["mlflow_run_id"],
                       "scorer": run.data.params.get("evaluation.anomaly_score", "reconstruction"),
                       "fingerprint": run.data.tags.get("dataset_fingerprint")})
    ranked = sorted((t for t in trials if not math.isnan(t["rank"])), key=lambda t: t["rank"])
    with_test = [t for t in ranked if not math.isnan(t["auroc"])]
    if not ranked:
        raise SystemExit("the search ranked no trial")
    chosen = ranked[0]
    note = ""
    if math.isnan(chosen["auroc"]):  # stopped early by ASHA: no test suite ran on it
        note = (f" [rank 1 ({chosen['outcome']}) has no {AUROC}; the best-ranked trial with test metrics, "
                f"rank {with_test[0]['rank']:.0f}, is used]")
        chosen = with_test[0]
    if chosen["fingerprint"] != data.fingerprint:
        raise SystemExit(f"the trial trained on data {chosen['fingerprint']}, the baselines on {data.fingerprint}")
    return {"auroc": chosen["auroc"], "chosen": chosen, "note": note,
            "oracle": max(t["auroc"] for t in with_test),
            "spearman": spearman([t[objective] for t in with_test], [t["auroc"] for t in with_test]),
            "completed": len(with_test), "trials": len(trials)}


def each_scorer(run_id: str, tracking_uri: str, data: Data) -> dict[str, float]:
    """The chosen trial's model (its best checkpoint, from MLflow) under every anomaly score that suits it,
    each fitted as the trial's own was (`fit_scorer`): which score carries the gain."""
    from mlflow import MlflowClient
    from sklearn.metrics import roc_auc_score

    from aesearch.parts.scorers import ANOMALY_SCORERS, scorer_problem
    from aesearch.training.checkpoints import BEST_CHECKPOINT, load_trained_model
    from aesearch.training.scoring import fit_scorer, seen

    with tempfile.TemporaryDirectory() as folder:
        trained = load_trained_model(MlflowClient(tracking_uri).download_artifacts(run_id, BEST_CHECKPOINT, folder), data)
    test = seen(trained.model, data.test_x, 1000)
    is_anomaly = data.spec.is_anomaly(data.test_y).numpy()
    figures = {}
    for kind in ANOMALY_SCORERS:
        if scorer_problem(kind, trained.model.stochastic) is None:
            settings = trained.config.evaluation.model_copy(update={"anomaly_score": kind})
            figures[kind] = float(roc_auc_score(is_anomaly, fit_scorer(trained.model, data, settings)(test).numpy()))
    return figures


def run_one(dataset: str, seed: int, args: argparse.Namespace, folder: Path, data_dir: Path | None) -> dict[str, float]:
    space = space_for(dataset, seed, args, folder)
    data = load_data(space.data, data_dir)
    figures = baselines(data, seed)
    tracking_uri = sqlite_uri(folder / "mlflow.db")
    phases = Phases()
    board = run_search(space, storage=folder / "results", tracking_uri=tracking_uri, data_dir=data_dir, phases=phases)
    wall = sum(phases.seconds().values())
    ae = searched(board, tracking_uri, data, args.objective)
    chosen = ae["chosen"]
    normal = int((~data.spec.is_anomaly(data.test_y)).sum())
    print(f"\n== {dataset} seed {seed}: train {len(data.train_x)} normal rows, test {normal} normal + "
          f"{len(data.test_x) - normal} anomalous (data {data.fingerprint})")
    print(f"  {AE + f' (rank 1 by {args.objective})':<40} AUROC {ae['auroc']:.4f}   search {wall:.0f} s, {ae['completed']} of {ae['trials']} trials "
          f"completed{ae['note']}")
    print(f"      {chosen['family']}, {chosen['outcome']}, {chosen['epochs']} epochs, {args.objective} "
          f"{chosen[args.objective]:.4g}: {chosen['params']}")
    scorers = each_scorer(chosen["run_id"], tracking_uri, data)
    print("      the same model under each anomaly score: "
          + ", ".join(f"{kind} {auroc:.4f}" for kind, auroc in scorers.items()))
    for name, (auroc, seconds) in figures.items():
        print(f"  {name:<40} AUROC {auroc:.4f}   ({seconds:.1f} s)")
    print(f"  the search's time: {phases.line()}")
    print(f"  diagnostics (test labels): best completed trial's AUROC {ae['oracle']:.4f}; Spearman({args.objective}, "
          f"AUROC) over completed trials {ae['spearman']:+.2f}")
    return {AE: ae["auroc"], **{name: auroc for name, (auroc, _) in figures.items()}, ORACLE: ae["oracle"],
            "spearman": ae["spearman"], "scorer": chosen["scorer"],
            **{f"{SCORED}{kind}": auroc for kind, auroc in scorers.items()}}


def mean_std(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summary(results: dict[str, list[dict[str, float]]], objective: str) -> None:
    seeds = len(next(iter(results.values())))
    over = f"mean ± std (sample std) over {seeds} seeds" if seeds > 1 else "1 seed"
    print(f"\ntest AUROC, {over}:\n")
    methods = (AE, *BASELINES, GAUSSIAN, ORACLE)
    print("| dataset | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for dataset, runs in results.items():
        print(f"| {dataset} | " + " | ".join(mean_std([r[m] for r in runs]) for m in methods) + " |")
    print(f"\n{AE}: the search's rank-1 trial by {objective}; {GAUSSIAN}: the Mahalanobis distance to the normal "
          f"training rows' mean and covariance (not a target); {ORACLE}: the best test AUROC of any completed "
          "trial of the search (chosen with the test labels: a diagnostic, not a result)\n")
    kinds = list(dict.fromkeys(k.removeprefix(SCORED) for runs in results.values() for r in runs for k in r
                               if k.startswith(SCORED)))
    print("the chosen model under each anomaly score (test AUROC; the score the search chose, per seed, last):\n")
    print("| dataset | " + " | ".join(kinds) + " | chosen |")
    print("|---|" + "---|" * (len(kinds) + 1))
    for dataset, runs in results.items():
        cells = [mean_std([r[SCORED + k] for r in runs if SCORED + k in r]) if any(SCORED + k in r for r in runs)
                 else "-" for k in kinds]
        print(f"| {dataset} | " + " | ".join(cells) + " | " + ", ".join(r["scorer"] for r in runs) + " |")
    print()
    for dataset, runs in results.items():
        means = {m: statistics.mean(r[m] for r in runs) for m in (AE, *BASELINES)}
        best = max(BASELINES, key=means.get)
        wins = sum(r[AE] >= max(r[b] for b in BASELINES) for r in runs)
        verdict = "met" if means[AE] >= means[best] else "not met"
        rho = [r["spearman"] for r in runs if not math.isnan(r["spearman"])]
        print(f"{dataset}: target {verdict}: AE {means[AE]:.3f} against the best baseline, {best}, {means[best]:.3f} "
              f"(AE >= every baseline in {wins} of {len(runs)} seeds); Spearman({objective}, test AUROC) "
              f"per seed: {', '.join(f'{v:+.2f}' for v in rho) or '-'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=["wine", "mnist"], default=["wine", "mnist"])
    parser.add_argument("--seeds", type=int, default=5, help="seeds S..S+N-1: search seed, split_seed, random_state")
    parser.add_argument("--first-seed", type=int, default=0, help="S")
    parser.add_argument("--trials", type=int, default=16, help="wine: trials per search")
    parser.add_argument("--epochs", type=int, default=60, help="wine: epochs per trial at most")
    parser.add_argument("--mnist-trials", type=int, default=12)
    parser.add_argument("--mnist-epochs", type=int, default=15)
    parser.add_argument("--digit", type=int, nargs="+", default=[0], help="MNIST: the normal digit(s), one task each")
    parser.add_argument("--mnist-train-samples", type=int, help="MNIST: at most this many normal training images")
    parser.add_argument("--data-dir", type=Path, help="MNIST in torchvision's layout (default: a copy of "
                        "../shared/datasets/MNIST in benchmarks/.data)")
    parser.add_argument("--keep", type=Path, help="keep the results and the MLflow store in this folder")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 2 short trials per search")
    parser.add_argument("--objective", default="val/anomaly_auroc",
                        choices=["val/anomaly_auroc", "val/anomaly_ap", "val/recon_mse"])
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.trials, args.epochs = 1, 2, 5
        args.mnist_trials, args.mnist_epochs, args.mnist_train_samples = 2, 1, args.mnist_train_samples or 500
    datasets = [d for d in args.datasets if d == "wine"] + [f"mnist-{d}" for d in args.digit if "mnist" in args.datasets]
    data_dir = mnist_dir(args.data_dir) if "mnist" in args.datasets else None
    import sklearn

    mnist_size = f", MNIST training images: {args.mnist_train_samples or 'all of the digit'}" if data_dir else ""
    print(f"anomaly detection on {', '.join(datasets)}, searched on {args.objective}; seeds {args.first_seed}..{args.first_seed + args.seeds - 1}; "
          f"wine: {args.trials} trials x up to {args.epochs} epochs; MNIST: {args.mnist_trials} trials x up to "
          f"{args.mnist_epochs} epochs{mnist_size}; 2 trials at a time; {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, scikit-learn {sklearn.__version__}")
    started = time.perf_counter()
    with work_folder(args.keep) as folder:
        results = {dataset: [run_one(dataset, seed, args, folder, data_dir)
                             for seed in range(args.first_seed, args.first_seed + args.seeds)]
                   for dataset in datasets}
    summary(results, args.objective)
    print(f"\nwhole benchmark: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
