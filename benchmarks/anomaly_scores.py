"""Which anomaly score carries the detection, apart from which model a search happens to pick.

    uv run python benchmarks/anomaly_scores.py [--first-seed 5] [--seeds 5] [--models 16] [--epochs 60]

On the wine example (`aesearch example wine`, the shipped space wine_anomaly), for each split seed S:
`--models` configurations drawn at random from the space (`sample_params`, seed S) are each trained
once (`aesearch.training.trainer.train`, up to `--epochs` epochs, keeping the best epoch by the
trial's own validation AUROC, as a search does), then the trained model is scored on the test split
under every anomaly score that suits it, each fitted as a trial fits its own (`fit_scorer`). The
table is each score's test AUROC averaged over the models, per seed: what a search gets from a
score whichever model its noisy selection lands on. Isolation Forest (100 trees, random_state=S) on
the same normal training rows is shown beside it.

benchmarks/anomaly.py measures the searched detector on split seeds 0-4; this script's default
seeds, 5-9, are others, so that the scores a space offers are chosen without the benchmark's splits.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from aesearch.examples import write_wine  # noqa: E402
from aesearch.parts.data import load_data  # noqa: E402
from aesearch.parts.scorers import ANOMALY_SCORERS, scorer_problem  # noqa: E402
from aesearch.schema import load_yaml  # noqa: E402
from aesearch.search.space import parse_space, sample_params, trial_config  # noqa: E402
from aesearch.training.scoring import fit_scorer, seen  # noqa: E402
from aesearch.training.trainer import train  # noqa: E402

WINE_SPACE = HERE.parent / "aesearch" / "spaces" / "wine_anomaly.yaml"
FOREST = "IsolationForest (raw)"


def each_score(seed: int, args: argparse.Namespace, wine: Path) -> dict[str, list[float]]:
    """Every score's test AUROC on each of the seed's random models, and the forest's."""
    from sklearn.ensemble import IsolationForest
    from sklearn.metrics import roc_auc_score

    document = load_yaml(WINE_SPACE)
    document["data"] |= {"path": str(wine), "split_seed": seed}
    document["seed"] = seed
    space = parse_space(document, source="wine space")
    data = load_data(space.data)
    is_anomaly = data.spec.is_anomaly(data.test_y).numpy()
    forest = IsolationForest(random_state=seed).fit(data.train_x.flatten(1).numpy())
    figures: dict[str, list[float]] = {FOREST: [roc_auc_score(is_anomaly, -forest.score_samples(data.test_x.flatten(1).numpy()))]}
    for params in sample_params(space, args.models, seed=seed):
        config = trial_config(space, params)
        config = config.model_copy(update={"epochs": args.epochs})
        model = train(config, data).model
        test = seen(model, data.test_x, config.evaluation.batch_size)
        for kind in ANOMALY_SCORERS:
            if scorer_problem(kind, model.stochastic) is None:
                scorer = fit_scorer(model, data, config.evaluation.model_copy(update={"anomaly_score": kind}))
                figures.setdefault(kind, []).append(roc_auc_score(is_anomaly, scorer(test).numpy()))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--first-seed", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--models", type=int, default=16, help="random configurations of the space per seed")
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    print(f"wine: {args.models} random configurations of wine_anomaly per split seed {seeds.start}..{seeds.stop - 1}, "
          f"up to {args.epochs} epochs each; test AUROC of each score averaged over the models")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        wine = write_wine(Path(folder))
        results = {seed: each_score(seed, args, wine) for seed in seeds}
    kinds = list(dict.fromkeys(kind for figures in results.values() for kind in figures))
    print("\n| score | " + " | ".join(f"seed {seed}" for seed in seeds) + " | mean |")
    print("|---|" + "---|" * (len(seeds) + 1))
    for kind in kinds:
        means = [statistics.mean(results[seed][kind]) for seed in seeds if kind in results[seed]]
        models = sum(len(results[seed].get(kind, [])) for seed in seeds)
        label = kind if kind == FOREST else f"{kind} ({models} models)"
        print(f"| {label} | " + " | ".join(f"{m:.3f}" for m in means) + f" | {statistics.mean(means):.3f} |")
    print(f"\n(neg_elbo: the VAEs among the models only)\nwhole benchmark: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
