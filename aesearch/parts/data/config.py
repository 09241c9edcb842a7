"""The `data:` section: a built-in dataset by `name`, or the user's own data by `path`.

    data: {name: mnist}                                   # a built-in benchmark
    data: {path: transactions.csv, label: Class, anomaly: [1]}
    data: {path: scans/, image_size: 64, channels: 1}     # a folder of images (one sub-folder per class)
    data: {name: mnist, binarize: dynamic}                # the VAE literature's protocol (binarize.py)

The format of a path is its suffix (`.csv`, `.parquet`, `.npy`, `.npz`) or, for a folder, images.
Relative paths are read from the current directory. Only what can be checked without reading the
files is checked here; the files themselves are checked when they are loaded (`load.load_data`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from aesearch.parts.data.binarize import BINARIZATIONS
from aesearch.parts.data.builtin import DATASETS
from aesearch.parts.data.formats import FORMATS, IMAGES, TABLE, data_format, format_rule, holding
from aesearch.parts.data.spec import IMPUTATIONS, SCALINGS, DataSpec
from aesearch.schema import Bounded, Float, Int, Named, PositiveInt, Section, broken_rule

TABLE_FIELDS = ("label", "id", "features", "categorical")
IMAGE_FIELDS = ("image_size", "channels")


class DataConfig(Section):
    """Which data, how it is read, and how it is split. Where the built-in datasets' files live is
    a runtime option (--data-dir), not config."""

    name: Named(DATASETS) | None = Field(None, description="a built-in dataset (default digits when no path)")
    path: str | None = Field(None, min_length=1, description="the user's data file or image folder")
    test: str | None = Field(None, min_length=1, description="a separate test file or folder, same format")
    # tables
    label: str | None = None  # the label column (optional)
    id: str | None = None  # a column that names each row (optional): not a feature; kept beside scores
    features: list[str] | None = Field(None, min_length=1)  # default: every column but the label and id
    categorical: list[str] | None = None  # default: the non-numeric feature columns
    # An undeclared text column with more levels than this is refused as an identifier (list it in categorical).
    max_levels: PositiveInt = 100
    scale: Named(SCALINGS) = "standard"  # numeric features, fitted on the training split
    impute: Named(IMPUTATIONS) = "none"  # missing values: refuse (none) or fill from the training split
    # image folders
    image_size: Bounded(8192) | None = None  # images resized to image_size x image_size (default: the first's)
    channels: Literal[1, 3] | None = None  # 1 grey, 3 RGB (default: the first image's)
    # labels and splits
    anomaly: list[str | int] | None = Field(None, min_length=1, description="label values that are anomalies")
    val_fraction: Float = Field(0.1, gt=0.0, le=0.5)
    test_fraction: Float = Field(0.2, gt=0.0, le=0.5)  # user data without a `test` file
    split_seed: Int = Field(0, ge=0)
    max_train_samples: PositiveInt | None = None
    # data in [0, 1]: binarised stochastically, each training batch afresh (dynamic) or once (static)
    binarize: Named(BINARIZATIONS) = "none"

    @property
    def dataset(self) -> str:
        """What the data is called in messages and runs: the built-in name, or the file's name."""
        return self.name or Path(self.path).name or self.path

    @property
    def known_spec(self) -> DataSpec | None:
        """The spec of a built-in dataset as this section loads it (with its anomaly classes), known
        before loading; None for the user's data, known only once read."""
        if self.path is not None:
            return None
        return dataclasses.replace(DATASETS[self.name].spec, anomalies=tuple(str(v) for v in self.anomaly or ()))

    @property
    def format(self) -> str:
        return "builtin" if self.path is None else data_format(self.path)

    @model_validator(mode="before")
    @classmethod
    def _digits_by_default(cls, document: object) -> object:
        if isinstance(document, dict) and document.get("name") is None and document.get("path") is None:
            return {**document, "name": "digits"}
        return document

    @model_validator(mode="after")
    def _fields_fit_the_source(self) -> DataConfig:
        if self.name is not None and self.path is not None:
            raise broken_rule(f"data.name={self.name!r} and data.path={self.path!r}: give one of them, not both")
        if self.path is None:
            given = [f for f in (*TABLE_FIELDS, *IMAGE_FIELDS, "test") if getattr(self, f) is not None]
            if given:
                raise broken_rule(f"data.{given[0]} applies to data.path (your own data), not to the built-in "
                                  f"dataset {self.name!r}")
            return self._builtin_anomaly_is_a_class()
        for path in (self.path, self.test):
            if path is not None and data_format(path) is None:
                field = "path" if path == self.path else "test"
                raise broken_rule(f"data.{field}={path!r}: {format_rule()}")
        if self.test is not None and data_format(self.test) != self.format:
            raise broken_rule(f"data.test={self.test!r} must have the format of data.path={self.path!r} "
                              f"({self.format})")
        holds = FORMATS[self.format].holds
        if holds != TABLE:
            given = [f for f in TABLE_FIELDS if getattr(self, f) is not None]
            if given:
                tables = ", ".join(FORMATS[name].described for name in holding(TABLE))
                raise broken_rule(f"data.{given[0]} applies to tables ({tables}), not to data.path={self.path!r}")
        if holds != IMAGES:
            given = [f for f in IMAGE_FIELDS if getattr(self, f) is not None]
            if given:
                raise broken_rule(f"data.{given[0]} applies to image folders, not to data.path={self.path!r}")
        if self.binarize != "none" and holds == TABLE and self.scale != "minmax":
            raise broken_rule(f"data.binarize={self.binarize!r} needs values in [0, 1]: a table needs "
                              f"data.scale='minmax' (got {self.scale!r})")
        overlap = sorted(set(self.features or ()) & {self.label})
        if overlap:
            raise broken_rule(f"data.features lists the label column {overlap[0]!r}: a label is not a feature")
        if self.id is not None and (self.id == self.label or self.id in (self.features or ())):
            field = "label" if self.id == self.label else "features"
            raise broken_rule(f"data.id={self.id!r} is also in data.{field}: an id column only names rows")
        unknown = sorted(set(self.categorical or ()) - set(self.features or self.categorical or ()))
        if unknown:
            raise broken_rule(f"data.categorical names {unknown[0]!r}, which is not in data.features")
        return self

    def _builtin_anomaly_is_a_class(self) -> DataConfig:
        classes = DATASETS[self.name].spec.classes
        for value in self.anomaly or ():
            if str(value) not in classes:
                raise broken_rule(f"data.anomaly: {value!r} is not a class of {self.name} "
                                  f"({classes[0]}..{classes[-1]})")
        return self
