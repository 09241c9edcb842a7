"""The evaluation suite on vectors and tables: what applies to real-valued, unlabelled or
anomaly-labelled data, checked on hand-built specs and a model whose outputs are known."""

from types import SimpleNamespace

import pytest
import torch

from aesearch.config import EvaluationConfig
from aesearch.metrics import lookup
from aesearch.parts.data import VECTOR, Data, DataSpec
from aesearch.parts.objectives import RECONSTRUCTIONS
from aesearch.training.evaluate import (
    anomaly_metrics,
    column_errors,
    evaluate,
    feature_errors,
    gaussian_latent_metrics,
    reconstruction_metrics,
)
from tests.user_data import TABLE

SETTINGS = EvaluationConfig(iwae_samples=4, kmeans_restarts=1, batch_size=16,
                            denoise_levels={"gaussian": 0.3, "salt_pepper": 0.2, "masking": 0.3, "swap": 0.2})


class KnownModel(torch.nn.Module):
    """An autoencoder whose decoder always returns `logits` and whose code (or latent mean) is
    `mu_scale` times the input's first two values, with unit variance for a gaussian latent."""

    def __init__(self, logits: torch.Tensor, spec: DataSpec, stochastic: bool = False, mu_scale: float = 1.0):
        super().__init__()
        self.logits, self.spec, self.stochastic, self.mu_scale = logits, spec, stochastic, mu_scale
        self.latent_dim = 2

    def encode(self, x, sample=False):
        mu = self.mu_scale * x.flatten(1)[:, :2].float()
        return SimpleNamespace(z=mu, code=mu, mu=mu, logvar=torch.zeros_like(mu))

    def decode(self, z):
        return self.logits.expand(len(z), -1)

    def forward(self, x, sample=None):
        logits = self.decode(self.encode(x).code)
        return SimpleNamespace(logits=logits, x_hat=self.spec.values(logits))


def _rows(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    colour = torch.nn.functional.one_hot(torch.randint(0, 3, (count,), generator=generator), 3).float()
    alcohol, acidity = torch.randn(count, 1, generator=generator), torch.randn(count, 1, generator=generator)
    return torch.cat([alcohol, colour, acidity], 1)


def _data(spec: DataSpec, labels: bool) -> Data:
    x = _rows(60)
    y = (torch.arange(60) % 3) if labels else None
    return Data(spec, x[:30], None if y is None else y[:30], x[30:40], None if y is None else y[30:40],
                x[40:], None if y is None else y[40:], fingerprint="known")


def test_anomaly_metrics_with_text_classes_and_two_anomaly_values():
    spec = DataSpec("traffic.csv", VECTOR, (5,), unit_range=False, classes=("attack", "normal", "probe"),
                    anomalies=("attack", "probe"))
    labels = torch.tensor([1, 1, 1, 1, 0, 2, 1, 2])  # codes into spec.classes
    errors = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.8, 0.7, 0.4, 0.25])
    # anomalies (0.8, 0.7, 0.25) against normals (0.1, 0.2, 0.3, 0.9, 0.4): 10 of 15 pairs ranked right
    metrics = anomaly_metrics(errors, labels, spec)
    assert metrics["anomaly_auroc"] == pytest.approx(10 / 15)
    # ranked by error: 0.9 n, 0.8 a, 0.7 a, 0.4 n, 0.3 n, 0.25 a: precision at each anomaly 1/2, 2/3, 3/6
    assert metrics["anomaly_ap"] == pytest.approx((1 / 2 + 2 / 3 + 3 / 6) / 3)


def test_anomaly_metrics_are_absent_when_the_test_split_has_one_kind_only():
    spec = DataSpec("t.csv", VECTOR, (1,), unit_range=False, classes=("a", "b"), anomalies=("b",))
    assert anomaly_metrics(torch.rand(4), torch.zeros(4, dtype=torch.long), spec) == {}


def test_recon_mse_original_is_the_error_in_original_units():
    x = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0, -1.0]])
    x_hat = x + torch.tensor([[0.5, 0.3, 0.0, 0.0, 1.0], [-1.0, 0.0, 0.0, 0.0, 2.0]])
    metrics = reconstruction_metrics(x_hat, x, TABLE)
    # numeric errors in original units: alcohol 0.5 * 0.8, -1 * 0.8; acidity 1 * 0.5, 2 * 0.5
    expected = (0.4**2 + 0.8**2 + 0.5**2 + 1.0**2) / 4
    assert metrics["recon_mse_original"] == pytest.approx(expected, rel=1e-6)
    assert metrics["recon_mse"] == pytest.approx((0.25 + 0.09 + 1 + 1 + 4) / 10, rel=1e-6)
    assert "psnr" not in metrics and "recon_bce" not in metrics  # not in [0, 1]


def test_feature_errors_per_column():
    x = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0, -1.0]])
    x_hat = torch.tensor([[1.0, 0.6, 0.3, 0.1, 0.0], [1.0, 0.5, 0.2, 0.3, 1.0]])
    errors = feature_errors(x_hat, x, TABLE)
    assert errors == pytest.approx({"alcohol": 0.5, "colour": 0.5, "acidity": 2.0})  # colour: row 2 misread
    per_sample = column_errors(x_hat, x, TABLE)
    assert {name: e.tolist() for name, e in per_sample.items()} == {"alcohol": [1.0, 0.0], "colour": [0.0, 1.0],
                                                                     "acidity": [0.0, 4.0]}


def test_the_suite_on_an_unlabelled_table_has_no_latent_quality_and_real_valued_metrics():
    model = KnownModel(torch.zeros(1, 5), TABLE)
    metrics = evaluate(model, _data(TABLE, labels=False), SETTINGS)
    names = {name.removeprefix("test/") for name in metrics}
    assert not names & {"probe_accuracy", "knn_accuracy", "cluster_ari", "cluster_nmi", "anomaly_auroc", "anomaly_ap"}
    assert not names & {"psnr", "recon_bce"} and not any("psnr" in name for name in names)
    assert {"recon_mse", "recon_l1", "recon_mse_original", "mean_activation"} <= names
    assert {f"{p}_mse_{k}" for p in ("denoise", "noisy") for k in ("gaussian", "masking", "swap")} <= names
    assert not any(name.endswith("salt_pepper") for name in names)  # refused on real-valued data
    assert all(lookup(name) is not None for name in metrics), "every metric is in the catalogue"
    # the model's reconstruction is the same whatever its input: so is its error, noisy or clean
    x = _data(TABLE, labels=False).test_x
    constant = TABLE.values(torch.zeros(1, 5))  # numeric 0, each colour level 1/3
    assert metrics["test/denoise_mse_gaussian"] == pytest.approx((constant - x).pow(2).mean().item(), rel=1e-5)
    assert metrics["test/denoise_mse_swap"] == pytest.approx(metrics["test/recon_mse"], rel=1e-5)
    assert metrics["test/noisy_mse_gaussian"] == pytest.approx(0.3**2, rel=0.3)


def test_the_suite_on_a_labelled_table_measures_latent_quality():
    """Codes that hold the class (the first value, 10 x the class) score 1 on every latent-quality metric;
    codes that hold nothing (all zero) score no agreement at all."""
    from dataclasses import replace

    spec = DataSpec("wine.csv", VECTOR, (5,), unit_range=False, classes=("a", "b", "c"), columns=TABLE.columns)
    data = _data(spec, labels=True)
    separated = replace(data, **{f"{split}_x": getattr(data, f"{split}_x").index_put(
        (torch.arange(len(getattr(data, f"{split}_y"))), torch.tensor(0)), 10.0 * getattr(data, f"{split}_y").float())
        for split in ("train", "val", "test")})
    latent = ["test/probe_accuracy", "test/knn_accuracy", "test/cluster_ari", "test/cluster_nmi", "test/cluster_accuracy"]
    telling = evaluate(KnownModel(torch.zeros(1, 5), spec), separated, SETTINGS)
    assert [telling[name] for name in latent] == pytest.approx([1.0] * len(latent))
    blind = evaluate(KnownModel(torch.zeros(1, 5), spec, mu_scale=0.0), separated, SETTINGS)
    assert blind["test/cluster_ari"] == pytest.approx(0.0, abs=1e-9) and blind["test/cluster_nmi"] == pytest.approx(0.0, abs=1e-9)
    assert blind["test/probe_accuracy"] < 0.5 and blind["test/cluster_accuracy"] < 0.5


def test_gaussian_latent_nll_on_real_data_is_the_mixed_likelihood_of_the_inputs_as_given():
    logits = torch.tensor([[0.5, 1.0, 0.0, -1.0, 2.0]])
    model = KnownModel(logits, TABLE, stochastic=True, mu_scale=0.0)  # q(z|x) = p(z): log w = log p(x|z)
    x = _rows(12)
    metrics = gaussian_latent_metrics(model, x, "test", 5, 4, torch.Generator().manual_seed(0), TABLE)
    expected = RECONSTRUCTIONS["mixed"](logits.expand(12, -1), x, TABLE).mean().item()
    assert metrics["nll"] == pytest.approx(expected, rel=1e-5)
    assert metrics["elbo"] == pytest.approx(-expected, rel=1e-5) and metrics["kl"] == 0.0
