"""Learning-rate schedules (optimizer.schedule): each moves the lr as its formula says, epoch by epoch, resumes
exactly from a checkpoint, packs, and refuses settings that are not its own."""

import math

import pytest
import torch

from aesearch.errors import ConfigError
from aesearch.packing.fused import train_packed_epoch
from aesearch.parts.optimizers import SCHEDULES, Staged
from aesearch.training.trainer import Trainer, train
from tests.conftest import make_config

SMALL = {"model": {"hidden_dims": [16], "latent_dim": 4}, "evaluation": {"iwae_samples": 2, "kmeans_restarts": 1}}


def lrs(config, digits) -> list[float]:
    return [epoch["lr"] for epoch in train(config, digits, run_evaluation=False).history]


def scheduled(epochs: int, lr: float = 0.01, **schedule):
    return make_config(epochs=epochs, optimizer={"lr": lr, "schedule": schedule}, **SMALL)


def test_the_staged_schedule_is_the_iwae_papers_stages_of_3_to_the_i_epochs():
    factors = [Staged()(epoch) for epoch in range(121)]
    stages = [0] * 1 + [1] * 3 + [2] * 9 + [3] * 27 + [4] * 81  # stages 0-4: 121 epochs
    assert factors == pytest.approx([10 ** (-stage / 7) for stage in stages])


@pytest.mark.parametrize("schedule, expected", [
    ({"kind": "constant"}, [0.01] * 5),
    ({"kind": "staged"}, [0.01, 0.01 * 10 ** (-1 / 7), 0.01 * 10 ** (-1 / 7), 0.01 * 10 ** (-1 / 7), 0.01 * 10 ** (-2 / 7)]),
    ({"kind": "step", "step_epochs": 2, "factor": 0.5}, [0.01, 0.01, 0.005, 0.005, 0.0025]),
    # warm-up from lr / 3 over 2 epochs, then half a cosine over the 3 epochs left, down to lr * 0.1
    ({"kind": "cosine", "warmup_epochs": 2, "min_factor": 0.1},
     [0.01 / 3, 0.02 / 3] + [0.001 + 0.009 * (1 + math.cos(math.pi * k / 3)) / 2 for k in range(3)]),
])
def test_each_schedule_sets_the_lr_of_each_epoch_by_its_formula(digits, schedule, expected):
    assert lrs(scheduled(5, **schedule), digits) == pytest.approx(expected, rel=1e-6)


def test_reduce_on_plateau_lowers_the_lr_only_after_epochs_without_a_better_validation_loss(digits):
    history = train(scheduled(10, lr=0.2, kind="plateau", factor=0.5, patience=0), digits,
                    run_evaluation=False).history
    assert history[-1]["lr"] < 0.2  # a plateau was met
    best = math.inf
    for epoch, following in zip(history, history[1:]):
        improved = epoch["val/loss"] < best
        best = min(best, epoch["val/loss"])
        assert following["lr"] == pytest.approx(epoch["lr"] * (1.0 if improved else 0.5)), (epoch, following)


@pytest.mark.parametrize("schedule, lr, epochs, saved", [
    ({"kind": "cosine", "warmup_epochs": 1}, 0.05, 5, 2),
    ({"kind": "plateau", "patience": 0, "factor": 0.5}, 0.2, 10, 8),  # its best loss so far goes in the checkpoint (at epoch 8, a fresh one would not cut the lr)
    ({"kind": "staged"}, 0.05, 5, 2),
])
def test_a_resumed_run_follows_the_schedule_as_if_never_stopped(digits, tmp_path, schedule, lr, epochs, saved):
    config = scheduled(epochs, lr=lr, **schedule)

    def save_midway(end):
        if end.epoch == saved:
            end.save_checkpoint(tmp_path / "midway.pt")

    uninterrupted = train(config, digits, reporter=save_midway, run_evaluation=False)
    resumed = train(config, digits, resume_from=tmp_path / "midway.pt", run_evaluation=False)
    timeless = [{k: v for k, v in epoch.items() if not k.startswith("time/")} for epoch in uninterrupted.history]
    assert [{k: v for k, v in epoch.items() if not k.startswith("time/")} for epoch in resumed.history] == timeless
    assert len({epoch["lr"] for epoch in uninterrupted.history}) > 1  # the schedule moved


@pytest.mark.filterwarnings("error")  # torch's 'lr_scheduler.step() before optimizer.step()' too: the pack steps them
def test_members_of_a_pack_each_follow_their_own_schedule_as_when_alone(digits):
    configs = [make_config(epochs=4, seed=seed, optimizer={"lr": 0.01, "schedule": schedule}, **SMALL)
               for seed, schedule in ((0, {"kind": "staged"}), (1, {"kind": "step", "step_epochs": 1, "factor": 0.5}))]
    packed = [Trainer(config, digits) for config in configs]
    for _ in range(4):
        train_packed_epoch(packed)
    for config, trainer in zip(configs, packed):
        alone = Trainer(config, digits)
        for _ in range(4):
            alone.run_epoch()
        assert [e["lr"] for e in trainer.history] == [e["lr"] for e in alone.history]
        for together, by_itself in zip(trainer.history, alone.history):
            assert together["train/loss"] == pytest.approx(by_itself["train/loss"], rel=1e-4)


@pytest.mark.parametrize("schedule, message", [
    ({"kind": "cosine", "patience": 3}, r"optimizer\.schedule\.patience=3 does not apply to the cosine schedule: "
                                        r"it takes warmup_epochs, min_factor"),
    ({"kind": "staged", "factor": 0.5}, r"optimizer\.schedule\.factor=0\.5 does not apply to the staged schedule: "
                                        r"it takes no settings"),
    ({"kind": "cosin"}, r"optimizer\.schedule\.kind='cosin': unknown learning-rate schedule; valid names: "
                        + ", ".join(SCHEDULES.names())),
    ({"kind": "step", "factor": 1.5}, r"optimizer\.schedule\.factor=1\.5: Input should be less than 1"),
])
def test_a_schedule_setting_that_does_not_fit_is_one_line(schedule, message):
    with pytest.raises(ConfigError, match=message):
        make_config(optimizer={"schedule": schedule})


def test_the_lr_in_effect_is_the_optimizers_own():
    """What the packed step reads for each member: the group's lr, which the schedule sets."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    config = scheduled(3, lr=0.1, kind="step", step_epochs=1, factor=0.5).optimizer.schedule
    scheduler = SCHEDULES["step"].build(optimizer, config, 3)
    SCHEDULES["step"].advance(scheduler, 0.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
