import dataclasses
import pickle

import pytest
import torch

from aesearch.errors import CheckpointError, DivergedError
from aesearch.parts.models import build_model
from aesearch.training.checkpoints import load_checkpoint, save_checkpoint
from aesearch.training.trainer import Trainer, train
from tests.conftest import make_config
from tests.user_data import write_separable_wine

# A VAE fed masked inputs: sampling, corruption and shuffling all draw from the RNG, so resume
# and determinism are tested where they are hardest.
NOISY_VAE = dict(
    epochs=4,
    model={"latent": "gaussian", "hidden_dims": [32], "latent_dim": 4},
    objective={"reconstruction": "bce", "kl": {"schedule": "linear", "warmup_epochs": 2}},
    corruption={"kind": "masking", "level": 0.2},
    evaluation={"iwae_samples": 10, "kmeans_restarts": 1},
)


def _without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}


def test_reports_every_epoch_with_the_documented_metrics(digits):
    ends = []
    result = train(make_config(**NOISY_VAE), digits, reporter=ends.append, run_evaluation=False)
    assert [end.epoch for end in ends] == [1, 2, 3, 4]
    assert set(ends[0].metrics) == {
        "epoch", "train/loss", "train/recon", "train/kl", "val/loss", "val/recon", "val/kl",
        "val/recon_mse", "beta", "lr", "time/epoch_seconds", "model/parameters", "model/latent_dim",
    }
    assert ends[0].metrics["model/latent_dim"] == result.model.latent_dim
    assert ends[0].metrics["model/parameters"] == sum(p.numel() for p in result.model.parameters())
    # linear warm-up over 2 epochs, annealed every step: the epoch means rise to the full beta
    betas = [end.metrics["beta"] for end in ends]
    assert 0.0 < betas[0] < 0.5 < betas[1] < 1.0 and betas[2:] == [1.0, 1.0]
    assert result.history == [end.metrics for end in ends]
    best = min(ends, key=lambda end: end.metrics["val/loss"])
    assert result.best_epoch == best.epoch and ends[0].is_best
    assert result.metrics["best/val/loss"] == best.metrics["val/loss"]


def test_same_seed_gives_the_same_metrics(digits):
    config = make_config(**NOISY_VAE)
    first, second = train(config, digits), train(config, digits)
    assert [_without_timing(m) for m in first.history] == [_without_timing(m) for m in second.history]
    assert _without_timing(first.metrics) == _without_timing(second.metrics)
    other = train(make_config(**{**NOISY_VAE, "seed": 1}), digits, run_evaluation=False)
    assert other.history[-1]["train/loss"] != first.history[-1]["train/loss"]


def test_initial_weights_are_a_function_of_the_seed_alone(digits):
    config = make_config(**NOISY_VAE)
    torch.manual_seed(5)
    first = Trainer(config, digits).model.state_dict()
    torch.rand(1000)  # whatever the caller drew before does not move them
    second = Trainer(config, digits).model.state_dict()
    torch.manual_seed(config.seed)
    seeded = build_model(config.model, digits.spec).state_dict()  # as a global seed would give them
    other = Trainer(make_config(**{**NOISY_VAE, "seed": 1}), digits).model.state_dict()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]) and torch.equal(tensor, seeded[name]), name
    assert not all(torch.equal(tensor, other[name]) for name, tensor in first.items())


def test_training_leaves_the_callers_random_state_and_backend_flags_alone(digits):
    cudnn = torch.backends.cudnn
    torch.manual_seed(7)
    before = torch.get_rng_state()
    flags = cudnn.benchmark, cudnn.deterministic
    trainer = Trainer(make_config(**NOISY_VAE), digits)
    trainer.run_epoch()
    trainer.result(train_seconds=0.0)  # with the evaluation suite
    assert torch.equal(torch.get_rng_state(), before)
    assert (cudnn.benchmark, cudnn.deterministic) == flags


def test_resumed_run_equals_uninterrupted_run(digits, tmp_path):
    config = make_config(**NOISY_VAE)

    def save_after_epoch_two(end):
        if end.epoch == 2:
            end.save_checkpoint(tmp_path / "epoch2.pt")

    uninterrupted = train(config, digits, reporter=save_after_epoch_two)
    resumed = train(config, digits, resume_from=tmp_path / "epoch2.pt")
    assert [_without_timing(m) for m in resumed.history] == [_without_timing(m) for m in uninterrupted.history]
    assert _without_timing(resumed.metrics) == _without_timing(uninterrupted.metrics)
    for name, tensor in uninterrupted.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_checkpoint_holds_what_resuming_and_explaining_need(digits, tmp_path):
    config = make_config(epochs=1, model={"hidden_dims": [16]})
    train(config, digits, reporter=lambda end: end.save_checkpoint(tmp_path / "c.pt"), run_evaluation=False)
    state = load_checkpoint(tmp_path / "c.pt")
    assert state["epoch"] == 1 and state["fingerprint"] == digits.fingerprint
    assert state["config"] == config.model_dump(mode="json")
    assert {"model", "optimizer", "rng", "history", "best"} <= state.keys()
    plain = torch.load(tmp_path / "c.pt", weights_only=True)  # loads with no unpickling of objects
    assert plain["format"] == state["format"]


def test_resume_refuses_other_data(digits, tmp_path):
    config = make_config(epochs=2, model={"hidden_dims": [16]})
    train(config, digits, reporter=lambda end: end.save_checkpoint(tmp_path / "c.pt"), run_evaluation=False)
    other = dataclasses.replace(digits, fingerprint="0" * 16)
    with pytest.raises(CheckpointError, match="dataset fingerprint"):
        train(config, other, resume_from=tmp_path / "c.pt")


@pytest.mark.parametrize(
    "changed, named",
    [
        ({"model": {"hidden_dims": [8]}}, "model.hidden_dims"),
        ({"optimizer": {"lr": 0.5}}, "optimizer.lr"),
        ({"objective": {"contractive_weight": 0.1}}, "objective.contractive_weight"),
        ({"corruption": {"kind": "masking", "level": 0.1}}, "corruption.kind, corruption.level"),
        ({"seed": 3}, "seed"),
    ],
)
def test_resume_refuses_other_training_settings(digits, tmp_path, changed, named):
    config = make_config(epochs=1, model={"hidden_dims": [16]})
    train(config, digits, reporter=lambda end: end.save_checkpoint(tmp_path / "c.pt"), run_evaluation=False)
    other = make_config(**{"epochs": 2, "model": {"hidden_dims": [16]}, **changed})
    with pytest.raises(CheckpointError, match=f"other settings \\({named} differ\\)"):
        train(other, digits, resume_from=tmp_path / "c.pt")


def test_resume_may_change_epochs_runtime_and_evaluation(digits, tmp_path):
    config = make_config(epochs=1, model={"hidden_dims": [16]})
    train(config, digits, reporter=lambda end: end.save_checkpoint(tmp_path / "c.pt"), run_evaluation=False)
    longer = make_config(epochs=2, model={"hidden_dims": [16]}, runtime={"device": "cpu"}, evaluation={"knn_neighbors": 3})
    assert len(train(longer, digits, resume_from=tmp_path / "c.pt", run_evaluation=False).history) == 2


def test_nan_loss_raises_diverged_error(digits):
    poisoned = digits.train_x.clone()
    poisoned[0, 0, 0, 0] = float("nan")
    data = dataclasses.replace(digits, train_x=poisoned)
    with pytest.raises(DivergedError, match="diverged in epoch 1") as caught:
        train(make_config(epochs=3, model={"hidden_dims": [16]}), data)
    assert caught.value.epoch == 1
    assert caught.value.metrics["train/loss"] != caught.value.metrics["train/loss"]  # NaN


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("this code ran while loading",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "aesearch-checkpoint/1", "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match=r"refused to load: .* \(it would call print\)"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", pickle.dumps({"a": 1})])
def test_corrupt_checkpoint_is_one_clear_error(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"bad\.pt") as caught:
        load_checkpoint(path)
    assert "\n" not in str(caught.value)


def test_foreign_torch_file_is_not_a_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an aesearch checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_checkpoint_write_is_atomic(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"config": {}, "epoch": 0, "model": {}, "fingerprint": "x"})
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_stopping_after_an_epoch_gives_exactly_the_first_epochs_of_the_full_run(digits):
    """What an ASHA-stopped trial trained, and what its reproduction trains: the schedule
    (here a cyclical KL ramp) still spans the config's epochs."""
    config = make_config(**{**NOISY_VAE, "objective": {"reconstruction": "bce", "kl": {"schedule": "cyclical",
                                                                                         "cycles": 2}}})
    full = train(config, digits, run_evaluation=False)
    stopped = train(config, digits, run_evaluation=False, stop_after=2)
    assert [_without_timing(m) for m in stopped.history] == [_without_timing(m) for m in full.history[:2]]
    shortened = train(make_config(**{**NOISY_VAE, "epochs": 2, "objective": config.objective.model_dump()}), digits,
                      run_evaluation=False)
    assert shortened.history[1]["beta"] != full.history[1]["beta"]  # a shorter run is not the same thing


def test_pictures_leave_the_callers_randomness_alone_and_repeat(digits):
    from aesearch.training.images import image_grids

    config = make_config(model={"latent": "gaussian", "hidden_dims": [16]}, corruption={"kind": "gaussian", "level": 0.3})
    model = build_model(config.model, digits.spec)
    before = torch.get_rng_state()
    first = image_grids(model, digits.test_x[:8], config)
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(5)  # the caller draws in between: the pictures do not change
    again = image_grids(model, digits.test_x[:8], config)
    assert set(first) == {"reconstructions.png", "prior_samples.png"}
    assert all(torch.equal(first[name], again[name]) for name in first)


def test_a_saturated_selection_metric_keeps_the_epoch_of_lowest_val_loss(tmp_path):
    """AUROC is 1 from the first epoch on (anomalies far from every normal row): a tie on the
    selection metric is broken by val/loss, so the kept weights are not the barely trained epoch 1's,
    alone or packed with another trial (one rule: Trainer.finish_epoch)."""
    from aesearch.packing.fused import train_packed_epoch
    from aesearch.parts.data import DataConfig, load_data

    section = write_separable_wine(tmp_path)
    data = load_data(DataConfig(**section))
    configs = [make_config(epochs=4, seed=seed, data=section, model={"hidden_dims": [16], "latent_dim": 3},
                           optimizer={"batch_size": 32},
                           evaluation={"val_metrics": ["val/anomaly_auroc"], "select_by": "val/anomaly_auroc"})
               for seed in (0, 1)]
    ends = []
    result = train(configs[0], data, reporter=ends.append, run_evaluation=False)
    assert [epoch["val/anomaly_auroc"] for epoch in result.history] == [1.0] * 4  # saturated throughout
    losses = [epoch["val/loss"] for epoch in result.history]
    assert losses[-1] < losses[0]  # it went on learning
    assert result.best_epoch == 1 + losses.index(min(losses)) != 1
    assert result.metrics["best/epoch"] == result.best_epoch and result.metrics["best/val/loss"] == min(losses)
    assert [end.is_best for end in ends] == [loss == min(losses[:i + 1]) for i, loss in enumerate(losses)]

    packed = [Trainer(config, data) for config in configs]
    for _ in range(4):
        train_packed_epoch(packed)
    for trainer, config in zip(packed, configs):
        history = trainer.history
        assert trainer.best_epoch == 1 + min(range(4), key=lambda i: history[i]["val/loss"]) != 1
