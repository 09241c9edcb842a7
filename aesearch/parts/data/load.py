"""Datasets as tensors: loaded once, split deterministically, scaled, fingerprinted.

A dataset is three splits of inputs (images (N, C, H, W) or vectors (N, D)) with optional
integer labels, and the `DataSpec` that says what they are. The trainer never touches a
per-sample DataLoader: it indexes these tensors with a `randperm` on the training device.

Splits. A built-in dataset keeps its fixed test part and carves validation from the rest with
`split_seed`. The user's data carves test (unless a `test` file is given) and validation with
`split_seed`, stratified by label when there are labels. With `anomaly`, training keeps only the
normal rows (train on normal data, score by reconstruction error): the user's anomalous rows are
shared between validation and test, in the proportion of their fractions, so none is wasted (a
built-in dataset's training part drops its anomalies; its test part keeps them all).
Numeric features are scaled (and missing values imputed) with statistics of the training split.
With `binarize`, data in [0, 1] is then binarised stochastically (binarize.py): validation and test
once, from fixed seeds, and with `static` the training split too.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from aesearch.errors import DataError
from aesearch.parts.data.binarize import BINARIZATIONS, fixed_bits
from aesearch.parts.data.builtin import DATASETS, default_data_dir
from aesearch.parts.data.config import DataConfig
from aesearch.parts.data.sources import Raw, read, scale_numeric
from aesearch.parts.data.spec import IMPUTATIONS, NUMERIC, SCALINGS, VECTOR, DataSpec

MIN_SPLIT = 2  # rows a split needs at least (a validation loss, a test metric)


@dataclass(frozen=True)
class Data:
    """The three splits as tensors (labels: None when the data has none), what they are, and
    the fingerprint of exactly these tensors."""

    spec: DataSpec
    train_x: torch.Tensor
    train_y: torch.Tensor | None
    val_x: torch.Tensor
    val_y: torch.Tensor | None
    test_x: torch.Tensor
    test_y: torch.Tensor | None
    fingerprint: str

    def to(self, device: torch.device | str) -> Data:
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    @property
    def normal_val_x(self) -> torch.Tensor:
        """The validation inputs without the anomalies: what a detector is trained and selected on."""
        if not self.spec.anomalies:
            return self.val_x
        return self.val_x[~self.spec.is_anomaly(self.val_y)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (getattr(self, f.name) for f in fields(self))
                   if isinstance(t, torch.Tensor))


def load_data(config: DataConfig, data_dir: Path | str | None = None, download: bool = False) -> Data:
    """Load, split, scale and fingerprint the data a config names (on the CPU)."""
    if config.path is None:
        return _load_builtin(config, Path(data_dir).expanduser() if data_dir is not None else default_data_dir(),
                             download)
    return _load_user_data(config)


def _load_builtin(config: DataConfig, root: Path, download: bool) -> Data:
    builtin = DATASETS[config.name]
    train_x, train_y, test_x, test_y = builtin.load(root, download)
    generator = torch.Generator().manual_seed(config.split_seed)
    order = torch.randperm(len(train_x), generator=generator)
    n_val = max(1, round(config.val_fraction * len(train_x)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    spec = config.known_spec
    if spec.anomalies:
        train_idx = train_idx[~spec.is_anomaly(train_y[train_idx])]
    if config.max_train_samples is not None:
        train_idx = train_idx[: config.max_train_samples]
    splits = {"train_x": train_x[train_idx], "train_y": train_y[train_idx], "val_x": train_x[val_idx],
              "val_y": train_y[val_idx], "test_x": test_x, "test_y": test_y}
    _check_sizes(splits, config)
    splits = _binarized(splits, config, spec)
    return Data(spec, **splits, fingerprint=fingerprint(splits))


def _load_user_data(config: DataConfig) -> Data:
    raw = read(config.path, config)
    test = read(config.test, config, like=raw) if config.test else None
    classes = _classes(raw, test)
    y = _codes(raw.labels, classes)
    anomalies = _anomalies(config, raw, test, classes)
    rows = np.arange(len(raw.x))
    anomalous = np.isin(y, [classes.index(value) for value in anomalies]) if anomalies else np.zeros(len(rows), bool)
    normal_rows, anomalous_rows = rows[~anomalous], rows[anomalous]
    if test is None:
        normal_rows, test_idx = _carve(normal_rows, y, config.test_fraction, config.split_seed)
    else:
        test_idx = None
    share = config.val_fraction * len(rows) / max(1, len(normal_rows))  # val_fraction is of the whole file
    train_idx, val_idx = _carve(normal_rows, y, min(share, 0.5), config.split_seed + 1)
    if len(anomalous_rows):  # never trained on: shared by validation and test, none wasted
        if test is None:
            to_test, to_val = _carve(anomalous_rows, None, config.val_fraction / (config.val_fraction + config.test_fraction),
                                     config.split_seed + 2)
            test_idx = np.sort(np.concatenate([test_idx, to_test]))
        else:
            to_val = anomalous_rows
        val_idx = np.sort(np.concatenate([val_idx, to_val]))
    if config.max_train_samples is not None:
        train_idx = train_idx[: config.max_train_samples]
    columns = _fit_scaling(raw, train_idx, config)
    scaled = scale_numeric(raw.x, columns) if columns else raw.x
    test_x = scaled[test_idx] if test is None else scale_numeric(test.x, columns) if columns else test.x
    test_y = (y[test_idx] if test is None else _codes(test.labels, classes)) if classes else None
    splits = {"train_x": scaled[train_idx], "train_y": y[train_idx] if classes else None,
              "val_x": scaled[val_idx], "val_y": y[val_idx] if classes else None, "test_x": test_x, "test_y": test_y}
    splits = {name: None if array is None else torch.from_numpy(np.ascontiguousarray(array)) for name, array in splits.items()}
    _check_sizes(splits, config)
    in_unit_range = all(bool(((t >= 0) & (t <= 1)).all()) for name, t in splits.items() if name.endswith("_x"))
    spec = DataSpec(config.dataset, raw.modality, tuple(raw.x.shape[1:]), unit_range=in_unit_range,
                    classes=tuple(classes), anomalies=tuple(anomalies), columns=tuple(columns),
                    source=str(Path(config.path).expanduser().resolve()))
    splits = _binarized(splits, config, spec)
    return Data(spec, **splits, fingerprint=fingerprint(splits))


def _binarized(splits: dict[str, torch.Tensor | None], config: DataConfig, spec: DataSpec) -> dict:
    """The splits as `data.binarize` wants them: validation and test drawn once, and the training
    split too with `static` (`dynamic` draws each training batch in the trainer)."""
    drawn = BINARIZATIONS[config.binarize].drawn_once
    if not drawn:
        return splits
    if not spec.unit_range:
        raise DataError(f"data.binarize={config.binarize!r}: {config.dataset} has values outside [0, 1]; "
                        "binarising needs every value in [0, 1]")
    return splits | {f"{split}_x": fixed_bits(splits[f"{split}_x"], split) for split in drawn}


def _classes(raw: Raw, test: Raw | None) -> list[str]:
    """The label values, sorted (numerically when they are numbers); [] when unlabelled."""
    if raw.labels is None:
        return []
    values = set(raw.labels.tolist()) | (set(test.labels.tolist()) if test is not None and test.labels is not None else set())

    def key(value: str):
        try:
            return (0, float(value), value)
        except ValueError:
            return (1, 0.0, value)

    return sorted(values, key=key)


def _codes(labels: np.ndarray | None, classes: list[str]) -> np.ndarray | None:
    """Labels as integer codes: the index of each in `classes`."""
    if labels is None:
        return None
    index = {value: code for code, value in enumerate(classes)}
    return np.array([index[value] for value in labels.tolist()], dtype=np.int64)


def _anomalies(config: DataConfig, raw: Raw, test: Raw | None, classes: list[str]) -> list[str]:
    if not config.anomaly:
        return []
    if not classes:
        raise DataError(f"data.anomaly={config.anomaly!r}: {config.dataset} has no labels "
                        "(a label column, a y array, or class folders) to say which rows are anomalies")
    wanted = [str(value) for value in config.anomaly]
    for value in wanted:
        if value not in classes:
            raise DataError(f"data.anomaly: {value!r} never occurs in the {raw.label_name} of {config.dataset} "
                            f"(values: {', '.join(classes[:12])})")
    if len(wanted) == len(classes):
        raise DataError(f"data.anomaly={config.anomaly!r} names every class of {config.dataset}: no normal rows "
                        "are left to train on")
    return wanted


def _carve(indices: np.ndarray, y: np.ndarray | None, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split `indices` into (kept, carved), `fraction` of them carved: with a fixed seed, stratified by
    label where every class has at least two rows (scikit-learn's train_test_split)."""
    from sklearn.model_selection import train_test_split

    if len(indices) < 2 * MIN_SPLIT:
        return indices, indices[:0]
    labels = y[indices] if y is not None else None
    counts = np.unique(labels, return_counts=True)[1] if labels is not None else None
    stratified = counts is not None and counts.min() >= 2 and len(counts) <= fraction * len(indices) < len(indices) - len(counts)
    stratify = labels if stratified else None
    kept, carved = train_test_split(indices, test_size=fraction, random_state=seed, shuffle=True, stratify=stratify)
    return np.sort(kept), np.sort(carved)


def _fit_scaling(raw: Raw, train_idx: np.ndarray, config: DataConfig) -> list:
    """The numeric columns' imputation and scaling, fitted on the training rows."""
    if raw.modality != VECTOR:
        return []
    columns = []
    for column in raw.columns:
        if column.kind != NUMERIC:
            columns.append(column)
            continue
        values = raw.x[train_idx, column.start].astype(np.float64)
        values = values[~np.isnan(values)]
        center, scale = SCALINGS[config.scale](values)
        imputation = IMPUTATIONS[config.impute]
        fill = float(imputation(values)) if imputation is not None and len(values) else 0.0
        columns.append(dataclasses.replace(column, center=float(center), scale=float(scale) or 1.0, fill=fill))
    return columns


def _check_sizes(splits: dict[str, torch.Tensor | None], config: DataConfig) -> None:
    for split in ("train", "val", "test"):
        rows = len(splits[f"{split}_x"])
        if rows < MIN_SPLIT:
            name = {"train": "training", "val": "validation", "test": "test"}[split]
            raise DataError(
                f"data: the {name} split of {config.dataset} has {rows} rows with val_fraction={config.val_fraction}"
                + (f", test_fraction={config.test_fraction}" if config.path and not config.test else "")
                + (f", anomaly={config.anomaly}" if config.anomaly else "")
                + (f", max_train_samples={config.max_train_samples}" if config.max_train_samples else "")
                + f"; each split needs at least {MIN_SPLIT}"
            )


def fingerprint(tensors: dict[str, torch.Tensor | None]) -> str:
    """A short hash of the arrays' names, shapes and bytes: same data <=> same fingerprint."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        if tensors[name] is None:
            continue
        array = np.ascontiguousarray(tensors[name].cpu().numpy())
        digest.update(f"{name}:{array.dtype}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]
