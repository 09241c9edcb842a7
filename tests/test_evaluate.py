from dataclasses import replace

import numpy as np
import pytest
import torch

from aesearch.config import EvaluationConfig
from aesearch.parts.data import load_data
from aesearch.parts.models import build_model
from aesearch.training.evaluate import (
    anomaly_metrics,
    cluster_accuracy,
    evaluate,
    gaussian_latent_metrics,
    latent_quality,
    psnr,
    sparsity_metrics,
)
from aesearch.training.scoring import FittedScorer, seen
from aesearch.training.trainer import train
from tests.conftest import make_config

VAE = dict(
    epochs=5,
    model={"latent": "gaussian", "hidden_dims": [64], "latent_dim": 8},
    objective={"reconstruction": "bce"},
)


@pytest.fixture(scope="module")
def trained_vae(digits):
    return train(make_config(**VAE), digits, run_evaluation=False).model


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_iwae_bound_is_at_least_the_elbo(trained_vae, digits):
    metrics = gaussian_latent_metrics(trained_vae, digits.test_x, "test", 100, 1000, _generator(), digits.spec)
    assert -metrics["nll"] >= metrics["elbo"]
    assert metrics["nll"] > 0 and metrics["kl"] > 0


def test_iwae_with_one_sample_is_an_elbo_estimate(trained_vae, digits):
    one = gaussian_latent_metrics(trained_vae, digits.test_x, "test", 1, 1000, _generator(), digits.spec)
    many = gaussian_latent_metrics(trained_vae, digits.test_x, "test", 200, 1000, _generator(), digits.spec)
    assert -one["nll"] == pytest.approx(one["elbo"], rel=0.02)
    assert many["nll"] < one["nll"]  # the bound tightens with k


def test_active_units_count_only_units_that_vary_with_the_input(trained_vae, digits):
    metrics = gaussian_latent_metrics(trained_vae, digits.test_x, "test", 2, 1000, _generator(), digits.spec)
    assert 1 <= metrics["active_units"] <= 8
    collapsed = build_model(make_config(**VAE).model, digits.spec)
    with torch.no_grad():
        collapsed.latent.linear.weight.zero_()  # mu no longer depends on x: every unit inactive
    assert gaussian_latent_metrics(collapsed, digits.test_x, "test", 2, 1000, _generator(), digits.spec)["active_units"] == 0


def test_psnr_of_a_known_error():
    x = torch.full((2, 1, 4, 4), 0.5)
    assert psnr(x + 0.1, x) == pytest.approx(torch.full((2,), 20.0), abs=1e-4)


def test_sparsity_metrics_of_a_known_code():
    code = torch.tensor([[0.0, 0.5, 0.0], [0.0, 0.05, 0.9]])
    metrics = sparsity_metrics(code, threshold=0.1)
    assert metrics["active_fraction"] == pytest.approx(2 / 6)
    assert metrics["dead_units"] == 1
    assert metrics["mean_activation"] == pytest.approx(1.45 / 6)


def test_latent_quality_separates_informative_from_random_codes():
    torch.manual_seed(0)
    labels = torch.arange(400) % 4
    informative = torch.nn.functional.one_hot(labels, 4).float() * 5 + 0.1 * torch.randn(400, 4)
    settings = EvaluationConfig(kmeans_restarts=2)
    good = latent_quality(informative[:300], labels[:300], informative[300:], labels[300:], settings)
    assert good["probe_accuracy"] == 1.0 and good["knn_accuracy"] == 1.0
    assert good["cluster_ari"] > 0.95 and good["cluster_nmi"] > 0.95 and good["cluster_accuracy"] > 0.98
    noise = torch.randn(400, 4)
    bad = latent_quality(noise[:300], labels[:300], noise[300:], labels[300:], settings)
    assert bad["probe_accuracy"] < 0.5 and bad["cluster_ari"] < 0.2


def test_cluster_accuracy_matches_clusters_to_classes_one_to_one():
    labels = np.repeat(np.arange(4), 25)
    permuted = np.array([2, 0, 3, 1])[labels]  # every cluster one class, under other names
    assert cluster_accuracy(labels, permuted) == 1.0
    wrong = permuted.copy()
    wrong[:5] = permuted[30]  # 5 of class 0 put in class 1's cluster
    assert cluster_accuracy(labels, wrong) == pytest.approx(0.95)
    merged = np.where(labels == 3, 2, labels)  # classes 2 and 3 in one cluster: only one of them can match it
    assert cluster_accuracy(labels, merged) == pytest.approx(0.75)
    assert cluster_accuracy(labels, np.zeros_like(labels)) == pytest.approx(0.25)


def test_anomaly_auroc_ranks_badly_reconstructed_class_first(digits):
    spec = replace(digits.spec, anomalies=("7",))
    model = build_model(make_config(model={"hidden_dims": [4]}).model, spec).eval()
    with torch.no_grad():
        model.decoder.layers[-2].bias.fill_(-20.0)  # reconstructs everything as black
        model.decoder.layers[-2].weight.zero_()
    normal, anomalous = torch.rand(30, 1, 8, 8) * 0.2, torch.ones(10, 1, 8, 8) * 0.9
    x = torch.cat([normal, anomalous])
    labels = torch.tensor([0] * 30 + [7] * 10)
    errors = FittedScorer("reconstruction")(seen(model, x, 16))
    assert anomaly_metrics(errors, labels, spec) == {"anomaly_auroc": 1.0, "anomaly_ap": 1.0}


def test_suite_names_every_metric_under_test(digits, trained_vae):
    torch.manual_seed(0)
    data = digits
    metrics = evaluate(trained_vae, data, EvaluationConfig(iwae_samples=5, kmeans_restarts=1))
    expected = {
        "recon_mse", "recon_bce", "recon_l1", "psnr", "elbo", "nll", "kl", "active_units",
        "probe_accuracy", "knn_accuracy", "cluster_ari", "cluster_nmi", "cluster_accuracy",
        "mean_activation", "active_fraction", "dead_units",
        *(f"{p}_psnr_{k}" for p in ("denoise", "noisy") for k in ("gaussian", "salt_pepper", "masking", "uniform")),
    }
    assert set(metrics) == {f"test/{name}" for name in expected}
    assert all(isinstance(v, float) for v in metrics.values())
    assert 0 < metrics["test/recon_mse"] < 0.2 and metrics["test/psnr"] > 7


def test_anomaly_metrics_appear_when_a_class_is_held_out(digits):
    config = make_config(epochs=2, data={"anomaly": [0]}, model={"hidden_dims": [32]},
                         evaluation={"kmeans_restarts": 1})
    result = train(config, load_data(config.data))
    assert 0.0 <= result.metrics["test/anomaly_auroc"] <= 1.0
    assert 0.0 <= result.metrics["test/anomaly_ap"] <= 1.0


def test_the_suite_depends_on_the_weights_alone_and_leaves_the_callers_randomness_alone(trained_vae, digits):
    settings = make_config(**VAE).evaluation
    torch.manual_seed(1)
    before = torch.get_rng_state()
    first = evaluate(trained_vae, digits, settings)
    assert torch.equal(torch.get_rng_state(), before)  # neither drawn from nor reseeded
    after_first = torch.rand(3)
    torch.manual_seed(2)  # another caller state: denoising noise and IWAE samples must not follow it
    torch.rand(1000)
    second = evaluate(trained_vae, digits, settings)
    assert first == second
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after_first)  # evaluate drew nothing from the caller's generator


@pytest.mark.parametrize("sections", [
    {"model": {"latent": "gaussian", "hidden_dims": [16]}, "objective": {"kl": {"schedule": "linear"}},
     "data": {"anomaly": [0]}},
    {"model": {"hidden_dims": [16]}, "objective": {"sparsity": {"kind": "kl"}, "contractive_weight": 0.1},
     "corruption": {"kind": "masking", "level": 0.2}},
], ids=["vae", "sparse-contractive-denoising"])
def test_every_metric_a_run_logs_is_in_the_catalogue(digits, sections):
    from aesearch.metrics import lookup

    config = make_config(epochs=1, evaluation={"iwae_samples": 2, "kmeans_restarts": 1}, **sections)
    data = load_data(config.data) if config.data.anomaly else digits
    result = train(config, data)
    logged = {*result.history[-1], *result.metrics}
    unknown = sorted(name for name in logged if lookup(name) is None)
    assert not unknown, f"metrics logged but missing from aesearch/metrics.py: {unknown}"
    expected = ({"test/nll", "test/anomaly_auroc", "test/anomaly_ap"}, {"test/dead_units", "val/contractive"})
    assert any(names <= logged for names in expected)


def _write_table(path, rows=300):
    """alcohol, colour (categorical), acidity, and a label `kind`: every tenth row an anomaly."""
    generator = torch.Generator().manual_seed(0)
    lines = ["alcohol,colour,acidity,kind"]
    for i in range(rows):
        kind = "ok" if i % 10 else ("fraud", "attack")[(i // 10) % 2]
        alcohol, acidity = (torch.randn(2, generator=generator) + torch.tensor([13.0, 3.0])).tolist()
        lines.append(f"{alcohol:.3f},{('red', 'white', 'rose')[i % 3]},{acidity + 3 * (kind != 'ok'):.3f},{kind}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("labels", [
    {"label": "kind", "anomaly": ["fraud", "attack"]},
    {"features": ["alcohol", "colour", "acidity"]},  # the label column left out: unlabelled
], ids=["labelled-anomalies", "unlabelled"])
def test_a_real_valued_table_logs_the_metrics_that_apply_all_in_the_catalogue(tmp_path, labels):
    from aesearch.metrics import lookup

    config = make_config(
        epochs=2, data={"path": _write_table(tmp_path / "wine.csv"), **labels},
        model={"latent": "gaussian", "hidden_dims": [16], "latent_dim": 4}, objective={"reconstruction": "mixed"},
        corruption={"kind": "swap", "level": 0.1}, evaluation={"iwae_samples": 2, "kmeans_restarts": 1},
    )
    result = train(config, load_data(config.data))
    logged = {*result.history[-1], *result.metrics}
    assert not sorted(name for name in logged if lookup(name) is None)
    names = {name.removeprefix("test/") for name in result.metrics if name.startswith("test/")}
    assert {"recon_mse", "recon_l1", "recon_mse_original", "nll", "elbo", "denoise_mse_gaussian"} <= names
    assert not names & {"psnr", "recon_bce", "denoise_psnr_gaussian", "denoise_mse_salt_pepper"}
    labelled = {"cluster_ari", "cluster_nmi", "anomaly_auroc", "anomaly_ap"}
    assert labelled <= names if "label" in labels else not names & {*labelled, "probe_accuracy", "knn_accuracy"}
