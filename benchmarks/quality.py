"""Model quality beside published tables: aesearch's models under the papers' protocols, one command per table.

    uv run python benchmarks/quality.py vae-nll    [--epochs 50] [--seeds 1] [--iwae-samples 1000] [--batch-size 20]
                                                   [--schedules constant,staged]
                                                   [--search-trials 0] [--search-epochs 20]
    uv run python benchmarks/quality.py clustering [--epochs 50] [--refine-epochs 20] [--idec-start kmeans|gmm|umap_gmm]
                                                   [--seeds 1] [--search-trials 0] [--search-epochs 20]
    uv run python benchmarks/quality.py one-class  [--digits 0 1 ... 9] [--trials 12] [--epochs 15] [--seeds 1]
                                                   [--objective val/anomaly_auroc|val/recon_mse]
    common: [--data-dir DIR] [--keep DIR] [--quick]

- vae-nll: the VAE of the IWAE paper (Burda et al. 2015) with one stochastic layer, two
  deterministic layers of 200 tanh units each side and 50 latent units, Bernoulli decoder, trained
  on stochastically binarised MNIST (`data.binarize: dynamic`, a fresh draw of every batch) with
  Adam at 1e-3, batches of 20 (--batch-size); the test NLL is the IWAE bound with --iwae-samples importance
  samples (the paper: 5,000) on MNIST's 10,000 test images binarised once from a fixed seed.
  Published: VAE, k=1, 86.76 nats after 3,280 epochs (IWAE paper, Table 1). Printed: the curve of
  the validation NLL (1,000 fixed validation images, 20 samples) against epochs, the test NLL per
  seed, and with --search-trials a search of the VAE family (`use: generation`: beta, KL schedule,
  code size, widths, learning rate) ranked on val/nll. --schedules trains the VAE once per learning-rate
  schedule (`optimizer.schedule.kind`), side by side: `staged` is the paper's (stage i: 3^i epochs at
  1e-3 * 10^(-i/7); its stages 0-4 are the first 121 epochs), against the constant rate.
- clustering: DEC's autoencoder (Xie et al. 2016: 784-500-500-2000-10, ReLU, a linear code),
  trained --epochs on MNIST's training images as a plain autoencoder (MSE, Adam 1e-3, batches of
  256); each clusterer (KMeans, a Gaussian mixture, UMAP + a mixture; 20 restarts) groups the codes
  of the 10,000 test images as the autoencoder left them, then the same run goes on with IDEC's
  refinement (Guo et al. 2017's settings) for up to --refine-epochs: accuracy (clusters matched to
  classes one-to-one, Hungarian), NMI and ARI of each, beside the published AE + k-means, DEC, IDEC
  and N2D. With --search-trials, a search with `use: clustering` (val/cluster_ari) whose rank-1
  trial is evaluated the same way.
- one-class: Ruff et al. 2018 (Deep SVDD): each digit in turn is the normal class, trained on
  alone; the test split is MNIST's 10,000 test images, the other nine digits anomalous; the figure
  is the AUROC of the reconstruction error of the rank-1 trial of benchmarks/anomaly.py's search
  (benchmarks/mnist_anomaly.yaml). Published per digit and as the mean over the ten: the deep
  convolutional autoencoder (DCAE) 89.6 and one-class Deep SVDD 94.8 (Ruff et al., Table 1).
  --objective val/anomaly_auroc (default, the `anomaly_detection` use) selects trials with the
  labelled anomalies of the validation split, which Deep SVDD never sees; val/recon_mse selects
  without any anomaly label, as Ruff et al.'s methods do.

Every row names its protocol, its epochs against the paper's, and its seeds (mean ± std). On 2
CPU cores the papers' budgets are out of reach: the printed lines say how far.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from anomaly import mean_std, searched, space_for, work_folder  # noqa: E402
from trainer_speed import mnist_dir  # noqa: E402

from aesearch.api import run_search  # noqa: E402
from aesearch.api import train as train_config  # noqa: E402
from aesearch.config import EvaluationConfig, parse_config  # noqa: E402
from aesearch.locations import sqlite_uri  # noqa: E402
from aesearch.parts.data import load_data  # noqa: E402
from aesearch.search.space import parse_space  # noqa: E402

# The published figures, with their sources.
IWAE_VAE_NLL = 86.76  # Burda, Grosse, Salakhutdinov (2015), Importance Weighted Autoencoders, Table 1: VAE, 1 stochastic layer, k=1
IWAE_EPOCHS = 3280  # ibid., section 5: 3^i epochs at each of 8 learning rates, i = 0..7
# Ruff et al. (2018), Deep One-Class Classification, Table 1, MNIST, AUROC (%) per normal digit
DCAE = [97.6, 98.3, 85.4, 86.7, 86.5, 78.2, 94.6, 92.3, 86.5, 90.4]
DEEP_SVDD = [98.0, 99.7, 91.7, 91.9, 94.9, 88.5, 98.3, 94.6, 93.9, 96.5]

IWAE_VAE = {  # one stochastic layer: 784-200-200-50 (x2 for mean and log-variance), tanh
    "data": {"name": "mnist", "binarize": "dynamic"},
    "model": {"latent": "gaussian", "hidden_dims": [200, 200], "latent_dim": 50, "activation": "tanh"},
    "objective": {"reconstruction": "bce"},
    "optimizer": {"name": "adam", "lr": 1e-3, "batch_size": 20},
    "evaluation": {"val_metrics": ["val/nll"], "val_iwae_samples": 20, "select_by": "val/nll",
                   "kmeans_restarts": 1, "probe_max_samples": 2000, "denoise_levels": {}},
}
DEC_AE = {
    "data": {"name": "mnist"},
    "model": {"hidden_dims": [500, 500, 2000], "latent_dim": 10, "activation": "relu", "code_activation": "none"},
    "objective": {"reconstruction": "mse"},
    "optimizer": {"name": "adam", "lr": 1e-3, "batch_size": 256},
    "evaluation": {"kmeans_restarts": 20, "probe_max_samples": 2000, "iwae_samples": 10, "denoise_levels": {}},
}
CLUSTERING = ("test/cluster_accuracy", "test/cluster_nmi", "test/cluster_ari")
IDEC = {"refinement": "idec", "gamma": 0.1, "update_interval": 140, "tol": 0.001}  # Guo et al. 2017 on MNIST
CLUSTERERS_SHOWN = {"kmeans": "KMeans (20 restarts)", "gmm": "GMM (20 restarts)",
                    "umap_gmm": "UMAP + GMM (N2D's manifold step)"}
PUBLISHED_CLUSTERING = [  # MNIST accuracy, as the issue that asked for this table cites them
    ("AE + k-means, DEC paper (Xie et al. 2016, Table 2), all 70,000 images", 0.818),
    ("DEC, as the IDEC paper reports it (Guo et al. 2017, Table 2)", 0.866),
    ("IDEC (Guo et al. 2017, Table 2)", 0.881),
    ("N2D (McConville et al. 2019), MNIST test", 0.948),
]


def trained(sections: dict, seed: int, args: argparse.Namespace, every: int, epochs: int | None = None,
            watch: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Train one config as `aesearch train` does (`epochs`, default --epochs; `watch` sees every
    epoch's end); its test metrics and per-epoch history."""
    epochs = epochs or args.epochs
    config = parse_config(sections | {"name": "quality", "seed": seed, "epochs": epochs})
    started = time.perf_counter()

    def progress(end) -> None:
        if watch is not None:
            watch(end)
        if end.epoch % every == 0 or end.epoch == epochs:
            shown = {k: v for k, v in end.metrics.items() if k in ("val/nll", "val/recon_mse", "train/loss",
                                                                   "train/cluster_kl")}
            print(f"    seed {seed} epoch {end.epoch:4d}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
                  + f"  ({time.perf_counter() - started:.0f} s)", flush=True)

    result = train_config(config, args.data_dir, reporter=progress)
    return {"metrics": result.metrics, "history": result.history, "seconds": time.perf_counter() - started,
            "best_epoch": result.best_epoch, "model": result.model, "config": config}


def clusterer_figures(codes, labels, clusterer: str, restarts: int) -> dict[str, float]:
    """Accuracy, NMI and ARI of one clusterer (aesearch.parts.clustering) on the test codes."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from aesearch.parts.clustering import ClusteringConfig
    from aesearch.training.evaluate import cluster_accuracy, cluster_codes

    settings = EvaluationConfig(kmeans_restarts=restarts)
    clusters = cluster_codes(codes, 10, settings, ClusteringConfig(clusterer=clusterer))
    return {"test/cluster_accuracy": cluster_accuracy(labels, clusters),
            "test/cluster_nmi": normalized_mutual_info_score(labels, clusters),
            "test/cluster_ari": adjusted_rand_score(labels, clusters)}


def best_trial_metrics(board, tracking_uri: str, names: tuple[str, ...]) -> dict[str, Any]:
    """The test metrics of the best-ranked trial that has them (a trial ASHA stopped has none)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    for _, row in board.sort_values("rank").iterrows():
        if not row["mlflow_run_id"] or math.isnan(row["rank"]):
            continue
        metrics = client.get_run(row["mlflow_run_id"]).data.metrics
        if all(name in metrics for name in names):
            return {"rank": int(row["rank"]), "params": row["params"], "epochs": row["epochs"],
                    **{name: metrics[name] for name in names}}
    raise SystemExit("no ranked trial of the search has test metrics")


def search(use: str, data: dict, space: dict, base: dict, names: tuple[str, ...], seed: int,
           args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """A search with `use:` over the given space; the test metrics of its best-ranked trial."""
    document = {"name": f"quality-{use}-{seed}", "use": use, "data": data, "base": base, "space": space,
                "seed": seed, "max_concurrent": 2,
                "budget": {"num_samples": args.search_trials, "max_epochs": args.search_epochs, "grace_period": 2,
                           "reduction_factor": 3, "max_failures": 1}}
    tracking_uri = sqlite_uri(folder / f"{use}-{seed}.db")
    board = run_search(parse_space(document, source=f"quality {use}"), storage=folder / "results",
                       tracking_uri=tracking_uri, data_dir=args.data_dir)
    chosen = best_trial_metrics(board, tracking_uri, names)
    print(f"    search seed {seed}: rank {chosen['rank']} ({chosen['epochs']} epochs): "
          + ", ".join(f"{name} {chosen[name]:.4g}" for name in names) + f"; {chosen['params']}", flush=True)
    return chosen


def vae_nll(args: argparse.Namespace, folder: Path) -> None:
    sections = IWAE_VAE | {"evaluation": IWAE_VAE["evaluation"] | {"iwae_samples": args.iwae_samples},
                           "optimizer": IWAE_VAE["optimizer"] | {"batch_size": args.batch_size}}
    schedules = args.schedules.split(",")
    runs = {schedule: [trained(sections | {"optimizer": sections["optimizer"] | {"schedule": {"kind": schedule}}},
                               seed, args, every=max(1, args.epochs // 10)) for seed in args.seed_list]
            for schedule in schedules}
    nll = {schedule: [run["metrics"]["test/nll"] for run in done] for schedule, done in runs.items()}
    print(f"\nvalidation NLL (nats, 1,000 fixed validation images, k=20) against epochs, mean over "
          f"{len(args.seed_list)} seed(s), per learning-rate schedule ({', '.join(schedules)}):")
    for epoch in sorted({1, 2, 5, *range(10, args.epochs + 1, 10), args.epochs}):
        if epoch <= args.epochs:
            values = [statistics.mean(run["history"][epoch - 1]["val/nll"] for run in done) for done in runs.values()]
            print(f"  epoch {epoch:5d}: " + "  ".join(f"{value:7.2f}" for value in values))
    print("\n| model | protocol | epochs | test NLL (nats) |\n|---|---|---|---|")
    print(f"| VAE, IWAE paper (Table 1, k=1) | stochastic binarisation, k=5000, staged lr | {IWAE_EPOCHS} | {IWAE_VAE_NLL} |")
    for schedule, done in runs.items():
        print(f"| aesearch, the same VAE | dynamic binarisation, fixed test bits, k={args.iwae_samples}, batches of "
              f"{args.batch_size}, lr schedule {schedule} | {args.epochs} "
              f"(best by val/nll: {', '.join(str(r['best_epoch']) for r in done)}) | {mean_std(nll[schedule], 2)} |")
    if len(schedules) > 1:
        first, *others = schedules
        for other in others:
            print(f"{other} against {first}: {statistics.mean(nll[other]) - statistics.mean(nll[first]):+.2f} nats "
                  f"of test NLL after {args.epochs} epochs")
    nll = nll[schedules[0]]
    if args.search_trials:
        space = {"model.latent_dim": {"type": "categorical", "choices": [20, 50, 100]},
                 "model.hidden_dims": {"type": "categorical", "choices": [[200, 200], [500, 500], [400]]},
                 "model.activation": {"type": "categorical", "choices": ["tanh", "relu"]}}
        base = {k: IWAE_VAE[k] for k in ("model", "objective", "optimizer")} | {"evaluation": sections["evaluation"]}
        chosen = [search("generation", IWAE_VAE["data"], generation_space() | space, base, ("test/nll",), seed, args,
                         folder) for seed in args.seed_list]
        print(f"| aesearch search, use: generation, {args.search_trials} trials | the same | up to "
              f"{args.search_epochs} | {mean_std([c['test/nll'] for c in chosen], 2)} |")
    gap = statistics.mean(nll) - IWAE_VAE_NLL
    print(f"\nthe VAE: {gap:+.2f} nats from the published figure after {args.epochs} of its {IWAE_EPOCHS} epochs")


def generation_space() -> dict:
    """`use: generation`'s own parameters (beta, KL schedule, learning rate), kept when widths are added."""
    from aesearch.search.uses import USES

    return dict(USES["generation"].space)


def clustering(args: argparse.Namespace, folder: Path) -> None:
    """DEC's autoencoder trained --epochs, then refined by IDEC for --refine-epochs more: the clusterers
    group the codes of the autoencoder as it was before the refinement, the IDEC row is the refined model."""
    from aesearch.training.evaluate import encode

    data = load_data(parse_config(DEC_AE).data, args.data_dir)
    labels = data.test_y.cpu().numpy()
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in CLUSTERERS_SHOWN}
    refined = []
    for seed in args.seed_list:
        pretrained: dict[str, Any] = {}

        def keep_codes(end, pretrained=pretrained) -> None:
            if end.epoch == args.epochs:  # the last epoch before the refinement
                pretrained["codes"] = encode(end.model, data.test_x.to(next(end.model.parameters()).device), 1024)
                end.model.train()

        sections = DEC_AE | {"clustering": IDEC | {"refine_epochs": args.refine_epochs, "clusterer": args.idec_start}}
        run = trained(sections, seed, args, every=max(1, args.epochs // 10), epochs=args.epochs + args.refine_epochs,
                      watch=keep_codes)
        refined.append(run["metrics"])
        print(f"    seed {seed}: IDEC ran {len(run['history']) - args.epochs} of {args.refine_epochs} refining epochs "
              f"(it stops once fewer than {IDEC['tol']} of the assignments change)", flush=True)
        for clusterer in CLUSTERERS_SHOWN:
            started = time.perf_counter()
            rows[clusterer].append(clusterer_figures(pretrained["codes"], labels, clusterer, restarts=20))
            print(f"    seed {seed}: {clusterer} on the codes in {time.perf_counter() - started:.0f} s", flush=True)
    print("\n| model | protocol | epochs | accuracy | NMI | ARI |\n|---|---|---|---|---|---|")
    for name, accuracy in PUBLISHED_CLUSTERING:
        print(f"| {name} | published | paper's | {accuracy:.3f} | - | - |")
    for clusterer in CLUSTERERS_SHOWN:
        print(f"| aesearch, DEC's autoencoder + {CLUSTERERS_SHOWN[clusterer]} | test codes (10,000) | {args.epochs} | "
              + " | ".join(mean_std([row[name] for row in rows[clusterer]]) for name in CLUSTERING) + " |")
    print(f"| aesearch, the same autoencoder refined by IDEC from {args.idec_start}'s clusters | test codes (10,000) | "
          f"{args.epochs} + up to {args.refine_epochs} | " + " | ".join(mean_std([m[name] for m in refined])
                                                                       for name in CLUSTERING) + " |")
    if args.search_trials:
        space = {"model.hidden_dims": {"type": "categorical", "choices": [[500, 500, 2000], [512, 256], [256]]}}
        base = {k: DEC_AE[k] for k in ("optimizer", "evaluation")}
        chosen = [search("clustering", DEC_AE["data"], clustering_space(args) | space, base, CLUSTERING, seed, args, folder)
                  for seed in args.seed_list]
        print(f"| aesearch search, use: clustering, {args.search_trials} trials | the same | up to {args.search_epochs} | "
              + " | ".join(mean_std([c[name] for c in chosen]) for name in CLUSTERING) + " |")


def clustering_space(args: argparse.Namespace) -> dict:
    from aesearch.search.uses import USES

    return dict(USES["clustering"].space_for(args.search_epochs))


def one_class(args: argparse.Namespace, folder: Path) -> None:
    anomaly_args = argparse.Namespace(objective=args.objective, mnist_trials=args.trials, mnist_epochs=args.epochs,
                                      mnist_train_samples=args.train_samples)
    rows = []
    for digit in args.digits:
        aurocs = []
        for seed in args.seed_list:
            space = space_for(f"mnist-{digit}", seed, anomaly_args, folder)
            data = load_data(space.data, args.data_dir)
            assert int(data.train_y.unique().numel()) == 1 and int(data.train_y[0]) == digit  # one class in training
            tracking_uri = sqlite_uri(folder / f"one-class-{digit}-{seed}.db")
            board = run_search(space, storage=folder / "results", tracking_uri=tracking_uri, data_dir=args.data_dir)
            ae = searched(board, tracking_uri, data, args.objective)
            aurocs.append(100 * ae["auroc"])
            print(f"    digit {digit} seed {seed}: AUROC {aurocs[-1]:.1f} ({ae['chosen']['family']}, "
                  f"{ae['chosen']['epochs']} epochs){ae['note']}", flush=True)
        rows.append((digit, aurocs))
    print(f"\n| normal digit | DCAE (Ruff et al.) | Deep SVDD (Ruff et al.) | aesearch AE, by {args.objective} |")
    print("|---|---|---|---|")
    for digit, aurocs in rows:
        print(f"| {digit} | {DCAE[digit]} | {DEEP_SVDD[digit]} | {mean_std(aurocs, 1)} |")
    digits = [digit for digit, _ in rows]
    ours = statistics.mean(statistics.mean(aurocs) for _, aurocs in rows)
    print(f"| mean over {len(digits)} digit(s) | {statistics.mean(DCAE[d] for d in digits):.1f} | "
          f"{statistics.mean(DEEP_SVDD[d] for d in digits):.1f} | {ours:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("table", choices=["vae-nll", "clustering", "one-class"])
    parser.add_argument("--epochs", type=int, help="epochs per model (vae-nll, clustering: 50; one-class: 15)")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--iwae-samples", type=int, default=1000, help="vae-nll: k of the test NLL (the paper: 5000)")
    parser.add_argument("--batch-size", type=int, default=20, help="vae-nll: training batch (the paper: 20)")
    parser.add_argument("--schedules", default="constant", help="vae-nll: learning-rate schedules to train it with, "
                        "comma-separated (optimizer.schedule.kind), e.g. constant,staged")
    parser.add_argument("--search-trials", type=int, default=0, help="vae-nll, clustering: also a search of this many")
    parser.add_argument("--search-epochs", type=int, default=20)
    parser.add_argument("--refine-epochs", type=int, default=20, help="clustering: IDEC's epochs after --epochs")
    parser.add_argument("--idec-start", default="kmeans", choices=["kmeans", "gmm", "umap_gmm"],
                        help="clustering: the clusterer whose groups place IDEC's first centres (the paper: kmeans)")
    parser.add_argument("--digits", type=int, nargs="+", default=list(range(10)), help="one-class: the normal digits")
    parser.add_argument("--trials", type=int, default=12, help="one-class: trials per search")
    parser.add_argument("--train-samples", type=int, help="one-class: at most this many normal training images")
    parser.add_argument("--objective", default="val/anomaly_auroc", choices=["val/anomaly_auroc", "val/recon_mse"])
    parser.add_argument("--data-dir", type=Path, help="MNIST in torchvision's layout (default: a copy of "
                        "../shared/datasets/MNIST in benchmarks/.data)")
    parser.add_argument("--keep", type=Path, help="keep the searches' results and MLflow stores in this folder")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 epoch, 2 short trials, 1 digit")
    args = parser.parse_args()
    args.epochs = args.epochs or (15 if args.table == "one-class" else 50)
    if args.quick:
        args.epochs, args.seeds, args.iwae_samples = 1, 1, 10
        args.search_trials, args.search_epochs = (2, 1) if args.search_trials else (0, 1)
        args.digits, args.trials, args.train_samples = args.digits[:1], 2, args.train_samples or 500
    args.seed_list = list(range(args.first_seed, args.first_seed + args.seeds))
    args.data_dir = mnist_dir(args.data_dir)
    print(f"quality: {args.table}, {args.epochs} epochs, seeds {args.seed_list}; {platform.machine()}, "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    started = time.perf_counter()
    with work_folder(args.keep) as folder:
        {"vae-nll": vae_nll, "clustering": clustering, "one-class": one_class}[args.table](args, folder)
    print(f"\nwhole benchmark: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
