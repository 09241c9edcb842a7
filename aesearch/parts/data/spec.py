"""What a dataset looks like to the parts that use it.

A `DataSpec` is resolved once, when the data is loaded, and travels with it: in `Data`, to every
trial, and into every checkpoint (as plain data), so a model can be rebuilt, and new inputs
checked and encoded, without the training data. The parts ask it their questions:

- the architecture: is the input an image (channels, height, width) or a vector (features)?
- the reconstruction loss and the corruption: are all values in [0, 1] (images; min-max scaled
  tables), so that a sigmoid output, BCE, salt-and-pepper noise and PSNR make sense?
- the decoder's output (`values`): which outputs are one-hot groups of a categorical column;
- the evaluation: are there class labels, which of them are anomalies, what were the original
  units of each numeric column?
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from aesearch.registry import Registry

IMAGE, VECTOR = "image", "vector"
NUMERIC, CATEGORICAL = "numeric", "categorical"

# How a table's numeric column is scaled (`data.scale`): its (center, scale) from the training
# split's values, the column then being `(original - center) / scale`.
SCALINGS: Registry[Callable[[np.ndarray], tuple[float, float]]] = Registry("scaling")
SCALINGS.add("standard", lambda values: (values.mean(), values.std()))
SCALINGS.add("minmax", lambda values: (values.min(), values.max() - values.min()))
SCALINGS.add("none", lambda values: (0.0, 1.0))

# What a missing value of a table becomes (`data.impute`): None refuses tables with missing values;
# else the numeric fill from the training split's values (a categorical column gets a level of its own).
IMPUTATIONS: Registry[Callable[[np.ndarray], float] | None] = Registry("imputation")
IMPUTATIONS.add("none", None)
IMPUTATIONS.add("median", np.median)


@dataclass(frozen=True)
class Column:
    """One column of a table as the model sees it: a numeric value, scaled as
    `(original - center) / scale`, or a categorical one, one-hot over its levels."""

    name: str
    kind: str  # NUMERIC or CATEGORICAL
    start: int  # its first position in the model's input vector
    levels: tuple[str, ...] = ()  # categorical: the values seen in training, in one-hot order
    center: float = 0.0  # numeric
    scale: float = 1.0
    fill: float = 0.0  # numeric: what a missing value becomes (the training median, with impute: median)

    @property
    def width(self) -> int:
        return len(self.levels) if self.kind == CATEGORICAL else 1

    @property
    def positions(self) -> slice:
        return slice(self.start, self.start + self.width)


@dataclass(frozen=True)
class DataSpec:
    """The resolved description of a dataset; see the module docstring."""

    name: str  # a built-in dataset's name, or the user's file or folder name
    modality: str  # IMAGE or VECTOR
    shape: tuple[int, ...]  # (channels, height, width) or (features,)
    unit_range: bool  # every value is in [0, 1]
    classes: tuple[str, ...] = ()  # the label values, as text; a label code indexes this; () = unlabelled
    anomalies: tuple[str, ...] = ()  # which of `classes` are anomalies (data.anomaly)
    columns: tuple[Column, ...] = ()  # tables: how a row became the input vector; () otherwise
    source: str = ""  # where it was read from (a path), "" for built-ins
    extra: dict[str, Any] = field(default_factory=dict)  # what a loader wants to remember (plain data)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    @property
    def features(self) -> int:
        return math.prod(self.shape)

    @property
    def anomaly_codes(self) -> list[int]:
        return [self.classes.index(value) for value in self.anomalies]

    @property
    def categorical_groups(self) -> list[slice]:
        return [column.positions for column in self.columns if column.kind == CATEGORICAL]

    @property
    def numeric_positions(self) -> list[int]:
        """Positions of the numeric values in the flattened input (every position of an image)."""
        if not self.columns:
            return list(range(self.features))
        return [column.start for column in self.columns if column.kind == NUMERIC]

    def describe(self) -> str:
        """e.g. 'image 1x28x28 in [0, 1], 10 classes' or 'vector of 13 features (real), 3 classes'."""
        if self.modality == IMAGE:
            what = f"image {'x'.join(map(str, self.shape))}"
        else:
            what = f"vector of {self.features} features"
        what += " in [0, 1]" if self.unit_range else " (real-valued)"
        labels = f", {len(self.classes)} classes" if self.classes else ", unlabelled"
        anomalies = f", anomalies: {', '.join(self.anomalies)}" if self.anomalies else ""
        return what + labels + anomalies

    def values(self, logits: torch.Tensor) -> torch.Tensor:
        """The decoder's logits as values in the data's space: a sigmoid for [0, 1] data; otherwise
        the numeric outputs as they are and each categorical group through a softmax."""
        logits = logits.float()
        if self.unit_range:
            return torch.sigmoid(logits)
        groups = self.categorical_groups
        if not groups:
            return logits
        values = logits.clone()
        for group in groups:
            values[:, group] = torch.softmax(logits[:, group], dim=1)
        return values

    def is_anomaly(self, labels: torch.Tensor) -> torch.Tensor:
        """For label codes, True where the label is one of the anomalies."""
        codes = torch.tensor(self.anomaly_codes, dtype=labels.dtype, device=labels.device)
        return torch.isin(labels, codes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for checkpoints (loaded with weights_only=True) and MLflow."""
        return asdict(self)

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> DataSpec:
        columns = tuple(Column(**{**c, "levels": tuple(c.get("levels", ()))}) for c in document.get("columns", ()))
        return cls(**{**document, "shape": tuple(document["shape"]), "classes": tuple(document.get("classes", ())),
                      "anomalies": tuple(document.get("anomalies", ())), "columns": columns})
