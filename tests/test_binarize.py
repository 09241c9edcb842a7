"""data.binarize: the VAE literature's stochastic binarisation, seeded where it must be stable and
drawn afresh where the protocol says so; the NLL is always measured on the same fixed test bits."""

import numpy as np
import pytest
import torch

from aesearch.errors import ConfigError, DataError
from aesearch.packing.fused import pack_key, train_packed_epoch
from aesearch.parts.data import DataConfig, load_data
from aesearch.parts.data.binarize import fixed_bits
from aesearch.training.evaluate import evaluate
from aesearch.training.trainer import Trainer, train
from tests.conftest import make_config
from tests.test_packing import VAE, assert_same_epochs, member


def binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


@pytest.fixture(scope="module")
def loaded() -> dict[str, object]:
    return {kind: load_data(DataConfig(binarize=kind)) for kind in ("none", "dynamic", "static")}


def test_fixed_bits_are_seeded_stable_and_follow_the_grey_levels(digits):
    x = digits.test_x
    bits = fixed_bits(x, "test")
    assert binary(bits) and torch.equal(bits, fixed_bits(x, "test"))  # the same bits every time
    assert not torch.equal(bits, fixed_bits(x, "val"))  # each split its own seed
    assert not torch.equal(bits, (x > 0.5).float())  # not a threshold
    assert bits.mean().item() == pytest.approx(x.mean().item(), abs=0.01)  # P(1) = the grey level
    grey = (x > 0) & (x < 1)
    assert bits[grey].mean().item() == pytest.approx(x[grey].mean().item(), abs=0.01)
    assert torch.equal(fixed_bits(bits, "val"), bits)  # bits stay bits: drawing again changes nothing
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(fixed_bits(x, "test"), bits)


def test_each_protocol_binarises_the_splits_it_names(loaded):
    none, dynamic, static = loaded["none"], loaded["dynamic"], loaded["static"]
    assert not any(binary(t) for t in (none.train_x, none.val_x, none.test_x))
    assert not binary(dynamic.train_x) and binary(dynamic.val_x) and binary(dynamic.test_x)
    assert all(binary(t) for t in (static.train_x, static.val_x, static.test_x))
    assert torch.equal(dynamic.test_x, static.test_x) and torch.equal(dynamic.val_x, static.val_x)
    assert torch.equal(dynamic.test_x, fixed_bits(none.test_x, "test"))
    assert torch.equal(dynamic.train_x, none.train_x)  # dynamic draws its training bits per batch
    assert len({none.fingerprint, dynamic.fingerprint, static.fingerprint}) == 3  # a run knows its bits
    assert load_data(DataConfig(binarize="static")).fingerprint == static.fingerprint


def test_dynamic_training_draws_fresh_bits_from_the_runs_generator(loaded):
    data = loaded["dynamic"]
    config = make_config(**member(VAE, epochs=1, data={"binarize": "dynamic"}))
    first, again = Trainer(config, data), Trainer(config, data)
    batch = data.train_x[:64]
    one, two = first.inputs(batch, training=True), first.inputs(batch, training=True)
    assert binary(one.x) and binary(two.x) and not torch.equal(one.x, two.x)  # afresh each step
    assert torch.equal(again.inputs(batch, training=True).x, one.x)  # from the run's seeded generator
    assert torch.equal(first.inputs(data.val_x[:64]).x, data.val_x[:64])  # validation: the fixed bits
    grey = make_config(**member(VAE, epochs=1))
    assert torch.equal(Trainer(grey, loaded["none"]).inputs(batch, training=True).x, batch)


def test_dynamic_static_and_grey_training_differ_and_repeat(loaded):
    histories = {}
    for kind in ("none", "dynamic", "static"):
        config = make_config(**member(VAE, epochs=2, data={"binarize": kind}))
        histories[kind] = [train(config, loaded[kind], run_evaluation=False).history for _ in range(2)]
        assert_same_epochs(*histories[kind], rel=1e-6)  # the same seed, the same bits, the same run
    losses = {kind: runs[0][-1]["train/loss"] for kind, runs in histories.items()}
    assert len({round(value, 6) for value in losses.values()}) == 3
    assert losses["dynamic"] > losses["none"]  # bits are harder to reconstruct than grey levels


def test_packed_members_draw_their_own_bits_as_they_would_alone(loaded):
    data = loaded["dynamic"]
    configs = [make_config(**member(VAE, epochs=2, data={"binarize": "dynamic"})),
               make_config(**member(VAE, epochs=2, seed=3, data={"binarize": "dynamic"}, optimizer={"lr": 3e-3}))]
    assert pack_key(configs[0]) is not None and pack_key(configs[0]) == pack_key(configs[1])
    trainers = [Trainer(config, data) for config in configs]
    for _ in range(2):
        assert not any(isinstance(end, Exception) for end in train_packed_epoch(trainers))
    for trainer, config in zip(trainers, configs):
        assert_same_epochs(trainer.history, train(config, data, run_evaluation=False).history)


def test_the_nll_is_measured_on_the_same_fixed_test_bits_whatever_the_training_bits(loaded):
    config = make_config(**member(VAE, epochs=2))
    model = train(config, loaded["none"], run_evaluation=False).model
    settings = config.evaluation
    on_grey, on_bits = evaluate(model, loaded["none"], settings), evaluate(model, loaded["dynamic"], settings)
    assert on_grey["test/nll"] == pytest.approx(on_bits["test/nll"], rel=1e-6)
    assert on_grey["test/elbo"] == pytest.approx(on_bits["test/elbo"], rel=1e-6)
    assert on_grey["test/recon_mse"] != pytest.approx(on_bits["test/recon_mse"], rel=1e-3)  # the rest: as given
    thresholded = loaded["none"].__class__(**{**loaded["none"].__dict__,
                                              "test_x": (loaded["none"].test_x > 0.5).float()})
    assert evaluate(model, thresholded, settings)["test/nll"] < on_grey["test/nll"]  # the easier, wrong set


def test_binarising_data_outside_zero_one_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"data.binarize='dynamic' needs values in \[0, 1\].*scale='minmax'"):
        make_config(data={"path": "rows.csv", "binarize": "dynamic"})
    path = tmp_path / "wide.npy"
    np.save(path, np.random.default_rng(0).normal(size=(60, 5)).astype(np.float32))
    with pytest.raises(DataError, match=r"data.binarize='static': wide.npy has values outside \[0, 1\]"):
        load_data(DataConfig(path=str(path), binarize="static"))
    with pytest.raises(ConfigError, match=r"data.binarize"):
        make_config(data={"binarize": "threshold"})
