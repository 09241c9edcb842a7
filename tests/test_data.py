import struct

import numpy as np
import pytest
import torch

from aesearch.errors import DataError
from aesearch.parts.data import DATASETS, DataConfig, default_data_dir, load_data


def test_digits_splits_are_disjoint_and_cover_the_training_part(digits):
    assert digits.train_x.shape[1:] == (1, 8, 8)
    assert digits.train_x.min() >= 0 and digits.train_x.max() <= 1
    n_train_part = len(digits.train_x) + len(digits.val_x)
    assert n_train_part + len(digits.test_x) == 1797
    assert len(digits.val_x) == round(0.1 * n_train_part)
    rows = {tuple(row.tolist()) for row in torch.cat([digits.train_x, digits.val_x]).flatten(1)}
    test_rows = {tuple(row.tolist()) for row in digits.test_x.flatten(1)}
    assert len(rows & test_rows) <= 5  # digits has a few exact duplicate images, nothing more


def test_split_is_deterministic_and_follows_the_split_seed():
    a, b = load_data(DataConfig()), load_data(DataConfig())
    assert torch.equal(a.val_x, b.val_x) and a.fingerprint == b.fingerprint
    other = load_data(DataConfig(split_seed=1))
    assert not torch.equal(a.val_x, other.val_x)
    assert torch.equal(a.test_x, other.test_x)  # the test split never moves
    assert other.fingerprint != a.fingerprint


def test_fingerprint_changes_when_the_data_changes():
    a = load_data(DataConfig())
    assert load_data(DataConfig(max_train_samples=100)).fingerprint != a.fingerprint
    assert load_data(DataConfig(val_fraction=0.2)).fingerprint != a.fingerprint


def test_an_anomaly_class_is_held_out_of_training_but_kept_in_validation_and_test():
    data = load_data(DataConfig(anomaly=[3]))
    assert (data.train_y != 3).all()
    assert (data.val_y == 3).any() and (data.test_y == 3).any()
    assert data.spec.anomalies == ("3",) and data.spec.anomaly_codes == [3]
    assert len(data.normal_val_x) == int((data.val_y != 3).sum()) < len(data.val_x)


def test_a_one_class_split_trains_on_the_normal_class_alone_and_tests_on_every_class(digits):
    """Ruff et al.'s protocol (benchmarks/quality.py one-class): one digit normal, the nine others anomalous."""
    data = load_data(DataConfig(anomaly=[d for d in range(10) if d != 4]))
    assert set(data.train_y.tolist()) == {4}
    assert len(data.train_x) == int((torch.cat([digits.train_y, digits.val_y]) == 4).sum()) - int((data.val_y == 4).sum())
    assert torch.equal(data.test_x, digits.test_x) and set(data.test_y.tolist()) == set(range(10))
    assert data.spec.is_anomaly(data.test_y).tolist() == (data.test_y != 4).tolist()
    assert set(data.val_y.tolist()) == set(range(10)) and len(data.normal_val_x) == int((data.val_y == 4).sum())


def test_max_train_samples_limits_training_only(digits):
    data = load_data(DataConfig(max_train_samples=50))
    assert len(data.train_x) == 50
    assert len(data.val_x) == len(digits.val_x)


def test_data_moves_to_a_device_whole(digits):
    """Every tensor goes (the meta device stands for a GPU on a machine without one), shapes and all; what is
    not a tensor stays; the original stays where it was."""
    from dataclasses import fields

    moved = digits.to("meta")
    tensors = [f.name for f in fields(digits) if isinstance(getattr(digits, f.name), torch.Tensor)]
    assert {"train_x", "val_x", "test_x", "train_y", "val_y", "test_y"} <= set(tensors)
    for name in tensors:
        before, after = getattr(digits, name), getattr(moved, name)
        assert after.device == torch.device("meta") and after.shape == before.shape, name
        assert before.device == torch.device("cpu"), name
    assert moved.device == torch.device("meta")
    assert moved.fingerprint == digits.fingerprint and moved.spec == digits.spec


def _write_idx(path, array: np.ndarray):
    magic = {np.dtype(np.uint8): 0x08}[array.dtype]
    header = struct.pack(">HBB", 0, magic, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def test_mnist_loads_through_torchvision_from_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    train_labels = rng.integers(0, 10, 30, dtype=np.uint8)
    _write_idx(raw / "train-images-idx3-ubyte", train_images)
    _write_idx(raw / "train-labels-idx1-ubyte", train_labels)
    _write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (7, 28, 28), dtype=np.uint8))
    _write_idx(raw / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 7, dtype=np.uint8))

    data = load_data(DataConfig(name="mnist", val_fraction=0.2), data_dir=tmp_path)
    assert data.train_x.shape == (24, 1, 28, 28) and data.val_x.shape == (6, 1, 28, 28)
    assert data.test_x.shape == (7, 1, 28, 28)
    # every loaded image is one of the written ones, scaled to [0, 1]
    written = {img.tobytes() for img in train_images}
    for image in torch.cat([data.train_x, data.val_x]):
        assert (image[0] * 255).round().to(torch.uint8).numpy().tobytes() in written
    labels = {img.tobytes(): lab for img, lab in zip(train_images, train_labels)}
    for image, label in zip(data.train_x, data.train_y):
        assert labels[(image[0] * 255).round().to(torch.uint8).numpy().tobytes()] == label.item()


def test_missing_dataset_says_where_and_how_to_fix(tmp_path):
    with pytest.raises(DataError) as caught:
        load_data(DataConfig(name="fashion_mnist"), data_dir=tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in message and "--download" in message
    assert "\n" not in message
    assert not (tmp_path / "FashionMNIST").exists()  # nothing written


def test_mnist_from_the_original_archives(mnist_dir):
    data = load_data(DataConfig(name="mnist"), data_dir=mnist_dir)
    assert len(data.train_x) + len(data.val_x) == 60_000 and len(data.test_x) == 10_000
    assert len(data.val_x) == 6_000
    assert data.train_x.dtype == torch.float32 and 0 <= data.train_x.min() and data.train_x.max() <= 1
    assert set(data.test_y.unique().tolist()) == set(range(10))


def test_default_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AESEARCH_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("AESEARCH_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / "aesearch" / "datasets"


def test_dataset_specs_match_the_loaded_shapes(digits):
    assert DATASETS["digits"].spec.shape == tuple(digits.train_x.shape[1:])


def test_colour_images_become_channels_first():
    from types import SimpleNamespace

    from aesearch.parts.data.builtin import _as_tensors

    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)  # CIFAR-10 stores (N, H, W, C)
    images, labels = _as_tensors(SimpleNamespace(data=hwc, targets=[1, 2, 3, 4]))
    assert images.shape == (4, 3, 32, 32) and images.is_contiguous()
    assert torch.equal((images[2, 1] * 255).round().to(torch.uint8), torch.from_numpy(hwc[2, :, :, 1]))
    assert labels.tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "config", [DataConfig(max_train_samples=1), DataConfig(val_fraction=0.0001, anomaly=[7])]
)
def test_a_split_too_small_to_train_on_is_a_clear_error(config):
    with pytest.raises(DataError, match=r"split of digits has [01] rows .* each split needs at least 2"):
        load_data(config)
