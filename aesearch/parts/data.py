"""Datasets as tensors: loaded once, split deterministically, fingerprinted, held on the device.

Every dataset is a stack of images in [0, 1] with shape (N, C, H, W) and integer class labels.
The trainer never touches a per-sample DataLoader: it indexes these tensors with a `randperm`
on the training device.

`digits` (scikit-learn's bundled 8x8 digits) needs no files and no network: it is the offline
default. The torchvision datasets live under a data directory in torchvision's own layout
(`--data-dir`, else `$AESEARCH_DATA_DIR`, else a user cache folder); they are downloaded only
when the caller allows it (`--download`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, model_validator

from aesearch.errors import DataError
from aesearch.registry import Registry
from aesearch.schema import Float, Int, Named, PositiveInt, Section, broken_rule

Arrays = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # train x, y, test x, y
Loader = Callable[[Path, bool], Arrays]


@dataclass(frozen=True)
class DatasetSpec:
    """What is known about a dataset before loading it (used to validate configs early)."""

    name: str
    shape: tuple[int, int, int]  # (channels, height, width)
    num_classes: int
    load: Loader  # (data directory, download allowed) -> train x, y, test x, y


DATASETS: Registry[DatasetSpec] = Registry("dataset")


@dataclass(frozen=True)
class Data:
    """The three splits of a dataset as tensors, and the fingerprint of exactly those tensors."""

    spec: DatasetSpec
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    fingerprint: str
    anomaly_class: int | None = None

    def to(self, device: torch.device | str) -> Data:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)

    @property
    def device(self) -> torch.device:
        return self.train_x.device


def default_data_dir() -> Path:
    """`$AESEARCH_DATA_DIR`, else `$XDG_CACHE_HOME/aesearch/datasets` (~/.cache by default)."""
    if os.environ.get("AESEARCH_DATA_DIR"):
        return Path(os.environ["AESEARCH_DATA_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "aesearch" / "datasets"


def load_data(config: DataConfig, data_dir: Path | str | None = None, download: bool = False) -> Data:
    """Load, split and fingerprint the dataset a config names (on the CPU)."""
    spec = DATASETS[config.name]
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    train_x, train_y, test_x, test_y = spec.load(root, download)

    generator = torch.Generator().manual_seed(config.split_seed)
    order = torch.randperm(len(train_x), generator=generator)
    n_val = max(1, round(config.val_fraction * len(train_x)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    if config.anomaly_class is not None:
        # Anomaly detection: train and validate on the normal classes only; test keeps all.
        train_idx = train_idx[train_y[train_idx] != config.anomaly_class]
        val_idx = val_idx[train_y[val_idx] != config.anomaly_class]
    if config.max_train_samples is not None:
        train_idx = train_idx[: config.max_train_samples]

    for split, indices in (("training", train_idx), ("validation", val_idx)):
        if len(indices) < 2:
            raise DataError(
                f"data: the {split} split of {spec.name} has {len(indices)} images with "
                f"val_fraction={config.val_fraction}, anomaly_class={config.anomaly_class}, "
                f"max_train_samples={config.max_train_samples}; it needs at least 2"
            )
    splits = {
        "train_x": train_x[train_idx],
        "train_y": train_y[train_idx],
        "val_x": train_x[val_idx],
        "val_y": train_y[val_idx],
        "test_x": test_x,
        "test_y": test_y,
    }
    return Data(spec, **splits, fingerprint=fingerprint(splits), anomaly_class=config.anomaly_class)


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """A short hash of the arrays' names, shapes and bytes: same data <=> same fingerprint."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name].cpu().numpy())
        digest.update(f"{name}:{array.dtype}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


# --- digits: scikit-learn's bundled 8x8 digits, the offline default ----------------------------

DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 0  # fixed for all configs: the test split never changes


def _load_digits(root: Path, download: bool) -> Arrays:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(DIGITS_TEST_SEED))
    n_test = round(DIGITS_TEST_FRACTION * len(x))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


DATASETS.add("digits", DatasetSpec("digits", (1, 8, 8), 10, _load_digits))


# --- torchvision datasets, in torchvision's folder layout under the data directory -------------


def _torchvision_loader(class_name: str) -> Loader:
    def load(root: Path, download: bool) -> Arrays:
        import torchvision.datasets as tvd

        cls = getattr(tvd, class_name)
        probe = cls.__new__(cls)  # only to ask torchvision where the files go
        probe.root = str(root)
        # Extracting archives that are already here and verified needs no network.
        extract = download or _archives_verified(probe)
        try:
            train, test = (cls(str(root), train=flag, download=extract) for flag in (True, False))
        except (RuntimeError, OSError) as error:  # OSError: URLError and friends, offline
            if "not found" in str(error).lower() or "corrupted" in str(error).lower():
                raise DataError(
                    f"dataset {class_name} not found under {_expected_folder(probe)}; pass "
                    "--download to fetch it, or point --data-dir (or AESEARCH_DATA_DIR) at a "
                    "folder that holds it in torchvision's layout"
                ) from None
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise DataError(f"downloading {class_name} into {root} failed: {first_line}") from None
        return (*_as_tensors(train), *_as_tensors(test))

    return load


def _expected_folder(probe) -> str:
    return getattr(probe, "raw_folder", None) or os.path.join(probe.root, getattr(probe, "base_folder", ""))


def _archives_verified(probe) -> bool:
    """Are the original archives (md5-checked) already in the data directory?"""
    from torchvision.datasets.utils import check_integrity

    if hasattr(probe, "resources"):  # MNIST family: several .gz files in raw/
        return all(
            check_integrity(os.path.join(probe.raw_folder, filename), md5) for filename, md5 in probe.resources
        )
    return check_integrity(os.path.join(probe.root, probe.filename), probe.tgz_md5)  # CIFAR


def _as_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.as_tensor(np.asarray(dataset.data))
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # NHWC -> NCHW
    labels = torch.as_tensor(np.asarray(dataset.targets), dtype=torch.int64)
    return images.to(torch.float32).div_(255.0).contiguous(), labels


DATASETS.add("mnist", DatasetSpec("mnist", (1, 28, 28), 10, _torchvision_loader("MNIST")))
DATASETS.add("fashion_mnist", DatasetSpec("fashion_mnist", (1, 28, 28), 10, _torchvision_loader("FashionMNIST")))
DATASETS.add("kmnist", DatasetSpec("kmnist", (1, 28, 28), 10, _torchvision_loader("KMNIST")))
DATASETS.add("cifar10", DatasetSpec("cifar10", (3, 32, 32), 10, _torchvision_loader("CIFAR10")))


# --- this part's section of the config --------------------------------------------------------


class DataConfig(Section):
    """Which dataset and how it is split. Where the files live is a runtime option, not config."""

    name: Named(DATASETS) = "digits"
    val_fraction: Float = Field(0.1, gt=0.0, le=0.5)
    split_seed: Int = Field(0, ge=0)
    anomaly_class: Int | None = Field(None, ge=0, description="class held out of training as the anomaly")
    max_train_samples: PositiveInt | None = None

    @model_validator(mode="after")
    def _anomaly_is_a_class(self) -> DataConfig:
        spec = DATASETS[self.name]
        if self.anomaly_class is not None and self.anomaly_class >= spec.num_classes:
            raise broken_rule(f"data.anomaly_class={self.anomaly_class} must be a class of {spec.name} "
                              f"(0..{spec.num_classes - 1})")
        return self
