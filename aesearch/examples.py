"""Offline example datasets written as user files, from data that scikit-learn ships: the examples
of searching one's own data (`aesearch example NAME`, then the shipped search space that names the
files; `aesearch example --list` lists them beside the shipped spaces and configs).

- `wine`: a table for anomaly detection (wine.csv). Wine: 13 measurements of three cultivars;
  cultivars 0 and 1 are normal, a few rows of cultivar 2 are the anomalies (`Class` 1), as in a
  tabular anomaly benchmark. A text column (`region`) from the alcohol level gives the table a
  categorical column.
- `digits-images`: a folder of PNG images in class folders (digits_images/0/..., 8x8 grey).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aesearch.registry import Registry

WINE_ANOMALIES = 10  # rows of cultivar 2 among the 130 normal rows of cultivars 0 and 1: about 7%


def wine_table(anomalous_rows: int = WINE_ANOMALIES):
    """The wine table (a pandas DataFrame) described in the module docstring."""
    import pandas as pd
    from sklearn.datasets import load_wine

    frame = load_wine(as_frame=True).frame.rename(columns={"target": "cultivar"})
    normal = frame[frame["cultivar"] < 2]
    anomalous = frame[frame["cultivar"] == 2].head(anomalous_rows)
    table = pd.concat([normal, anomalous]).reset_index(drop=True)
    table["region"] = np.where(table["alcohol"] > 13.0, "north", "south")
    table["Class"] = (table.pop("cultivar") == 2).astype(int)
    return table


def write_wine(folder: Path) -> Path:
    path = folder / "wine.csv"
    wine_table().to_csv(path, index=False)
    return path


def write_digit_images(folder: Path, per_class: int | None = None, classes: tuple[int, ...] = tuple(range(10)),
                       flat: bool = False) -> Path:
    """scikit-learn's digits as 8-bit grey PNG files: one sub-folder per class, or one flat folder."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    for digit in classes:
        target = folder if flat else folder / str(digit)
        target.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(bunch.images[bunch.target == digit][:per_class]):
            pixels = (image * 255 / 16).round().astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(target / f"{digit}_{i:03d}.png")
    return folder


@dataclass(frozen=True)
class Example:
    description: str  # one line, for `aesearch example --list`
    write: Callable[[Path], Path]  # writes into a folder, returns what it wrote


EXAMPLES: Registry[Example] = Registry("example dataset")
EXAMPLES.add("wine", Example("a table for anomaly detection: wine.csv, for the shipped space wine_anomaly",
                             write_wine))
EXAMPLES.add("digits-images", Example("a folder of PNG images in class folders: digits_images/, for the shipped "
                                      "space digits_images",
                                      lambda folder: write_digit_images(folder / "digits_images")))
