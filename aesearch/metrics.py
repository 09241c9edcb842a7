"""The metric catalogue: every metric aesearch logs, with its direction, meaning and when it applies.

One definition of each: the trainer and the evaluation suite log these names, the search ranks on
them, the report labels and ranks by them, `aesearch reproduce` compares them with the tolerance
their scale calls for. Per-epoch metrics are `train/<term>` and `val/<term>`; the evaluation suite
writes `test/<name>` once, on the best weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from aesearch.registry import Registry


@dataclass(frozen=True)
class Direction:
    """Which way a metric is better: the one place that turns a mode ("min" or "max") into an order."""

    better: str  # "lower" or "higher"
    sign: float  # +1 where smaller is better; values times the sign are minimised
    optuna: str  # Optuna's name for it

    @property
    def ascending(self) -> bool:
        """Sorted best first, the values ascend."""
        return self.sign > 0

    @property
    def phrase(self) -> str:
        return f"{self.better} is better"

    @property
    def worst(self) -> float:
        return math.inf * self.sign

    def is_better(self, value: float, than: float) -> bool:
        return value * self.sign < than * self.sign


DIRECTIONS: Registry[Direction] = Registry("direction")
DIRECTIONS.add("min", Direction("lower", 1.0, "minimize"))
DIRECTIONS.add("max", Direction("higher", -1.0, "maximize"))

# How a reproduction compares a metric (see aesearch.results.reproduce.Tolerance).
# TIME: not a property of the model (wall-clock times, counters, schedules): never compared.
CONTINUOUS, SCORE, COUNT, EXACT, TIME = "continuous", "score", "count", "exact", "time"


@dataclass(frozen=True)
class Metric:
    name: str
    mode: str  # a DIRECTIONS name, "min" or "max": which way is better
    description: str
    scale: str = CONTINUOUS  # CONTINUOUS (relative tolerance), SCORE (in [0, 1]), COUNT, EXACT, TIME (not compared)
    applies: str = "always"  # when a trial has it: "gaussian latent", "class labels", "values in [0, 1]", ...
    ranked: bool = False  # the report's table of the best trial per metric shows it
    on_board: bool = False  # every leaderboard shows it (printed, the report's, leaderboard.csv), where trials have it

    @property
    def direction(self) -> Direction:
        return DIRECTIONS[self.mode]

    @property
    def better(self) -> str:
        return self.direction.phrase

    @property
    def bounded(self) -> bool:
        """Its values lie in a fixed range (a SCORE: AUROC, accuracies, ARI), which a log axis would distort."""
        return self.scale == SCORE


# Every metric with a name of its own, in the order the report lists them.
METRICS = [
    # per epoch, on the validation split (what a search can optimise: see EPOCH_OBJECTIVES)
    Metric("val/recon_mse", "min", "reconstruction MSE of clean validation inputs (fair across variants)"),
    Metric("val/loss", "min", "the training objective on the validation split (reconstruction + weighted terms)"),
    Metric("val/recon", "min", "the objective's reconstruction term on the validation split"),
    Metric("train/loss", "min", "the training objective, averaged over the epoch's batches"),
    Metric("train/recon", "min", "the objective's reconstruction term on the training batches"),
    Metric("val/kl", "min", "KL(q(z|x) || p(z)) on the validation split, nats: the rate of a VAE",
           applies="gaussian latent"),
    # per epoch, what the model is for (`evaluation.val_metrics`), on a fixed subset of the validation
    # split of at most `evaluation.val_max_samples` rows (aesearch.training.validation)
    Metric("val/anomaly_auroc", "max", "AUROC of the anomaly score (evaluation.anomaly_score) for the "
           "anomaly classes, on validation", SCORE, "labelled anomalies"),
    Metric("val/anomaly_ap", "max", "average precision of the anomaly score (evaluation.anomaly_score) for "
           "the anomaly classes, on validation", SCORE, "labelled anomalies"),
    Metric("val/cluster_ari", "max", "ARI of the validation codes' clusters (clustering.clusterer, or a "
           "refinement's centres)", SCORE, "class labels"),
    Metric("val/cluster_nmi", "max", "NMI of the validation codes' clusters", SCORE, "class labels"),
    Metric("val/cluster_accuracy", "max", "accuracy of the validation codes' clusters (clusters matched to classes "
           "one-to-one, Hungarian)", SCORE, "class labels"),
    Metric("val/knn_accuracy", "max", "kNN accuracy of the validation codes (neighbours among training codes)",
           SCORE, "class labels"),
    Metric("val/nll", "min", "NLL on validation, nats per sample (IWAE bound with `evaluation.val_iwae_samples`; "
           "the likelihood test/nll uses)", applies="gaussian latent"),
    Metric("val/elbo", "max", "ELBO on validation, nats per sample (the likelihood test/nll uses)",
           applies="gaussian latent"),
    # per epoch, the model's size: the other side of a compression trade-off
    Metric("model/latent_dim", "min", "code units: the size of the compressed representation", EXACT),
    Metric("beta", "min", "the KL weight in effect (its schedule's mean over the epoch's steps)", TIME),
    Metric("epoch", "max", "the epoch counter", TIME),
    Metric("lr", "min", "the learning rate the epoch trained at (optimizer.schedule)", TIME),
    Metric("pack/members", "max", "trials that trained fused with this one in its last epoch", TIME),
    # the evaluation suite, on the test split with the best weights
    Metric("test/recon_mse", "min", "reconstruction MSE per value (clean test inputs, in the model's units: "
           "scaled, for tables)", ranked=True, on_board=True),
    Metric("test/recon_l1", "min", "reconstruction mean absolute error per value (clean test inputs, the model's "
           "units)"),
    Metric("test/recon_bce", "min", "reconstruction binary cross-entropy per value (clean test inputs)",
           applies="values in [0, 1]"),
    Metric("test/psnr", "max", "PSNR, dB", applies="values in [0, 1]", ranked=True, on_board=True),
    Metric("test/recon_mse_original", "min", "reconstruction MSE of the numeric columns in their original units",
           applies="tables with numeric columns", ranked=True),
    Metric("test/nll", "min", "NLL, nats per sample (VAEs, IWAE bound): for data in [0, 1] a Bernoulli decoder "
           "on the test inputs binarised stochastically once from a fixed seed (the protocol of the VAE literature; "
           "trained as data.binarize says), else a unit-variance Gaussian per numeric value and a "
           "categorical per one-hot group on the inputs as given", applies="gaussian latent", ranked=True, on_board=True),
    Metric("test/elbo", "max", "ELBO, nats per sample, under the decoder test/nll uses (Bernoulli on the fixed "
           "stochastic binarisation for data in [0, 1], else Gaussian/categorical)", applies="gaussian latent"),
    Metric("test/kl", "min", "KL(q(z|x) || p(z)), nats", applies="gaussian latent"),
    Metric("test/active_units", "max", "active latent units (VAEs)", COUNT, "gaussian latent", ranked=True),
    Metric("test/probe_accuracy", "max", "linear-probe accuracy of the codes", SCORE, "class labels", ranked=True, on_board=True),
    Metric("test/knn_accuracy", "max", "kNN accuracy of the codes", SCORE, "class labels", ranked=True),
    Metric("test/cluster_ari", "max", "ARI of the test codes' clusters (clustering.clusterer, or a refinement's "
           "centres)", SCORE, "class labels", ranked=True),
    Metric("test/cluster_nmi", "max", "NMI of the test codes' clusters", SCORE, "class labels", ranked=True),
    Metric("test/cluster_accuracy", "max", "accuracy of the test codes' clusters: clusters matched to classes "
           "one-to-one (Hungarian), as DEC reports it", SCORE, "class labels", ranked=True),
    Metric("test/anomaly_auroc", "max", "AUROC of the anomaly score (evaluation.anomaly_score) for the "
           "anomaly classes (data.anomaly)", SCORE, "labelled anomalies", ranked=True, on_board=True),
    Metric("test/anomaly_ap", "max", "average precision of the anomaly score (evaluation.anomaly_score) for "
           "the anomaly classes (data.anomaly)", SCORE, "labelled anomalies", ranked=True),
    Metric("test/mean_activation", "min", "mean |code unit| (sparsity)", applies="deterministic latent"),
    Metric("test/active_fraction", "min", "share of code units above the activation threshold", SCORE,
           "deterministic latent"),
    Metric("test/dead_units", "min", "code units never active on the test set", COUNT, "deterministic latent"),
    # the run
    Metric("model/parameters", "min", "parameters", EXACT, ranked=True, on_board=True),
    Metric("best/epoch", "min", "the epoch whose weights are kept: best by evaluation.select_by, ties broken by "
           "the lower val/loss", COUNT),
    Metric("time/train_seconds", "min", "training time, s", TIME, ranked=True),
]
CATALOGUE: Registry[Metric] = Registry("metric")
for listed in METRICS:
    CATALOGUE.add(listed.name, listed)

# A metric's resolution: two values that agree to it tie. A score in [0, 1] to a thousandth (the step
# of an accuracy on the at most `evaluation.val_max_samples` = 1000 validation rows it is measured on;
# finer differences are noise); a continuous metric to four significant figures (what the report
# shows); counts and exact values exactly.
SCORE_DECIMALS, SIGNIFICANT_FIGURES = 3, 4
# What breaks a tie, between epochs (the one kept) and between trials (the rank): the validation loss,
# lower first. Not the later epoch: a later epoch that diverges with the same saturated AUROC would
# be kept. val/loss is what training optimises and is measured every epoch of every run.
TIEBREAK = "val/loss"


def resolved(name: str, value: float) -> float:
    """`value` of metric `name` rounded to the metric's resolution: values that resolve alike tie."""
    scale = lookup(name).scale if lookup(name) else CONTINUOUS
    if not math.isfinite(value) or scale in (COUNT, EXACT):
        return value
    if scale == SCORE:
        return round(value, SCORE_DECIMALS)
    return float(f"{value:.{SIGNIFICANT_FIGURES}g}")


def at_resolution(name: str, value: float) -> str:
    """`value` written to the metric's resolution: '1.000' for a score, '0.01234' for a continuous metric."""
    scale = lookup(name).scale if lookup(name) else CONTINUOUS
    return f"{value:.{SCORE_DECIMALS}f}" if scale == SCORE else f"{value:.{SIGNIFICANT_FIGURES}g}"


def saturated(name: str, value: float) -> bool:
    """Is this the best value the metric can take (a score of 1 where higher is better, 0 where lower)?"""
    metric = lookup(name)
    return metric is not None and metric.scale == SCORE and resolved(name, value) == (1.0 if metric.direction.sign < 0 else 0.0)


def selection_key(name: str, metrics: dict[str, float]) -> tuple[float, float]:
    """Which epoch's weights a run keeps, as a key (lower is better): `name` at its resolution, then TIEBREAK."""
    return lookup(name).direction.sign * resolved(name, metrics[name]), metrics[TIEBREAK]


# Families of metrics, one per corruption kind measured (`evaluation.denoise_levels`).
FAMILY_METRICS = [
    Metric("val/denoise_psnr_<kind>", "max", "denoising PSNR on validation, dB ({kind} noise at the evaluation level)",
           applies="values in [0, 1]"),
    Metric("val/denoise_mse_<kind>", "min", "denoising MSE per value on validation ({kind} noise at the evaluation "
           "level)", applies="real-valued data"),
    Metric("test/denoise_psnr_<kind>", "max", "denoising PSNR, dB ({kind} noise at the standard level)",
           applies="values in [0, 1]", ranked=True),
    Metric("test/noisy_psnr_<kind>", "max", "PSNR of the corrupted test images themselves ({kind}), dB: the baseline "
           "of denoising", applies="values in [0, 1]"),
    Metric("test/denoise_mse_<kind>", "min", "denoising MSE per value ({kind} noise at the standard level)",
           applies="real-valued data", ranked=True),
    Metric("test/noisy_mse_<kind>", "min", "MSE per value of the corrupted test inputs themselves ({kind}): the "
           "baseline of denoising", applies="real-valued data"),
    Metric("time/<what>", "min", "wall-clock seconds", TIME),
    Metric("train/<term>", "min", "the objective's {kind} term on the training batches"),
    Metric("val/<term>", "min", "the objective's {kind} term on the validation split"),
    Metric("best/<metric>", "min", "{kind} at the best epoch"),
]
FAMILIES: Registry[Metric] = Registry("metric family")  # by the prefix of their names: val/denoise_psnr_
for listed in FAMILY_METRICS:
    FAMILIES.add(listed.name.split("<")[0], listed)

# What a search may rank trials on: known after every epoch, so ASHA can stop on it. The first are
# measured every epoch of every run; USE_METRICS (and the val/denoise_ families) only when
# `evaluation.val_metrics` asks (a search asks for those its objectives name).
ALWAYS_PER_EPOCH = ("val/recon_mse", "val/loss", "val/recon", "train/loss", "train/recon", "val/kl",
                    "model/parameters", "model/latent_dim")
USE_METRICS = ("val/anomaly_auroc", "val/anomaly_ap", "val/cluster_ari", "val/cluster_nmi", "val/cluster_accuracy",
               "val/knn_accuracy", "val/nll", "val/elbo")
USE_FAMILIES = ("val/denoise_psnr_", "val/denoise_mse_")


def is_use_metric(name: str) -> bool:
    """Is `name` a per-epoch metric of what the model is for (measured only when asked)?"""
    return name in USE_METRICS or (name.startswith(USE_FAMILIES) and name not in USE_FAMILIES)


def denoised_kind(name: str) -> str | None:
    """The corruption kind a val/denoise_ metric measures ('salt_pepper' of val/denoise_psnr_salt_pepper)."""
    family = next((family for family in USE_FAMILIES if name.startswith(family)), None)
    return name.removeprefix(family) if family else None


def is_epoch_objective(name: str) -> bool:
    """Can a search rank (and ASHA stop) trials on `name`?"""
    return name in ALWAYS_PER_EPOCH or is_use_metric(name)


def lookup(name: str) -> Metric | None:
    """The catalogue's entry for a logged metric name, or None for a name it does not know."""
    if name in CATALOGUE:
        return CATALOGUE[name]
    for prefix in FAMILIES:
        family = FAMILIES[prefix]
        if name.startswith(prefix):
            kind = name[len(prefix):]
            return Metric(name, family.mode, family.description.replace("{kind}", kind), family.scale,
                          family.applies, family.ranked)
    return None


def test_counterpart(name: str) -> str | None:
    """The metric the evaluation suite logs on the test split for a per-epoch validation metric
    (val/cluster_ari -> test/cluster_ari), or None where it logs none (val/loss)."""
    if not name.startswith("val/"):
        return None
    test = "test/" + name.removeprefix("val/")
    return test if lookup(test) is not None else None


def board_metrics(objectives: list[str]) -> list[str]:
    """The metrics every leaderboard shows beside the objectives (printed, in the report, in
    leaderboard.csv): the test counterpart of each objective, then those the catalogue puts on the
    board, in its order; once each."""
    counterparts = [test_counterpart(name) for name in objectives]
    on_board = [name for name in CATALOGUE if CATALOGUE[name].on_board]
    return list(dict.fromkeys(name for name in [*counterparts, *on_board] if name is not None))


def ranked_metrics(names: list[str]) -> dict[str, Metric]:
    """Of these logged names, those the report ranks trials on, in the catalogue's order."""
    known = {name: lookup(name) for name in names}
    ranked = {name: metric for name, metric in known.items() if metric is not None and metric.ranked}
    order = list(CATALOGUE)
    return dict(sorted(ranked.items(), key=lambda item: (order.index(item[0]) if item[0] in order else len(order),
                                                         item[0])))
