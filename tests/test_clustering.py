"""The clustering stage (parts/clustering.py, training/refinement.py): the arithmetic of IDEC's soft
assignment and target, the clusterers on separable data, the rules, and the refinement as the trainer
runs it (centres, the loss, convergence, DEC's idle decoder, exact resume, the test metrics)."""

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from aesearch.config import data_problem
from aesearch.errors import ConfigError
from aesearch.packing.fused import why_not_packable
from aesearch.parts.clustering import (
    CLUSTERERS,
    clustering_kl,
    cluster_means,
    soft_assignment,
    target_distribution,
)
from aesearch.parts.data import VECTOR, DataSpec
from aesearch.training.checkpoints import load_checkpoint
from aesearch.training.evaluate import cluster_accuracy, encode
from aesearch.training.trainer import Trainer, train
from tests.conftest import make_config

SMALL = {"model": {"hidden_dims": [32], "latent_dim": 4}, "optimizer": {"batch_size": 64},
         "evaluation": {"iwae_samples": 2, "kmeans_restarts": 1, "probe_max_samples": 500, "denoise_levels": {}}}


def refining(epochs=6, refine_epochs=3, **clustering):
    return make_config(epochs=epochs, clustering={"refinement": "idec", "refine_epochs": refine_epochs,
                                                  "update_interval": 5, **clustering}, **SMALL)


def test_soft_assignment_is_the_student_t_kernel_normalised():
    codes, centres = torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    q = soft_assignment(codes, centres)
    # row 0: distances^2 0 and 9 -> kernels 1 and 1/10;  row 1: 25 and 16 -> 1/26 and 1/17
    assert q[0].tolist() == pytest.approx([1 / 1.1, 0.1 / 1.1])
    assert q[1].tolist() == pytest.approx([(1 / 26) / (1 / 26 + 1 / 17), (1 / 17) / (1 / 26 + 1 / 17)])


def test_the_target_sharpens_and_weighs_clusters_by_their_frequency():
    q = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.3, 0.7]])
    p = target_distribution(q)
    f = q.sum(0)  # 1.5, 1.5
    expected = (q.pow(2) / f) / (q.pow(2) / f).sum(1, keepdim=True)
    assert torch.allclose(p, expected)
    assert torch.allclose(p.sum(1), torch.ones(3))
    assert (p.max(1).values > q.max(1).values).all()  # more confident than q everywhere
    assert clustering_kl(q, q).item() == pytest.approx(0.0, abs=1e-7)
    assert clustering_kl(p, q).item() > 0


def test_cluster_means_keep_the_overall_mean_for_an_empty_cluster():
    codes = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0]])
    means = cluster_means(codes, torch.tensor([0, 0, 1]), 3)
    assert torch.allclose(means, torch.tensor([[1.0, 0.0], [10.0, 10.0], [4.0, 10 / 3]]))


@pytest.mark.parametrize("name", ["kmeans", "gmm", "umap_gmm"])
def test_every_clusterer_finds_separated_groups(name):
    codes, labels = make_blobs(n_samples=300, centers=4, n_features=5, cluster_std=0.5, random_state=0)
    found = CLUSTERERS[name].group(codes, 4, 2, 10, 0)
    assert adjusted_rand_score(labels, found) == 1.0
    assert cluster_accuracy(labels, found) == 1.0


def test_rules_refuse_a_refinement_that_cannot_run():
    with pytest.raises(ConfigError, match=r"clustering.refine_epochs=0: clustering.refinement='idec' needs"):
        make_config(clustering={"refinement": "idec"})
    with pytest.raises(ConfigError, match=r"clustering.refine_epochs=3: it applies only with a"):
        make_config(clustering={"refine_epochs": 3})
    with pytest.raises(ConfigError, match=r"clustering.refine_epochs=10: must be below epochs=10"):
        make_config(epochs=10, clustering={"refinement": "dec", "refine_epochs": 10})
    with pytest.raises(ConfigError, match=r"clustering.clusterer='spectral': unknown clusterer; valid names: gmm, kmeans, umap_gmm"):
        make_config(clustering={"clusterer": "spectral"})
    with pytest.raises(ConfigError, match=r"clustering.tol"):
        make_config(clustering={"tol": 1.0})
    unlabelled = DataSpec("rows", VECTOR, (4,), unit_range=False)
    config = make_config(epochs=4, data={"path": "rows.csv"}, clustering={"refinement": "idec", "refine_epochs": 1})
    assert "clustering.clusters: not set" in data_problem(config, unlabelled)
    with_k = make_config(epochs=4, data={"path": "rows.csv"},
                         clustering={"refinement": "idec", "refine_epochs": 1, "clusters": 3})
    assert data_problem(with_k, unlabelled) is None
    assert "does not pack" in why_not_packable(refining())


def test_idec_refines_the_codes_toward_their_centres(digits):
    config = refining(epochs=8, refine_epochs=4)
    trainer = Trainer(config, digits)
    for _ in range(4):
        end = trainer.run_epoch()
        assert "train/cluster_kl" not in end.metrics
    codes = encode(trainer.model, digits.train_x, 1000)
    end = trainer.run_epoch()  # the first refining epoch: centres from KMeans' groups of these codes
    assert "train/cluster_kl" in end.metrics and "val/cluster_kl" in end.metrics
    assert end.is_best  # the refined model supersedes the autoencoder's epochs

    def confidence() -> float:
        q = soft_assignment(encode(trainer.model, digits.train_x, 1000), trainer.centres.cpu())
        return q.max(1).values.mean().item()

    first = confidence()
    for _ in range(3):
        trainer.run_epoch()
    assert confidence() > first + 0.01  # the codes gathered around their centres
    assert trainer.centres.shape == (10, 4)
    assert not torch.equal(trainer.centres.cpu(), cluster_means(codes, torch.zeros(len(codes), dtype=torch.long), 10))
    result = trainer.result(1.0)
    model = result.model
    q = soft_assignment(encode(model, digits.test_x, 1000), trainer.best_centres.cpu())
    labels = digits.test_y.numpy()
    assert result.metrics["test/cluster_accuracy"] == pytest.approx(cluster_accuracy(labels, q.argmax(1).numpy()))
    assert result.best_epoch == 8  # selected by val/loss: the last refining epoch


def test_dec_leaves_the_decoder_as_the_autoencoder_left_it(digits):
    config = make_config(epochs=5, clustering={"refinement": "dec", "refine_epochs": 2, "update_interval": 5}, **SMALL)
    decoders = {}

    def keep(end):
        decoders[end.epoch] = {k: v.clone() for k, v in end.model.decoder.state_dict().items()}

    train(config, digits, keep, run_evaluation=False)
    assert all(torch.equal(decoders[3][k], decoders[5][k]) for k in decoders[3])
    assert not all(torch.equal(decoders[2][k], decoders[3][k]) for k in decoders[2])


def test_the_refinement_stops_once_assignments_settle(digits):
    settled = train(refining(epochs=8, refine_epochs=4, tol=0.99), digits, run_evaluation=False)
    assert len(settled.history) == 5  # converged at its first epoch's second update: the run ends with it
    running = train(refining(epochs=8, refine_epochs=4, tol=0.0), digits, run_evaluation=False)
    assert len(running.history) == 8


def test_a_refining_run_resumes_exactly(digits, tmp_path):
    config = refining(epochs=6, refine_epochs=3)
    whole = Trainer(config, digits)
    for _ in range(6):
        whole.run_epoch()
    first = Trainer(config, digits)
    for _ in range(5):
        first.run_epoch()
    first.save(tmp_path / "mid.pt")
    state = load_checkpoint(tmp_path / "mid.pt")  # weights_only: the centres are plain tensors
    assert state["clustering"]["centres"].shape == (10, 4) and state["clustering"]["started"]
    second = Trainer(config, digits)
    second.restore(state)
    second.run_epoch()
    assert without_times(second.history) == without_times(whole.history)
    assert torch.equal(second.centres, whole.centres)
    assert all(torch.equal(a, b) for a, b in zip(second.model.state_dict().values(), whole.model.state_dict().values()))


def without_times(history):
    return [{k: v for k, v in epoch.items() if not k.startswith("time/")} for epoch in history]


def test_val_cluster_metrics_follow_the_chosen_clusterer(digits):
    measured = {}
    for clusterer in ("kmeans", "gmm"):
        config = make_config(epochs=2, clustering={"clusterer": clusterer},
                             **(SMALL | {"evaluation": SMALL["evaluation"] | {"val_metrics": ["val/cluster_ari"]}}))
        result = train(config, digits)
        measured[clusterer] = (result.history[-1]["val/cluster_ari"], result.metrics["test/cluster_ari"])
    assert measured["kmeans"] != measured["gmm"]
    assert all(np.isfinite(value) for pair in measured.values() for value in pair)


def test_encode_and_the_served_model_give_each_input_its_cluster(digits, tmp_path, monkeypatch):
    import pandas as pd

    from aesearch.cli import main
    from aesearch.training.checkpoints import load_trained_model
    from aesearch.tracking.served_model import predict

    trainer = Trainer(refining(epochs=8, refine_epochs=2), digits)
    for _ in range(8):
        end = trainer.run_epoch()
    assert end.is_best
    end.save_checkpoint(tmp_path / "best.pt")
    trained = load_trained_model(tmp_path / "best.pt", digits)
    x = digits.test_x[:50]
    expected = soft_assignment(encode(trained.model, x, 1000), trainer.best_centres.cpu()).argmax(1).numpy()
    assert len(set(expected)) > 1
    monkeypatch.chdir(tmp_path)
    np.save("new.npy", x.numpy())
    assert main(["encode", str(tmp_path / "best.pt"), "--input", "new.npy", "--out", "codes.csv"]) == 0
    table = pd.read_csv("codes.csv")
    assert list(table.columns) == ["z0", "z1", "z2", "z3", "cluster"]
    assert table["cluster"].tolist() == expected.tolist()
    assert predict(trained, x.numpy())["cluster"].tolist() == expected.tolist()
    # the test metric of a refined model is the same assignment, on the test split
    metrics = trainer.result(1.0).metrics
    everything = soft_assignment(encode(trained.model, digits.test_x, 1000), trainer.best_centres.cpu()).argmax(1)
    assert metrics["test/cluster_accuracy"] == pytest.approx(cluster_accuracy(digits.test_y.numpy(), everything.numpy()))


def test_a_run_that_measures_clusters_keeps_centres_and_a_plain_run_none(digits, tmp_path):
    from aesearch.training.checkpoints import load_trained_model
    from aesearch.training.inference import infer

    measured = make_config(epochs=2, **(SMALL | {"evaluation": SMALL["evaluation"] | {"val_metrics": ["val/cluster_ari"]}}))
    trainer = Trainer(measured, digits)
    trainer.run_epoch(), trainer.run_epoch()
    trainer.save(tmp_path / "measured.pt")
    trained = load_trained_model(tmp_path / "measured.pt", digits)
    assert trained.centres.shape == (10, 4)
    clusters = infer(trained.model, digits.test_x[:30], trained.scorer, trained.centres).clusters
    assert clusters is not None and clusters.max() < 10
    plain = Trainer(make_config(epochs=1, **SMALL), digits)
    plain.run_epoch()
    plain.save(tmp_path / "plain.pt")
    assert load_trained_model(tmp_path / "plain.pt", digits).centres is None
