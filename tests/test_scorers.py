"""Anomaly scores past the reconstruction error (parts/scorers.py, training/scoring.py): each scorer's
arithmetic on known codes, the rules, and one fitted scorer shared by the per-epoch metric, the
test metric, the checkpoint and `aesearch score`."""

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from aesearch.errors import ConfigError
from aesearch.parts.data import VECTOR, DataSpec
from aesearch.parts.objectives import RECONSTRUCTIONS, gaussian_kl
from aesearch.parts.scorers import ANOMALY_SCORERS, COMBINED, Seen
from aesearch.training.checkpoints import load_trained_model
from aesearch.training.inference import infer
from aesearch.training.scoring import FittedScorer, fit_scorer, seen
from aesearch.training.trainer import Trainer, train
from tests.conftest import make_config

SPEC = DataSpec("points", VECTOR, (3,), unit_range=False)


def rows(codes, x=None, logits=None, logvar=None) -> Seen:
    codes = torch.as_tensor(codes, dtype=torch.float32)
    x = torch.zeros(len(codes), 3) if x is None else x
    return Seen(x, x if logits is None else logits, codes, logvar, SPEC)


def fitted(kind: str, train: Seen, val: Seen, neighbors: int = 2) -> FittedScorer:
    scorer = ANOMALY_SCORERS[kind]
    return FittedScorer(kind, scorer.fit(train, val, neighbors) if scorer.fit else {})


def test_knn_is_the_mean_distance_to_the_k_nearest_normal_codes():
    train = rows([[0, 0], [1, 0], [0, 2], [10, 10]])
    score = fitted("knn", train, train, neighbors=2)(rows([[0, 0], [4, 0]]))
    # (0,0): itself at 0 and (1,0) at 1 -> 0.5;  (4,0): (1,0) at 3 and (0,0) at 4 -> 3.5
    assert score.tolist() == pytest.approx([0.5, 3.5])


def test_mahalanobis_is_ledoit_wolfs_distance_to_the_normal_codes():
    generator = np.random.default_rng(0)
    normal = generator.normal(size=(200, 3)) * [1.0, 5.0, 0.2]
    new = generator.normal(size=(20, 3)) * 3
    score = fitted("mahalanobis", rows(normal), rows(normal))(rows(new))
    assert score.numpy() == pytest.approx(np.sqrt(LedoitWolf().fit(normal).mahalanobis(new)), rel=1e-4)


def test_a_code_score_finds_anomalies_the_reconstruction_misses():
    # every row reconstructed perfectly, but the anomalies' codes lie far from the normal ones
    generator = torch.Generator().manual_seed(0)
    normal_codes, anomalous_codes = torch.randn(100, 2, generator=generator), torch.randn(20, 2, generator=generator) + 6
    test = rows(torch.cat([normal_codes[50:], anomalous_codes]))
    train = rows(normal_codes[:50])
    labels = np.r_[np.zeros(50), np.ones(20)]
    assert roc_auc_score(labels, fitted("reconstruction", train, train)(test)) == 0.5
    for kind in ("knn", "mahalanobis", "combined"):
        assert roc_auc_score(labels, fitted(kind, train, train)(test)) == 1.0, kind


def test_lof_is_scikit_learns_local_outlier_factor_of_the_input_beside_its_residual():
    from sklearn.neighbors import LocalOutlierFactor

    generator = np.random.default_rng(2)
    x = generator.normal(size=(120, 3)).astype(np.float32)
    x_hat = x + generator.normal(size=(120, 3)).astype(np.float32) * np.linspace(0.01, 1, 120)[:, None]
    train = rows(np.zeros((100, 2)), torch.from_numpy(x[:100]), torch.from_numpy(x_hat[:100]))
    new = rows(np.zeros((20, 2)), torch.from_numpy(x[100:]), torch.from_numpy(x_hat[100:]))
    score = fitted("lof", train, train, neighbors=20)(new)
    features = np.c_[x, x_hat - x]
    expected = -LocalOutlierFactor(n_neighbors=20, novelty=True).fit(features[:100]).score_samples(features[100:])
    assert score.numpy() == pytest.approx(expected, rel=1e-5)
    # on the input alone (no residual), the residual's rows would score differently
    alone = -LocalOutlierFactor(n_neighbors=20, novelty=True).fit(x[:100]).score_samples(x[100:])
    assert not np.allclose(score.numpy(), alone, rtol=1e-3)


def test_lof_finds_rows_whose_residual_is_unlike_the_normal_ones_where_neither_part_alone_does():
    # the anomalies' inputs lie among the normal inputs, and their reconstruction errors are as large as
    # the normal rows' own; but the normal rows err along the first value, the anomalies along the second
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(170, 3, generator=generator) * 0.3
    size = torch.randn(170, 1, generator=generator).abs() * 0.5 + 1.0
    along = torch.zeros(170, 3)
    along[:150, 0], along[150:, 1] = 1.0, 1.0
    x_hat = x + size * along
    train, test = rows(torch.zeros(100, 2), x[:100], x_hat[:100]), rows(torch.zeros(70, 2), x[100:], x_hat[100:])
    labels = np.r_[np.zeros(50), np.ones(20)]
    lof = fitted("lof", train, train, neighbors=20)
    assert roc_auc_score(labels, lof(test)) > 0.99
    assert roc_auc_score(labels, fitted("reconstruction", train, train)(test)) < 0.7
    inputs_only = rows(torch.zeros(100, 2), x[:100]), rows(torch.zeros(70, 2), x[100:])  # no residual
    assert roc_auc_score(labels, fitted("lof", inputs_only[0], inputs_only[0], neighbors=20)(inputs_only[1])) < 0.7
    assert lof.prepared is lof.prepared  # the detector is built once per fitted scorer


def test_joint_mahalanobis_is_ledoit_wolfs_distance_of_the_input_beside_its_residual():
    generator = np.random.default_rng(4)
    codes, x = generator.normal(size=(140, 2)), generator.normal(size=(140, 3))
    x_hat = x + generator.normal(size=(140, 3)) * [0.1, 1.0, 0.5]
    as_rows = [rows(codes[part], torch.from_numpy(x[part]).float(), torch.from_numpy(x_hat[part]).float())
               for part in (slice(0, 120), slice(120, None))]
    score = fitted("joint_mahalanobis", as_rows[0], as_rows[0])(as_rows[1])
    joint = np.c_[x, x_hat - x].astype(np.float32)
    assert score.numpy() == pytest.approx(np.sqrt(LedoitWolf().fit(joint[:120]).mahalanobis(joint[120:])), rel=1e-4)


def test_joint_mahalanobis_finds_residuals_that_break_the_normal_rows_correlation():
    # inputs and codes alike, errors as large: the normal rows err on the first two values together, the anomalies
    # on both in opposite directions; only the residual's covariance tells them apart
    generator = torch.Generator().manual_seed(5)
    x, codes = torch.randn(170, 3, generator=generator), torch.randn(170, 2, generator=generator)
    error = (torch.randn(170, 1, generator=generator).abs() * 0.5 + 0.5) * torch.randn(170, 1, generator=generator).sign()
    together = torch.cat([error, error * torch.where(torch.arange(170) < 150, 1.0, -1.0)[:, None],
                          torch.randn(170, 1, generator=generator) * 0.01], dim=1)
    train = rows(codes[:100], x[:100], x[:100] + together[:100])
    test = rows(codes[100:], x[100:], x[100:] + together[100:])
    labels = np.r_[np.zeros(50), np.ones(20)]
    assert roc_auc_score(labels, fitted("joint_mahalanobis", train, train)(test)) > 0.97
    for kind in ("reconstruction", "mahalanobis"):
        assert roc_auc_score(labels, fitted(kind, train, train)(test)) < 0.75, kind


def test_a_scorer_too_wide_for_the_input_is_refused_in_one_line():
    from aesearch.config import check_data
    from aesearch.parts.data import IMAGE

    config = make_config(evaluation={"anomaly_score": "joint_mahalanobis"})
    check_data(config, DataSpec("digits", IMAGE, (1, 8, 8), unit_range=True))  # 64 features: scored
    with pytest.raises(ConfigError) as refused:
        check_data(config, DataSpec("photos", IMAGE, (3, 32, 32), unit_range=True))
    assert str(refused.value) == (
        "evaluation.anomaly_score='joint_mahalanobis' keeps a (2 x features)^2 precision matrix, so it takes inputs "
        "of at most 1024 features, and photos's have 3072 (3, 32, 32): choose another score")


def test_each_scorer_reads_its_own_default_neighbours_unless_the_config_sets_them(digits):
    from aesearch.parts.models import build_model

    model = build_model(make_config(model={"hidden_dims": [16], "latent_dim": 3}).model, digits.spec)
    for kind, expected in (("knn", 5), ("lof", 20)):
        settings = make_config(evaluation={"anomaly_score": kind, "anomaly_fit_samples": 200}).evaluation
        assert int(fit_scorer(model, digits, settings).state["neighbors"]) == expected
        settings = make_config(evaluation={"anomaly_score": kind, "anomaly_neighbors": 7}).evaluation
        assert int(fit_scorer(model, digits, settings).state["neighbors"]) == 7


def test_combined_standardises_each_part_on_the_normal_validation_rows():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(60, 3, generator=generator)
    logits = x + torch.randn(60, 3, generator=generator) * torch.linspace(0.1, 3, 60)[:, None]  # errors of many sizes
    train = rows(torch.randn(40, 2, generator=generator), x[:40], logits[:40])
    val = rows(torch.randn(20, 2, generator=generator) * 4, x[40:], logits[40:])
    combined = fitted("combined", train, val)
    # on the very rows it was standardised on, each part has mean 0, so their sum too
    assert combined(val).mean().item() == pytest.approx(0.0, abs=1e-5)
    parts = [(fitted(name, train, val)(val).double() - fitted(name, train, val)(val).double().mean())
             / fitted(name, train, val)(val).double().std() for name in COMBINED]
    assert combined(val).numpy() == pytest.approx(sum(parts).numpy(), abs=1e-4)


def test_neg_elbo_is_the_mixed_likelihood_plus_the_kl_at_the_mean():
    x, logits = torch.randn(5, 3), torch.randn(5, 3)
    mu, logvar = torch.randn(5, 2), torch.randn(5, 2) * 0.3
    score = fitted("neg_elbo", rows(mu), rows(mu))(rows(mu, x, logits, logvar))
    expected = RECONSTRUCTIONS["mixed"](logits, x, SPEC) + gaussian_kl(mu, logvar)
    assert score.tolist() == pytest.approx(expected.tolist(), rel=1e-5)


def test_a_scorer_that_needs_a_gaussian_latent_is_refused_on_a_deterministic_one_in_one_line():
    with pytest.raises(ConfigError) as refused:
        make_config(evaluation={"anomaly_score": "neg_elbo"})
    message = str(refused.value)
    assert "evaluation.anomaly_score='neg_elbo' needs a gaussian latent" in message and "\n" not in message
    assert make_config(model={"latent": "gaussian"}, evaluation={"anomaly_score": "neg_elbo"})
    with pytest.raises(ConfigError, match="evaluation.anomaly_score='ocsvm': unknown anomaly score; valid names: combined, joint_mahalanobis, knn"):
        make_config(evaluation={"anomaly_score": "ocsvm"})


DETECTOR = dict(data={"anomaly": [7]}, epochs=3, model={"hidden_dims": [32], "latent_dim": 4},
                evaluation={"anomaly_score": "combined", "val_metrics": ["val/anomaly_auroc"],
                            "select_by": "val/anomaly_auroc", "anomaly_fit_samples": 300})


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """A small detector of the digit 7 scored by `combined`, trained, and its checkpoint."""
    from aesearch.parts.data import load_data

    config = make_config(**DETECTOR)
    data = load_data(config.data)
    checkpoint = tmp_path_factory.mktemp("detector") / "best.pt"
    trainer = Trainer(config, data)
    for _ in range(config.epochs):
        end = trainer.run_epoch()
        if end.is_best:
            end.save_checkpoint(checkpoint)
    return config, data, trainer, checkpoint


def test_the_checkpoint_keeps_the_scorer_fitted_to_the_best_weights(detector):
    config, data, trainer, checkpoint = detector
    trained = load_trained_model(checkpoint, data)
    kept = trained.scorer
    assert kept.kind == "combined"
    assert kept.state["knn.codes"].shape == (300, 4)  # anomaly_fit_samples normal training rows
    again = fit_scorer(trained.model, data, config.evaluation)
    assert set(kept.state) == set(again.state)
    for key, value in kept.state.items():
        assert torch.allclose(value.double(), again.state[key].double(), rtol=1e-5, atol=1e-6), key


def test_the_test_metric_the_score_command_and_the_per_epoch_metric_score_alike(detector):
    from aesearch.training.evaluate import evaluate

    config, data, trainer, checkpoint = detector
    trained = load_trained_model(checkpoint, data)
    metrics = evaluate(trained.model, data, config.evaluation)
    scores = infer(trained.model, data.test_x, trained.scorer).scores.numpy()
    is_anomaly = data.spec.is_anomaly(data.test_y).numpy()
    assert metrics["test/anomaly_auroc"] == pytest.approx(roc_auc_score(is_anomaly, scores), abs=1e-6)
    reconstruction = infer(trained.model, data.test_x, FittedScorer()).scores.numpy()
    assert not np.allclose(scores, reconstruction)  # the combined score, not the reconstruction error
    best = trainer.history[trainer.best_epoch - 1]["val/anomaly_auroc"]
    assert best == pytest.approx(trainer.use_metrics(trained.model)["val/anomaly_auroc"], abs=1e-6)


def test_a_run_resumed_with_another_scorer_refits_it_to_the_best_weights(detector):
    config, data, trainer, checkpoint = detector
    other = make_config(**{**DETECTOR, "epochs": 4, "evaluation": {**DETECTOR["evaluation"], "anomaly_score": "knn"}})
    resumed = train(other, data, resume_from=checkpoint, run_evaluation=False, stop_after=3)
    assert resumed.best_epoch == trainer.best_epoch
    state = Trainer(other, data)
    state.restore(torch.load(checkpoint, weights_only=True))
    assert state.best_scorer.kind == "knn" and set(state.best_scorer.state) == {"codes", "neighbors"}


def test_seen_reads_codes_and_reconstructions_through_the_latent_mean(digits):
    from aesearch.parts.models import build_model

    model = build_model(make_config(model={"latent": "gaussian", "hidden_dims": [16], "latent_dim": 3}).model,
                        digits.spec).eval()
    x = digits.test_x[:50]
    view = seen(model, x, 16)
    with torch.no_grad():
        output = model(x, sample=False)
    assert torch.allclose(view.x_hat, output.x_hat.float()) and torch.allclose(view.codes, output.latent.mu)
    assert view.logvar.shape == (50, 3)


def test_aesearch_score_and_the_served_model_score_with_the_checkpoints_scorer(detector, tmp_path, monkeypatch):
    import pandas as pd

    from aesearch.cli import main
    from aesearch.tracking.served_model import predict

    config, data, trainer, checkpoint = detector
    trained = load_trained_model(checkpoint, data)
    expected = infer(trained.model, data.test_x[:40], trained.scorer).scores.numpy()
    monkeypatch.chdir(tmp_path)
    np.save("new.npy", data.test_x[:40].numpy())
    assert main(["score", str(checkpoint), "--input", "new.npy", "--out", "scores.csv"]) == 0
    assert pd.read_csv("scores.csv")["score"].to_numpy() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert predict(trained, data.test_x[:40].numpy())["score"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert (expected < 0).any()  # standardised scores: below the normal rows' mean is negative, and allowed


@pytest.mark.parametrize("kind, kept, shape", [("lof", "rows", (300, 2 * 64)),  # input, residual
                                               ("joint_mahalanobis", "precision", (2 * 64, 2 * 64))])
def test_a_fitted_detector_scores_alike_in_its_test_metric_its_checkpoint_and_the_served_model(kind, kept, shape,
                                                                                              tmp_path):
    """What lof and joint_mahalanobis fit is kept as plain tensors (weights_only) and read back: the same scores."""
    from aesearch.parts.data import load_data
    from aesearch.tracking.served_model import predict
    from aesearch.training.evaluate import evaluate

    config = make_config(**{**DETECTOR, "epochs": 2, "evaluation": {**DETECTOR["evaluation"], "anomaly_score": kind}})
    data = load_data(config.data)
    trainer = Trainer(config, data)
    for _ in range(config.epochs):
        end = trainer.run_epoch()
        if end.is_best:
            end.save_checkpoint(tmp_path / "best.pt")
    trained = load_trained_model(tmp_path / "best.pt", data)
    assert trained.scorer.kind == kind and trained.scorer.state[kept].shape == shape
    scores = infer(trained.model, data.test_x, trained.scorer).scores.numpy()
    is_anomaly = data.spec.is_anomaly(data.test_y).numpy()
    metrics = evaluate(trained.model, data, config.evaluation)
    assert metrics["test/anomaly_auroc"] == pytest.approx(roc_auc_score(is_anomaly, scores), abs=1e-6)
    assert predict(trained, data.test_x[:40].numpy())["score"] == pytest.approx(scores[:40], rel=1e-5)
    assert trained.scorer is trained.scorer  # one scorer, one detector, for a served model's every request
