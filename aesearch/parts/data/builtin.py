"""The built-in datasets: images in [0, 1] with shape (N, C, H, W) and ten integer classes.

`digits` (scikit-learn's bundled 8x8 digits) needs no files and no network: it is the offline
default. The torchvision datasets live under a data directory in torchvision's own layout
(`--data-dir`, else `$AESEARCH_DATA_DIR`, else a user cache folder); they are downloaded only
when the caller allows it (`--download`). Each comes with a fixed train/test split; validation
is carved from the training part (`load.load_data`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aesearch.errors import DataError
from aesearch.parts.data.spec import IMAGE, DataSpec
from aesearch.registry import Registry

Arrays = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # train x, y, test x, y
Loader = Callable[[Path, bool], Arrays]
TEN_CLASSES = tuple(str(digit) for digit in range(10))


@dataclass(frozen=True)
class Builtin:
    """A built-in dataset: what it is (known before loading, so configs are checked early) and how
    to load its fixed train and test parts."""

    spec: DataSpec
    load: Loader  # (data directory, download allowed) -> train x, y, test x, y


def builtin(name: str, shape: tuple[int, int, int], load: Loader) -> Builtin:
    return Builtin(DataSpec(name, IMAGE, shape, unit_range=True, classes=TEN_CLASSES), load)


DATASETS: Registry[Builtin] = Registry("dataset")


def default_data_dir() -> Path:
    """`$AESEARCH_DATA_DIR`, else `$XDG_CACHE_HOME/aesearch/datasets` (~/.cache by default)."""
    if os.environ.get("AESEARCH_DATA_DIR"):
        return Path(os.environ["AESEARCH_DATA_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "aesearch" / "datasets"


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


DATASETS.add("digits", builtin("digits", (1, 8, 8), _load_digits))


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


DATASETS.add("mnist", builtin("mnist", (1, 28, 28), _torchvision_loader("MNIST")))
DATASETS.add("fashion_mnist", builtin("fashion_mnist", (1, 28, 28), _torchvision_loader("FashionMNIST")))
DATASETS.add("kmnist", builtin("kmnist", (1, 28, 28), _torchvision_loader("KMNIST")))
DATASETS.add("cifar10", builtin("cifar10", (3, 32, 32), _torchvision_loader("CIFAR10")))
