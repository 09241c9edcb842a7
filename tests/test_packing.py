"""Packed training (aesearch.packing.fused) gives each member the epochs it would have trained alone."""

import sys
from pathlib import Path

import pytest
import torch

from aesearch.errors import DivergedError
from aesearch.examples import wine_table
from aesearch.packing.fused import pack_groups, pack_key, train_group_epoch, train_packed_epoch, why_not_packable
from aesearch.parts.data import DataConfig, load_data
from aesearch.parts.data.spec import IMAGE, VECTOR
from aesearch.parts.models import ARCHITECTURES
from aesearch.parts.objectives import Objective
from aesearch.parts.optimizers import OPTIMIZERS, Optimizer
from aesearch.training.checkpoints import load_checkpoint
from aesearch.training.trainer import Trainer, train
from tests.conftest import REPO, make_config
from tests.searching import TOGETHER, on_shared_ray, run

VAE = dict(
    model={"latent": "gaussian", "hidden_dims": [32], "latent_dim": 4},
    objective={"reconstruction": "bce", "kl": {"schedule": "linear", "warmup_epochs": 2}},
    corruption={"kind": "masking", "level": 0.2},
    evaluation={"iwae_samples": 10, "kmeans_restarts": 1},
)


def member(base: dict, **changes) -> dict:
    """`base` with per-member settings changed (sections merged one level deep)."""
    merged = dict(base)
    for section, value in changes.items():
        merged[section] = {**merged.get(section, {}), **value} if isinstance(value, dict) else value
    return merged


# Groups of members that share a pack: each member differs only in per-member settings.
PACKS = {
    "vae_masking_adam": [
        member(VAE, epochs=3),
        member(VAE, epochs=3, seed=1, optimizer={"lr": 3e-3}, corruption={"level": 0.4},
               objective={"kl": {"beta": 4.0, "schedule": "cyclical", "cycles": 2}}),
    ],
    "sparse_kl_adam_and_adamw": [
        dict(epochs=3, model={"hidden_dims": [32], "latent_dim": 8}, objective={"sparsity": {"kind": "kl", "rho": 0.05, "weight": 0.1}},
             optimizer={"name": "adamw", "weight_decay": 1e-2}, corruption={"kind": "gaussian", "level": 0.2}),
        dict(epochs=3, seed=3, model={"hidden_dims": [32], "latent_dim": 8}, objective={"sparsity": {"kind": "kl", "rho": 0.2, "weight": 1.0}},
             optimizer={"weight_decay": 1e-4, "lr": 2e-3}, corruption={"kind": "uniform", "level": 0.4}),  # Adam, other noise
    ],
    "contractive_closed_form": [
        dict(epochs=3, model={"hidden_dims": [], "latent_dim": 8, "code_activation": "sigmoid"}, objective={"contractive_weight": 0.1}),
        dict(epochs=3, seed=2, model={"hidden_dims": [], "latent_dim": 8, "code_activation": "sigmoid"},
             objective={"contractive_weight": 0.01}, optimizer={"weight_decay": 1e-3, "lr": 3e-3}),
    ],
    "contractive_estimator": [  # hidden layers: no closed form; d code / d x along each member's directions
        dict(epochs=2, model={"hidden_dims": [32], "latent_dim": 6}, objective={"contractive_weight": 0.1,
             "contractive_projections": 2}),
        dict(epochs=2, seed=8, model={"hidden_dims": [32], "latent_dim": 4}, objective={"contractive_weight": 1.0,
             "contractive_projections": 2, "reconstruction": "bce"}, corruption={"kind": "gaussian", "level": 0.2}),
    ],
    "conv_salt_pepper_other_widths": [
        dict(epochs=2, model={"architecture": "conv", "conv_channels": [8, 16], "latent_dim": 6},
             corruption={"kind": "salt_pepper", "level": 0.1}),
        dict(epochs=2, seed=5, model={"architecture": "conv", "conv_channels": [8, 16], "latent_dim": 3},
             corruption={"kind": "salt_pepper", "level": 0.3}, optimizer={"lr": 5e-4}),
    ],
    # Members of other latent widths (padded to the widest), reconstruction losses and sparsity penalties.
    "dense_widths_losses_penalties": [
        dict(epochs=3, model={"hidden_dims": [32], "latent_dim": 8}),
        dict(epochs=3, seed=1, model={"hidden_dims": [32], "latent_dim": 3}, objective={"reconstruction": "bce"},
             optimizer={"name": "adamw", "weight_decay": 1e-2}),
        dict(epochs=3, seed=2, model={"hidden_dims": [32], "latent_dim": 5}, objective={"reconstruction": "l1",
             "sparsity": {"kind": "l1", "weight": 0.05}}, corruption={"kind": "masking", "level": 0.3}),
    ],
    "vae_widths_losses": [
        member(VAE, epochs=2),
        member(VAE, epochs=2, seed=4, model={"latent_dim": 9}, objective={"reconstruction": "mse", "kl": {"beta": 0.5}}),
    ],
    # Members that measure what they are for every epoch (a use's metrics on the fixed validation subset,
    # the best epoch chosen by one of them): the packed member's use metrics are its own model's.
    "vae_use_metrics": [
        member(VAE, epochs=2, evaluation={"val_metrics": ["val/cluster_ari", "val/knn_accuracy", "val/nll"],
                                          "val_max_samples": 200, "select_by": "val/nll"}),
        member(VAE, epochs=2, seed=7, model={"latent_dim": 6}, objective={"kl": {"beta": 4.0}},
               evaluation={"val_metrics": ["val/cluster_nmi", "val/elbo"], "val_max_samples": 200,
                           "select_by": "val/cluster_nmi"}),
    ],
    "sparse_kl_widths": [  # sigmoid codes: a padded unit would be 0.5 and its rho_hat far from rho, but is masked
        dict(epochs=2, model={"hidden_dims": [32], "latent_dim": 8}, objective={"sparsity": {"kind": "kl", "rho": 0.05}}),
        dict(epochs=2, seed=6, model={"hidden_dims": [32], "latent_dim": 2}, objective={"sparsity": {"kind": "kl", "rho": 0.2}}),
    ],
}

COMPARED = ("train/loss", "val/loss", "val/recon_mse")


def assert_same_epochs(packed: list[dict], alone: list[dict], rel: float = 1e-4, keys: tuple[str, ...] | None = None) -> None:
    """The same epochs with the same metrics (all but timings, or `keys`), within float rounding."""
    assert [m["epoch"] for m in packed] == [m["epoch"] for m in alone]
    for got, expected in zip(packed, alone):
        if keys is None:
            assert set(got) == set(expected)
        for name in keys or [name for name in expected if not name.startswith("time/")]:
            assert got[name] == pytest.approx(expected[name], rel=rel, abs=1e-7), (got["epoch"], name)


def report_epoch(report: dict) -> dict:
    return {"epoch": float(report["epoch"]), **{name: report[name] for name in COMPARED}}


def train_alone(config, data) -> list[dict]:
    return train(config, data, run_evaluation=False).history


@pytest.mark.parametrize("name", sorted(PACKS))
def test_packed_members_train_as_they_would_alone(name, digits):
    configs = [make_config(**sections) for sections in PACKS[name]]
    assert pack_key(configs[0]) is not None and len({pack_key(config) for config in configs}) == 1
    trainers = [Trainer(config, digits) for config in configs]
    for _ in range(configs[0].epochs):
        ends = train_packed_epoch(trainers)
        assert all(not isinstance(end, Exception) for end in ends)
    for trainer, config in zip(trainers, configs):
        alone = train_alone(config, digits)
        assert_same_epochs(trainer.history, alone)
        assert trainer.history[0]["train/loss"] != trainer.history[-1]["train/loss"]  # it trained
    # the members are not one model twice: their own settings gave them their own results
    assert trainers[0].history[-1]["val/loss"] != pytest.approx(trainers[1].history[-1]["val/loss"], rel=1e-3)



# --- vectors: the rows of a real table, packed by the same rules as images ---------------------


@pytest.fixture
def wine(tmp_path):
    """The wine table (13 numeric columns, a categorical `region`, anomalies in `Class`) written as
    a CSV file and loaded as a vector dataset: (the data section that names it, the data)."""
    path = tmp_path / "wine.csv"
    wine_table().to_csv(path, index=False)
    section = {"path": str(path), "label": "Class", "anomaly": [1]}
    data = load_data(DataConfig(**section))
    assert data.spec.modality == VECTOR and data.spec.shape == (15,)  # 13 numeric values + region's one-hot pair
    assert data.spec.categorical_groups and not data.spec.unit_range  # standardised: real-valued
    return section, data


# ~90 normal training rows: batches of 32 give each epoch several steps, the last one short.
VECTOR_VAE = dict(
    model={"latent": "gaussian", "hidden_dims": [16], "latent_dim": 4},
    objective={"reconstruction": "mixed", "kl": {"schedule": "linear", "warmup_epochs": 2}},
    corruption={"kind": "swap", "level": 0.2},
    optimizer={"batch_size": 32},
)

# Groups of vector members that share a pack, as PACKS: each differs only in per-member settings.
VECTOR_PACKS = {
    "vector_dense_lrs_widths_losses_noises": [
        dict(epochs=4, model={"hidden_dims": [16], "latent_dim": 6}, optimizer={"batch_size": 32},
             corruption={"kind": "swap", "level": 0.2}),  # mse
        dict(epochs=4, seed=1, model={"hidden_dims": [16], "latent_dim": 3}, objective={"reconstruction": "mixed"},
             optimizer={"batch_size": 32, "lr": 3e-3}, corruption={"kind": "masking", "level": 0.3}),
        dict(epochs=4, seed=2, model={"hidden_dims": [16], "latent_dim": 4},
             objective={"reconstruction": "mixed", "sparsity": {"kind": "l1", "weight": 0.05}},
             optimizer={"name": "adamw", "batch_size": 32, "lr": 5e-3, "weight_decay": 1e-2}),  # no corruption
    ],
    "vector_vae_widths_losses_noises": [
        member(VECTOR_VAE, epochs=3),
        member(VECTOR_VAE, epochs=3, seed=1, model={"latent_dim": 7}, optimizer={"lr": 3e-3},
               objective={"reconstruction": "mse", "kl": {"beta": 0.5, "schedule": "cyclical", "cycles": 2}},
               corruption={"kind": "masking", "level": 0.3}),
    ],
    "vector_contractive_estimator": [  # hidden layers: d code / d x along each member's directions
        dict(epochs=3, model={"hidden_dims": [16], "latent_dim": 5}, optimizer={"batch_size": 32},
             objective={"contractive_weight": 0.1, "contractive_projections": 2}),
        dict(epochs=3, seed=4, model={"hidden_dims": [16], "latent_dim": 2}, optimizer={"batch_size": 32, "lr": 3e-3},
             objective={"contractive_weight": 1.0, "contractive_projections": 2, "reconstruction": "mixed"},
             corruption={"kind": "swap", "level": 0.1}),
    ],
}


@pytest.mark.parametrize("name", sorted(VECTOR_PACKS))
def test_packed_vector_members_train_as_they_would_alone(name, wine):
    table, data = wine
    configs = [make_config(**sections, data=table) for sections in VECTOR_PACKS[name]]
    assert pack_key(configs[0]) is not None and len({pack_key(config) for config in configs}) == 1
    trainers = [Trainer(config, data) for config in configs]
    for _ in range(configs[0].epochs):
        ends = train_packed_epoch(trainers)
        assert all(not isinstance(end, Exception) for end in ends)
    for trainer, config in zip(trainers, configs):
        alone = train_alone(config, data)
        assert_same_epochs(trainer.history, alone)
        assert trainer.history[0]["train/loss"] != trainer.history[-1]["train/loss"]  # it trained
    # the members are not one model twice: their own settings gave them their own results
    assert trainers[0].history[-1]["val/loss"] != pytest.approx(trainers[1].history[-1]["val/loss"], rel=1e-3)


def test_vector_and_image_models_never_share_a_pack_and_vectors_follow_the_image_rules(wine, digits):
    table, data = wine
    assert digits.spec.modality == IMAGE
    model = {"hidden_dims": [32], "latent_dim": 4}
    vector = make_config(name="vector", data=table, model=model)
    image = make_config(name="image", model=model)  # the same model section, on digits' 8x8 images
    assert None not in (pack_key(vector), pack_key(image)) and pack_key(vector) != pack_key(image)

    # What differs per member for images differs per member for vectors ...
    same = make_config(name="other", seed=9, epochs=50, data=table, model={**model, "latent_dim": 9},
                       objective={"reconstruction": "mixed", "sparsity": {"kind": "l1"}},
                       corruption={"kind": "swap", "level": 0.3}, optimizer={"name": "adamw", "lr": 0.01},
                       evaluation={"iwae_samples": 3})
    assert pack_key(same) == pack_key(vector)
    # ... and what must be shared for images must be shared for vectors, the table read alike too.
    for different in [
        dict(model={"hidden_dims": [16], "latent_dim": 4}),
        dict(model={**model, "latent": "gaussian"}),
        dict(model={**model, "code_activation": "sigmoid"}),
        dict(model={**model, "activation": "gelu"}),
        dict(model=model, optimizer={"batch_size": 64}),
        dict(model=model, objective={"contractive_weight": 0.1}),
        dict(model=model, data={**table, "split_seed": 1}),
        dict(model=model, data={**table, "scale": "minmax"}),
        dict(model=model, data={**table, "features": ["alcohol", "ash", "region"]}),  # another input width
    ]:
        assert pack_key(make_config(**{"data": table, **different})) != pack_key(vector), different

    configs = {"v1": vector, "i1": image, "v2": same, "i2": make_config(seed=1, model=model)}
    assert sorted(pack_groups(configs, pack=4)) == sorted([["v1", "v2"], ["i1", "i2"]])
    trainers = [Trainer(vector, data), Trainer(image, digits)]
    with pytest.raises(ValueError, match="'vector' and 'image' differ"):
        train_packed_epoch(trainers)
    assert all(trainer.epoch == 0 and trainer.best_epoch == 0 for trainer in trainers)


def test_attention_on_vectors_is_not_packed_and_trains_alone(wine):
    """The attention architecture reads a table one token per column; it says packs=False for
    vectors as for images: its trials are never packed, and each trains its own epochs."""
    table, data = wine
    assert not ARCHITECTURES["attention"].packs
    attention = {"architecture": "attention", "embed_dim": 16, "heads": 2, "depth": 1, "latent_dim": 4}
    configs = {name: make_config(name=name, seed=seed, epochs=2, data=table, model=attention,
                                 optimizer={"batch_size": 32}) for seed, name in enumerate("ab")}
    for config in configs.values():
        assert pack_key(config) is None and "model.architecture='attention'" in why_not_packable(config)
    dense = {name: make_config(name=name, seed=seed, data=table, model={"hidden_dims": [16], "latent_dim": 4})
             for seed, name in enumerate("cd")}
    assert sorted(pack_groups({**configs, **dense}, pack=4)) == sorted([["a"], ["b"], ["c", "d"]])

    trainers = [Trainer(config, data) for config in configs.values()]
    with pytest.raises(ValueError, match="trial 'a' cannot be packed: model.architecture='attention'"):
        train_packed_epoch(trainers)
    assert all(trainer.epoch == 0 for trainer in trainers)
    for _ in range(2):  # its group of one: the trainer's own epoch
        assert train_group_epoch(trainers[:1])[0].epoch == trainers[0].epoch
    assert_same_epochs(trainers[0].history, train_alone(configs["a"], data))

def test_members_join_and_leave_at_epoch_boundaries_and_keep_their_own_checkpoints(digits, tmp_path):
    first = make_config(**member(VAE, epochs=4))
    second = make_config(**member(VAE, epochs=4, seed=7, optimizer={"lr": 2e-3}))
    early, late = Trainer(first, digits), Trainer(second, digits)
    train_packed_epoch([early])  # alone in its pack for one epoch
    train_packed_epoch([early, late])  # the second joins at its epoch 1, the first's epoch 2
    ends = train_packed_epoch([late, early])  # any order
    ends[1].save_checkpoint(tmp_path / "early.pt")  # the first leaves after 3 epochs (an early stop)
    train_packed_epoch([late])
    assert [m["epoch"] for m in early.history] == [1, 2, 3] and [m["epoch"] for m in late.history] == [1, 2, 3]

    assert_same_epochs(early.history, train_alone(first, digits)[:3])
    assert_same_epochs(late.history, train_alone(second, digits)[:3])
    # the member's checkpoint is an ordinary one: training resumes from it, alone, as if never packed
    resumed = train(first, digits, resume_from=tmp_path / "early.pt", run_evaluation=False)
    assert_same_epochs(resumed.history, train_alone(first, digits))
    state = load_checkpoint(tmp_path / "early.pt")
    assert state["epoch"] == 3 and state["optimizer"]["state"]  # Adam's moments went back to the member


def test_a_diverging_member_ends_alone(digits):
    steady = make_config(**member(VAE, epochs=2))
    wild = make_config(**member(VAE, epochs=2, seed=1, optimizer={"lr": 10.0}))  # the VAE's variance overflows
    trainers = [Trainer(steady, digits), Trainer(wild, digits)]
    ends = train_packed_epoch(trainers)
    assert isinstance(ends[1], DivergedError) and not isinstance(ends[0], Exception)
    train_packed_epoch(trainers[:1])  # the pack goes on without it
    assert_same_epochs(trainers[0].history, train_alone(steady, digits))


def test_pack_key_separates_what_cannot_share_a_step():
    base = make_config(model={"hidden_dims": [64, 32], "latent_dim": 8}, corruption={"kind": "gaussian", "level": 0.1})
    same = make_config(
        name="other", seed=9, epochs=50, model={"hidden_dims": [64, 32], "latent_dim": 3},
        corruption={"kind": "masking", "level": 0.5}, optimizer={"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
        evaluation={"iwae_samples": 3}, objective={"reconstruction": "bce", "sparsity": {"kind": "l1"}},
    )
    assert pack_key(base) == pack_key(same)
    for different in [
        dict(model={"hidden_dims": [64, 16], "latent_dim": 8}, corruption={"kind": "gaussian", "level": 0.1}),
        dict(model={"hidden_dims": [64, 32], "latent_dim": 8, "latent": "gaussian"}, corruption={"kind": "gaussian", "level": 0.1}),
        dict(model={"hidden_dims": [64, 32], "latent_dim": 8, "code_activation": "sigmoid"}, corruption={"kind": "gaussian", "level": 0.1}),
        dict(model={"hidden_dims": [64, 32], "latent_dim": 8, "activation": "gelu"}, corruption={"kind": "gaussian", "level": 0.1}),
        dict(model={"hidden_dims": [64, 32], "latent_dim": 8}, corruption={"kind": "gaussian", "level": 0.1}, optimizer={"batch_size": 64}),
        dict(model={"hidden_dims": [64, 32], "latent_dim": 8}, corruption={"kind": "gaussian", "level": 0.1}, data={"split_seed": 1}),
    ]:
        assert pack_key(make_config(**different)) != pack_key(base), different

    # A contractive term is per member in weight, but whether it exists and how it is estimated is shared.
    contractive = dict(model={"hidden_dims": [64, 32], "latent_dim": 8}, corruption={"kind": "gaussian", "level": 0.1})
    weighted = make_config(**contractive, objective={"contractive_weight": 0.1})
    assert pack_key(weighted) == pack_key(make_config(**contractive, objective={"contractive_weight": 1.0}))
    assert pack_key(weighted) != pack_key(base)
    assert pack_key(weighted) != pack_key(make_config(**contractive, objective={"contractive_weight": 0.1,
                                                                                  "contractive_projections": 2}))

    attention = make_config(model={"architecture": "attention", "patch_size": 4})
    assert pack_key(attention) is None and "attention" in why_not_packable(attention)
    assert why_not_packable(base) is None and why_not_packable(weighted) is None


def test_a_pack_refuses_members_that_cannot_share_a_step(digits):
    one = Trainer(make_config(model={"hidden_dims": [32]}), digits)
    other = Trainer(make_config(name="wider", model={"hidden_dims": [48]}), digits)
    with pytest.raises(ValueError, match="'autoencoder' and 'wider' differ"):
        train_packed_epoch([one, other])
    assert one.epoch == 0 and other.epoch == 0 and one.best_epoch == 0


def test_a_term_added_to_the_objective_is_in_the_packed_loss(digits, monkeypatch):
    """The packed step has no loss of its own: a term that Objective gains (here the code's
    squared norm, weighed 0.5) is trained and reported by packed members exactly as alone."""
    configs = [make_config(epochs=2, model={"hidden_dims": [32], "latent_dim": 6}),
               make_config(epochs=2, seed=1, model={"hidden_dims": [32], "latent_dim": 3},
                           objective={"reconstruction": "bce", "sparsity": {"kind": "l1", "weight": 0.1}})]
    without = train_alone(configs[0], digits)
    names, terms_with, weights = Objective.names, Objective.terms_with, Objective.weights

    def with_code_norm(self, model, x, output, *rest):
        return {**terms_with(self, model, x, output, *rest), "code_norm": output.latent.code.float().pow(2).sum(1).mean()}

    monkeypatch.setattr(Objective, "names", lambda self, choice: [*names(self, choice), "code_norm"])
    monkeypatch.setattr(Objective, "terms_with", with_code_norm)
    monkeypatch.setattr(Objective, "weights", lambda self, beta: {**weights(self, beta), "code_norm": 0.5})
    trainers = [Trainer(config, digits) for config in configs]
    for _ in range(2):
        assert all(not isinstance(end, Exception) for end in train_packed_epoch(trainers))
    for trainer, config in zip(trainers, configs):
        assert_same_epochs(trainer.history, train_alone(config, digits))
        assert trainer.history[-1]["train/code_norm"] > 0
    assert trainers[0].history[-1]["train/loss"] != pytest.approx(without[-1]["train/loss"], rel=1e-3)  # it counted


def test_an_optimizer_without_a_packed_update_trains_alone_and_is_named(digits, monkeypatch):
    """Whether an optimiser packs is the registry's to say (Optimizer.packed); one that cannot is
    refused by name, and its trials train alone."""
    def sgd(params, lr, weight_decay, fused):
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)

    monkeypatch.setitem(OPTIMIZERS._parts, "sgd", Optimizer(sgd))
    configs = {name: make_config(name=name, optimizer={"name": "sgd"}) for name in ("a", "b")}
    reason = why_not_packable(configs["a"])
    assert reason is not None and "optimizer.name='sgd'" in reason
    assert pack_key(configs["a"]) is None
    assert sorted(pack_groups(configs, pack=4)) == [["a"], ["b"]]
    trainers = [Trainer(config, digits) for config in configs.values()]
    with pytest.raises(ValueError, match="trial 'a' cannot be packed: optimizer.name='sgd'"):
        train_packed_epoch(trainers)
    assert all(trainer.epoch == 0 for trainer in trainers)
    assert train_group_epoch(trainers[:1])[0].epoch == 1  # its group of one: the trainer's own epoch
    assert why_not_packable(make_config(optimizer={"name": "adamw"})) is None  # the registered ones pack


PACKED_SPACE = """
name: packed
data: {name: digits}
base:
  model: {hidden_dims: [32]}
  optimizer: {batch_size: 64}
  evaluation: {iwae_samples: 5, kmeans_restarts: 1}
space:
  model.latent_dim: {type: int, low: 2, high: 12}
  objective.reconstruction: {type: categorical, choices: [mse, bce]}
  corruption.kind: {type: categorical, choices: [none, gaussian]}
  sigma: {path: corruption.level, type: float, low: 0.05, high: 0.5, when: {corruption.kind: gaussian}}
  optimizer.lr: {type: float, low: 0.0001, high: 0.01, log: true}
objective: {metric: val/recon_mse, mode: min}
budget: {num_samples: 8, max_epochs: 6, grace_period: 2, reduction_factor: 2}
resources: {cpu: 1}
seed: 0
"""


def packed_space(folder: Path) -> Path:
    space = folder / "packed.yaml"
    space.write_text(PACKED_SPACE)
    return space


TOGETHER["packed"] = on_shared_ray(packed_space, "--pack", "4")  # run with other modules' searches


def test_a_packed_search_keeps_every_trial_its_own_and_trains_each_as_alone(together, digits, tmp_path):
    """`--pack 4`: trials train in a pack server, fused when they share a shape; each is still its
    own Tune trial (ASHA stops it alone) and its own MLflow run, and its epochs are those it
    would have trained alone, though members joined and left the pack as the search went."""
    from mlflow import MlflowClient

    from tests.searching import tracking_uri, trial_reports

    folder, done = together["packed"]
    storage = folder / "results"
    assert done.returncode == 0, done.stderr[-3000:]

    reports = trial_reports(storage / "packed")
    assert len(reports) == 8
    fused = [r for lines in reports.values() for r in lines if r.get("pack/members", 0) >= 2]
    assert fused, "no epoch was trained fused with another trial"
    epochs = {trial: int(lines[-1]["epoch"]) for trial, lines in reports.items()}
    assert 6 in epochs.values() and min(epochs.values()) < 6  # ASHA stopped some trials alone

    client = MlflowClient(tracking_uri(storage))
    experiment_id = client.get_experiment_by_name("packed").experiment_id
    runs = client.search_runs([experiment_id], filter_string="tags.`aesearch.role` = 'trial'")
    assert sorted(r.data.tags["aesearch.trial_id"] for r in runs) == sorted(reports)
    for trial_run in runs:
        trial = trial_run.data.tags["aesearch.trial_id"]
        assert trial_run.info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(trial_run.info.run_id, "val/recon_mse"))
        assert steps == list(range(1, epochs[trial] + 1)), trial
        if epochs[trial] < 6:
            continue
        # A completed trial's own checkpoint: its config, trained alone here, gives the same epochs.
        best = client.download_artifacts(trial_run.info.run_id, "checkpoints/best.pt", str(tmp_path / trial))
        state = load_checkpoint(best)
        assert state["fingerprint"] == digits.fingerprint
        config = make_config(**{**state["config"], "runtime": {"device": "cpu"}})
        alone = train_alone(config, digits)
        assert_same_epochs([report_epoch(r) for r in reports[trial]], alone, keys=COMPARED)


def test_pack_groups_put_one_shape_together_up_to_the_pack_size_and_the_unpackable_alone():
    small = [make_config(seed=i, model={"hidden_dims": [32]}) for i in range(5)]
    wide = make_config(model={"hidden_dims": [64]})
    attention = make_config(model={"architecture": "attention", "patch_size": 4})
    configs = {"a": small[0], "w": wide, "b": small[1], "t": attention, "c": small[2], "d": small[3], "e": small[4]}
    assert sorted(pack_groups(configs, pack=2)) == sorted([["a", "b"], ["c", "d"], ["e"], ["w"], ["t"]])
    assert sorted(pack_groups(configs, pack=8)) == sorted([["a", "b", "c", "d", "e"], ["w"], ["t"]])


SILENT_MEMBER = """
import sys
import ray
from aesearch.parts.data import load_data
from aesearch.packing.server import PackServer
from tests.conftest import make_config
from tests.test_packing import VAE, member

ray.init(address=sys.argv[1])  # the Ray instance the tests share
data = load_data(make_config().data)
server = PackServer.remote(data, 2, 0.0, silent_s=0.5)
config = make_config(**member(VAE, epochs=3)).model_dump(mode="json")
ray.get([server.join.remote(name, config, None) for name in ("steady", "lost")])
replies = [ray.get(server.next_epoch.remote("steady")) for _ in range(3)]  # "lost" never asks
print("epochs", [reply.epoch for reply in replies], "members", replies[-1].metrics["pack/members"])
for name in ("lost", "never joined"):
    try:
        ray.get(server.next_epoch.remote(name), timeout=60)
        print(name, "answered")
    except ray.exceptions.RayTaskError as error:
        print(name, "refused:", str(error).strip().splitlines()[-1])
ray.shutdown()
"""


def test_a_pack_server_drops_a_silent_member_and_says_so_when_it_comes_back(ray_env, ray_address):
    """A member whose trial process died without leaving stops holding up the rounds of the others;
    asking again after it was dropped fails with a clear error (its retry joins again), never hangs."""
    done = run([sys.executable, "-c", SILENT_MEMBER, ray_address], ray_env, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "epochs [1, 2, 3] members 1.0" in lines  # it trained on, without the silent member
    for name in ("lost", "never joined"):
        line = next(line for line in lines if line.startswith(name))
        assert "refused:" in line and f"trial {name} is no longer a member of this pack server" in line, line
