"""Objectives for a use: metrics of what the model is for, measured on validation every epoch, the
epoch kept by them, `use:` shortcuts, and the objectives a search's data or variants cannot measure."""

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, average_precision_score, roc_auc_score

from aesearch.config import metric_problem
from aesearch.errors import ConfigError
from aesearch.parts.data import load_data
from aesearch.search.space import check_validation_rows, parse_space, selected_by, trial_config
from aesearch.search.uses import USES
from aesearch.training.evaluate import encode, reconstruct
from aesearch.training.trainer import train
from aesearch.training.validation import fixed_subset
from tests.conftest import make_config
from tests.user_data import TABLE

SMALL = {"model": {"hidden_dims": [32], "latent_dim": 4}, "optimizer": {"batch_size": 64}}


def space_document(**fields):
    return {"name": "s", "space": {"model.latent_dim": {"type": "categorical", "choices": [4, 8]}}, **fields}


def test_the_fixed_subset_is_the_same_rows_every_time_and_at_most_the_cap():
    first, again = fixed_subset(1000, 100), fixed_subset(1000, 100)
    assert torch.equal(first, again) and len(first) == 100 and len(set(first.tolist())) == 100
    assert torch.equal(first, first.sort().values) and first.max() < 1000
    assert not torch.equal(first, torch.arange(100))  # drawn across the split, not its first rows
    assert torch.equal(fixed_subset(50, 100), torch.arange(50))


def test_anomaly_metrics_each_epoch_are_those_of_the_validation_rows_and_select_the_kept_epoch():
    config = make_config(epochs=4, data={"name": "digits", "anomaly": [0]}, **SMALL,
                         evaluation={"val_metrics": ["val/anomaly_auroc", "val/anomaly_ap"],
                                     "select_by": "val/anomaly_auroc", "val_max_samples": 120})
    data = load_data(config.data)
    models = []
    result = train(config, data, reporter=lambda end: models.append(
        {k: v.clone() for k, v in end.model.state_dict().items()}), run_evaluation=False)
    aurocs = [epoch["val/anomaly_auroc"] for epoch in result.history]
    assert result.best_epoch == 1 + int(np.argmax(aurocs))  # higher is better: the best AUROC's weights kept
    assert result.metrics["best/val/anomaly_auroc"] == max(aurocs)

    rows = fixed_subset(len(data.val_x), 120)
    x, labels = data.val_x[rows], data.val_y[rows]
    model = result.model
    model.load_state_dict(models[-1])  # the last epoch's weights, measured independently
    scores = (reconstruct(model, x, 1000) - x).pow(2).flatten(1).mean(1).numpy()
    truth = (labels == 0).numpy()
    assert 0 < truth.sum() < len(truth)
    assert result.history[-1]["val/anomaly_auroc"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-9)
    assert result.history[-1]["val/anomaly_ap"] == pytest.approx(average_precision_score(truth, scores), abs=1e-9)


def test_clustering_likelihood_and_denoising_are_measured_each_epoch_only_when_asked(digits):
    asked = ["val/cluster_ari", "val/knn_accuracy", "val/nll", "val/elbo", "val/denoise_psnr_gaussian"]
    config = make_config(epochs=2, **{**SMALL, "model": {"latent": "gaussian", "hidden_dims": [32], "latent_dim": 4}},
                         evaluation={"val_metrics": asked, "select_by": "val/cluster_ari", "kmeans_restarts": 1})
    denoising = make_config(epochs=3, **SMALL, evaluation={"val_metrics": ["val/denoise_psnr_salt_pepper"],
                                                           "select_by": "val/denoise_psnr_salt_pepper"})
    kept = train(denoising, digits, run_evaluation=False)  # a family's name selects too (higher PSNR is better)
    psnrs = [epoch["val/denoise_psnr_salt_pepper"] for epoch in kept.history]
    assert kept.best_epoch == 1 + int(np.argmax(psnrs))
    result = train(config, digits, run_evaluation=False)
    for epoch in result.history:
        assert set(asked) <= set(epoch) and all(np.isfinite(epoch[name]) for name in asked)
        assert 0 <= epoch["val/knn_accuracy"] <= 1 and epoch["val/elbo"] <= -epoch["val/nll"] + 1e-3
    codes = encode(result.model, digits.val_x, 1000).numpy().astype(np.float64)  # every row: under the cap
    labels = digits.val_y.numpy()
    clusters = KMeans(n_clusters=len(np.unique(labels)), n_init=1, random_state=0).fit_predict(codes)
    kept = result.history[result.best_epoch - 1]
    assert kept["val/cluster_ari"] == pytest.approx(adjusted_rand_score(labels, clusters), abs=1e-9)
    plain = train(make_config(epochs=1, **SMALL), digits, run_evaluation=False)
    assert not set(asked) & set(plain.history[0])


@pytest.mark.parametrize(("name", "config", "spec", "needs"), [
    ("val/nll", {}, None, "gaussian latents"),
    ("val/kl", {}, None, "gaussian latents"),
    ("val/anomaly_auroc", {}, None, "data.anomaly"),
    ("val/cluster_ari", {"data": {"path": "wine.csv"}}, TABLE, "class labels"),
    ("val/denoise_psnr_gaussian", {"data": {"path": "wine.csv"}}, TABLE, "val/denoise_mse_gaussian"),
    ("val/denoise_mse_salt_pepper", {"data": {"path": "wine.csv"}}, TABLE, "salt_pepper"),
])
def test_a_metric_the_data_or_variant_cannot_have_is_named_with_what_it_needs(name, config, spec, needs):
    config = make_config(**config)
    problem = metric_problem(name, config, spec or config.data.known_spec)
    assert problem and needs in problem and name in problem


def test_objectives_default_to_the_catalogues_direction_and_set_what_trials_measure():
    space = parse_space(space_document(objective=[{"metric": "val/anomaly_auroc"}, {"metric": "model/parameters"}],
                                       data={"name": "digits", "anomaly": [3]}))
    assert space.metrics == ["val/anomaly_auroc", "model/parameters"] and space.modes == ["max", "min"]
    assert space.multi_objective and selected_by(space) == "val/anomaly_auroc"
    evaluation = trial_config(space, {"model.latent_dim": 4}).evaluation
    assert evaluation.val_metrics == ["val/anomaly_auroc"] and evaluation.select_by == "val/anomaly_auroc"
    single = parse_space(space_document(objective={"metric": "val/recon_mse"}))
    assert single.objective == [single.primary] and not single.multi_objective
    assert trial_config(single, {"model.latent_dim": 4}).evaluation.val_metrics == []


@pytest.mark.parametrize(("fields", "message"), [
    ({"objective": {"metric": "test/anomaly_auroc"}}, r"objective\.metric='test/anomaly_auroc': not a metric known"),
    ({"objective": [{"metric": "val/cluster_ari", "mode": "min"}]},
     r"objective\.mode='min': for val/cluster_ari higher is better, so the mode is 'max'"),
    ({"objective": [{"metric": "val/recon_mse"}, {"metric": "val/recon_mse", "mode": "min"}]},
     r"objective\[1\]\.metric='val/recon_mse': listed twice"),
    ({"objective": [{"metric": "model/latent_dim"}]}, r"objective: model/latent_dim is fixed by each trial's config"),
    ({"objective": [{"metric": "val/nll"}]},
     r"objective\[0\]\.metric='val/nll': val/nll applies to gaussian latents \(VAEs\) only"),
    ({"objective": [{"metric": "val/anomaly_ap"}]}, r"val/anomaly_ap needs labelled anomalies .* set data\.anomaly"),
    ({"objective": {"metric": "val/cluster_ari"}, "early_stopping": "asha_first_objective"},
     r"early_stopping='asha_first_objective' is for several objectives"),
    ({"use": "telepathy"}, r"use='telepathy': unknown use; valid names: anomaly_detection, clustering, compression, generation, reconstruction"),
])
def test_an_objective_that_cannot_be_is_refused_in_one_line(fields, message):
    with pytest.raises(ConfigError, match=message) as raised:
        parse_space(space_document(**fields))
    assert "\n" not in str(raised.value)


def test_when_a_metric_applies_is_a_registered_condition_that_decides_it():
    """The catalogue's `applies` is not prose beside hard-coded checks: each names a condition that
    metric_problem evaluates on the config and the data."""
    from aesearch.config import CONDITIONS, metric_problem, parse_config
    from aesearch.metrics import FAMILY_METRICS, METRICS
    from aesearch.parts.data import IMAGE, DataSpec

    assert {metric.applies for metric in [*METRICS, *FAMILY_METRICS]} <= set(CONDITIONS)
    plain = parse_config({"name": "t", "data": {"name": "digits"}})
    vae = parse_config({"name": "t", "data": {"name": "digits"}, "model": {"latent": "gaussian"}})
    labelled = DataSpec("digits", IMAGE, (1, 8, 8), unit_range=True, classes=("0", "1"))
    bare = DataSpec("digits", IMAGE, (1, 8, 8), unit_range=True)
    assert metric_problem("val/kl", vae, bare) is None and "gaussian latents" in metric_problem("val/kl", plain, bare)
    assert metric_problem("val/knn_accuracy", plain, labelled) is None
    assert "needs class labels" in metric_problem("val/knn_accuracy", plain, bare)
    assert metric_problem("val/recon_mse", plain, bare) is None  # always


@pytest.mark.parametrize("use", sorted(USES))
def test_each_use_stands_for_a_valid_space_with_its_objectives(use):
    data = {"name": "digits", "anomaly": [0]} if use == "anomaly_detection" else {"name": "digits"}
    space = parse_space({"name": "s", "use": use, "data": data})
    assert space.objective and space.space and space.use == use
    assert all(objective.metric for objective in space.objective)
    expected = {"reconstruction": ["val/recon_mse"], "anomaly_detection": ["val/anomaly_auroc"],
                "clustering": ["val/cluster_ari"], "generation": ["val/nll"],
                "compression": ["val/recon_mse", "model/latent_dim"]}[use]
    assert space.metrics == expected


def test_what_the_file_gives_itself_wins_over_its_use():
    space = parse_space({"name": "s", "use": "generation", "objective": [{"metric": "val/elbo"}],
                         "base": {"model": {"hidden_dims": [64]}, "optimizer": {"batch_size": 32}}})
    assert space.metrics == ["val/elbo"] and "objective.kl.beta" in space.space
    assert space.base == {"model": {"latent": "gaussian", "hidden_dims": [64]}, "optimizer": {"batch_size": 32}}
    own = parse_space({"name": "s", "use": "clustering", "space": {"model.latent_dim": {"type": "int", "low": 2,
                                                                                          "high": 9}}})
    assert list(own.space) == ["model.latent_dim"] and own.metrics == ["val/cluster_ari"]


def test_a_validation_split_without_anomalies_is_refused_before_a_search_starts(digits):
    space = parse_space(space_document(objective={"metric": "val/anomaly_auroc"}, data={"name": "digits",
                                                                                        "anomaly": [0]}))
    data = load_data(space.data)
    check_validation_rows(space, data)  # digits' validation holds zeros and the rest
    normal_only = data.__class__(**{**data.__dict__, "val_y": torch.ones_like(data.val_y)})
    with pytest.raises(ConfigError, match=r"objective\[0\]\.metric='val/anomaly_auroc': the validation split of "
                                          r"digits holds 0 anomalous and \d+ normal labelled rows; it needs both"):
        check_validation_rows(space, normal_only)


def test_the_guide_to_uses_lists_every_use_with_its_objectives():
    from tests.conftest import REPO

    guide = (REPO / "docs" / "how-to" / "uses.md").read_text()
    for name in USES:
        use = USES[name]
        row = next((line for line in guide.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, f"docs/how-to/uses.md has no row for use {name!r}"
        assert all(f"`{metric}`" in row for metric in use.objective), row


def test_a_space_file_of_a_use_alone_validates_and_says_what_it_ranks_on(tmp_path, capsys):
    from aesearch.cli import main

    path = tmp_path / "detector.yaml"
    path.write_text("name: detector\ndata: {name: digits, anomaly: [0]}\nuse: anomaly_detection\n")
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "search space detector: use anomaly_detection:" in out and "objective val/anomaly_auroc max" in out
