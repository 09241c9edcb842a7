"""Reading the user's own data: tables (CSV, Parquet), arrays (.npy, .npz) and folders of images.

Each reader returns a `Raw`: the values as float32 (categorical columns one-hot, numbers not yet
scaled: scaling is fitted on the training split, after splitting) and the labels as text. Every
problem with the files is a `DataError` whose one line names the file, the column or field, the
value and the rule.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from aesearch.errors import DataError
from aesearch.parts.data.config import DataConfig
from aesearch.parts.data.formats import ARRAYS, FORMATS, IMAGES, TABLE, DataFormat, data_format
from aesearch.parts.data.spec import CATEGORICAL, IMAGE, IMPUTATIONS, NUMERIC, VECTOR, Column, DataSpec

MISSING_LEVEL = "<missing>"  # a categorical column's missing values, with impute: median
BYTES_PER_VALUE = 4  # float32


@dataclass
class Raw:
    """A user's data as read: before splitting and scaling."""

    x: np.ndarray  # float32, (N, features) or (N, channels, height, width)
    labels: np.ndarray | None  # one label per row, as text; None: unlabelled
    modality: str
    columns: list[Column] = field(default_factory=list)  # vectors: how a row became x (unscaled)
    label_name: str = "label"  # what the labels are called in messages (a column, y, class folders)
    files: np.ndarray | None = None  # image folders: each row's file, relative to the folder


@dataclass
class Inputs:
    """New inputs for a trained model: the encoded rows, and per row what names it (an id column, the
    table's index, the row number or the image's file) and, where the input has it, its label."""

    x: np.ndarray  # float32, of the model's shape
    rows: pd.DataFrame  # the identifier column first, then the label's, one row per input


def read(path: str, config: DataConfig, like: Raw | None = None) -> Raw:
    """Read one file or folder in the format its name says; `like`: the main data, which a separate
    test file must match (same columns, same image shape)."""
    file = Path(path).expanduser()
    if not file.exists():
        raise DataError(f"data.{'test' if like else 'path'}={path!r}: no such file or folder")
    return FORMATS[config.format].read(file, config, like)


def note(message: str) -> None:
    print(f"aesearch: note: {message}", file=sys.stderr)


def scale_numeric(x: np.ndarray, columns: list[Column]) -> np.ndarray:
    """Impute and scale the numeric positions of x with the columns' fitted statistics (a new array)."""
    x = x.copy()
    for column in columns:
        if column.kind == NUMERIC:
            values = x[:, column.start]
            values[np.isnan(values)] = column.fill
            x[:, column.start] = (values - column.center) / column.scale
    return x


def read_inputs(path: str, spec: DataSpec, config: DataConfig | None = None) -> Inputs:
    """New inputs for a trained model (`aesearch encode`, `score`) from a file, encoded and scaled as
    its training data was (see encode_frame, encode_array); `config`: the model's data section (its
    impute, and the id and label columns to keep beside the outputs)."""
    file = Path(path).expanduser()
    if not file.exists():
        raise DataError(f"--input {path}: no such file or folder")
    format = data_format(path)
    known = [name for name in FORMATS if FORMATS[name].gives(spec)]
    if format not in known:
        raise DataError(f"--input {path}: the model takes {spec.describe()}; give it as "
                        + ", ".join(FORMATS[name].described for name in known))
    if FORMATS[format].holds == TABLE:
        frame = _read_frame(file, format)
        rows = _table_rows(frame, config, file.name)
        x = encode_frame(frame.drop(columns=[c for c in rows.columns if c in frame.columns]), spec,
                         config.impute if config else "none", file.name)
        return Inputs(x, rows)
    raw = FORMATS[format].read(file, None, _like(spec))
    x = scale_numeric(raw.x, list(spec.columns)) if spec.modality == VECTOR else raw.x
    rows = pd.DataFrame({"file": raw.files} if raw.files is not None else {"row": np.arange(len(x))})
    if raw.labels is not None:
        rows["class" if FORMATS[format].holds == IMAGES else "y"] = raw.labels
    return Inputs(x, rows)


def _table_rows(frame: pd.DataFrame, config: DataConfig | None, source: str) -> pd.DataFrame:
    """A table's identifier (the data's id column, else its index: the row number of a CSV file) and,
    where present, its label column."""
    named, label = (config.id, config.label) if config else (None, None)
    if named is not None and named not in frame.columns:
        note(f"{source}: no id column {named!r} (data.id): rows are named by their index")
    if named is not None and named in frame.columns:
        rows = frame[[named]].reset_index(drop=True)
    else:
        rows = pd.DataFrame({frame.index.name or "row": frame.index.to_numpy()})
    if label is not None and label in frame.columns and label not in rows.columns:
        rows[label] = frame[label].to_numpy()
    return rows


def encode_frame(frame: pd.DataFrame, spec: DataSpec, impute: str = "none", source: str = "input") -> np.ndarray:
    """Raw rows of a table as the model's inputs: the training columns one-hot encoded and scaled as in
    training. A missing column is refused, naming it; extra columns are left out, with a note."""
    frame = frame.rename(columns=str)
    raw = encode_rows(frame, list(spec.columns), None, source, impute)
    extra = [c for c in frame.columns if c not in {column.name for column in spec.columns}]
    if extra:
        note(f"{source}: columns {_names(extra)} were not features in training: left out")
    return scale_numeric(raw.x, list(spec.columns))


def encode_array(x: np.ndarray, spec: DataSpec, source: str = "input") -> np.ndarray:
    """An array of raw inputs (vectors, or images with 8-bit or [0, 1] pixels) as the model's inputs;
    another shape than training's is refused, naming both."""
    raw = _from_array(np.asarray(x), None, source, _like(spec))
    return scale_numeric(raw.x, list(spec.columns)) if spec.modality == VECTOR else raw.x


def decode_rows(values: np.ndarray, spec: DataSpec) -> pd.DataFrame:
    """The model's outputs (in data space, see DataSpec.values) as table rows: numeric columns back in
    their original units, each categorical column as its most likely level."""
    decoded = {}
    for column in spec.columns:
        if column.kind == NUMERIC:
            decoded[column.name] = values[:, column.start].astype(np.float64) * column.scale + column.center
        else:
            decoded[column.name] = np.asarray(column.levels, dtype=object)[values[:, column.positions].argmax(1)]
    return pd.DataFrame(decoded)


def _like(spec: DataSpec) -> Raw:
    """The shape and columns new inputs must have, as an empty Raw (readers compare with it)."""
    return Raw(np.empty((0, *spec.shape), dtype=np.float32), None, spec.modality, list(spec.columns))


# --- tables ---------------------------------------------------------------------------------------


def read_table(file: Path, config: DataConfig, like: Raw | None) -> Raw:
    frame = _read_frame(file, config.format)
    if like is not None:
        return encode_rows(frame, like.columns, config.label, file.name, config.impute)
    label = config.label
    for name, column in (("label", label), ("id", config.id)):
        if column is not None and column not in frame.columns:
            raise DataError(f"data.{name}={column!r}: no such column in {file.name} (columns: {_names(frame.columns)})")
    features = config.features or [c for c in frame.columns if c not in (label, config.id)]
    missing = [c for c in features if c not in frame.columns]
    if missing:
        raise DataError(f"data.features: no column {missing[0]!r} in {file.name} (columns: {_names(frame.columns)})")
    numeric = {c for c in features if pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])}
    declared = set(config.categorical or ())
    for name in features:
        if name not in numeric and name not in declared:
            _refuse_mostly_numeric(frame[name], name, file)
    if config.categorical is None:
        categorical = [c for c in features if c not in numeric]
        if not numeric:
            raise DataError(f"data.path={str(file)!r}: no numeric feature columns (columns: {_names(features)}); "
                            "name the columns to one-hot encode in data.categorical")
    else:
        categorical = list(config.categorical)
        text = [c for c in features if c not in numeric and c not in categorical]
        if text:
            example = frame[text[0]].dropna().iloc[0] if frame[text[0]].notna().any() else None
            raise DataError(f"data.features: column {text[0]!r} of {file.name} is not numeric (e.g. {example!r}); "
                            "list it in data.categorical to one-hot encode it")
    for name in categorical:
        if name not in declared:
            _refuse_identifier(frame[name], name, file, config.max_levels)
    _check_missing(frame, features, label, file.name, config.impute)
    columns, start = [], 0
    for name in features:
        values = frame[name]
        if name in categorical:
            levels = tuple(sorted(values.astype("string").fillna(MISSING_LEVEL).unique().tolist()))
            columns.append(Column(name, CATEGORICAL, start, levels=levels))
        elif values.nunique(dropna=True) <= 1:
            note(f"column {name!r} of {file.name} is constant ({values.dropna().iloc[0] if values.notna().any() else 'empty'}):"
                 " it carries nothing to learn, dropped")
            continue
        else:
            columns.append(Column(name, NUMERIC, start))
        start += columns[-1].width
    if not columns:
        raise DataError(f"data.path={str(file)!r}: no feature column is left once constant columns are dropped")
    return encode_rows(frame, columns, label, file.name, config.impute)


def _refuse_mostly_numeric(values: pd.Series, name: str, file: Path) -> None:
    """A column of numbers with a few stray text values would be one-hot encoded, one level per number."""
    present = values.dropna()
    strays = present[pd.to_numeric(present, errors="coerce").isna()]
    if 0 < len(strays) < len(present) / 2:
        row = strays.index[0]
        line = f" (line {row + 2} of the file)" if file.suffix.lower() == ".csv" and isinstance(row, int | np.integer) else ""
        raise DataError(f"data.path={str(file)!r}: column {name!r} is numeric in {len(present) - len(strays):,} of "
                        f"{len(present):,} rows, but row {row}{line} holds {strays.iloc[0]!r}: correct it (or leave it "
                        f"empty, with data.impute), or list {name!r} in data.categorical to one-hot encode it")


def _refuse_identifier(values: pd.Series, name: str, file: Path, max_levels: int) -> None:
    """A text column with a distinct value in (nearly) every row names rows; one-hot, it is hundreds of inputs."""
    present = values.dropna()
    levels = present.nunique()
    if len(present) >= 20 and levels >= 0.9 * len(present):
        why = "a distinct value in (nearly) every row: it names rows, it is not a category"
    elif levels > max_levels:
        why = f"more levels than data.max_levels={max_levels}"
    else:
        return
    raise DataError(f"data.path={str(file)!r}: column {name!r} has {levels:,} levels in {len(present):,} rows (e.g. "
                    f"{present.iloc[0]!r}), {why}; name it in data.id to keep it beside the scores, leave it out of "
                    f"data.features, or list it in data.categorical to one-hot encode it anyway")


def encode_rows(frame: pd.DataFrame, columns: list[Column], label: str | None, source: str, impute: str) -> Raw:
    """Rows of a table as the model's input: numeric columns as they are (NaN where missing, filled
    after the split), categorical ones one-hot over the known levels (an unknown level: all zeros)."""
    absent = [c.name for c in columns if c.name not in frame.columns] + ([label] if label and label not in frame else [])
    if absent:
        raise DataError(f"{source}: no column {absent[0]!r}, which the data was trained with "
                        f"(expected: {_names([c.name for c in columns])})")
    _check_missing(frame, [c.name for c in columns], label, source, impute)
    width = sum(c.width for c in columns)
    x = np.zeros((len(frame), width), dtype=np.float32)
    for column in columns:
        values = frame[column.name]
        if column.kind == NUMERIC:
            if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
                raise DataError(f"{source}: column {column.name!r} is not numeric (e.g. {values.dropna().iloc[0]!r})")
            x[:, column.start] = values.to_numpy(dtype=np.float32, na_value=np.nan)
        else:
            text = values.astype("string").fillna(MISSING_LEVEL)
            codes = pd.Index(column.levels).get_indexer(text)  # -1: a level not seen in training
            rows = np.flatnonzero(codes >= 0)
            x[rows, column.start + codes[rows]] = 1.0
    labels = frame[label].astype("string").to_numpy(dtype=object) if label else None
    return Raw(x, labels, VECTOR, list(columns), label_name=f"column {label!r}" if label else "label")


def _read_frame(file: Path, format: str) -> pd.DataFrame:
    try:
        frame = FORMATS[format].frame(file)
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{file}: cannot read it as {format}: {first_line}") from None
    except Exception as error:  # pyarrow's own errors (not a parquet file, ...)
        raise DataError(f"{file}: cannot read it as {format}: {str(error).strip().splitlines()[0]}") from None
    if frame.empty:
        raise DataError(f"{file}: no rows")
    frame.columns = [str(c) for c in frame.columns]
    return frame


def _check_missing(frame: pd.DataFrame, features: list[str], label: str | None, source: str, impute: str) -> None:
    if label is not None and frame[label].isna().any():
        raise DataError(f"{source}: the label column {label!r} has {int(frame[label].isna().sum())} missing values; "
                        "drop those rows")
    counts = frame[features].isna().sum()
    counts = counts[counts > 0]
    if len(counts) and IMPUTATIONS[impute] is None:
        listed = ", ".join(f"{name!r} ({count} missing)" for name, count in counts.items())
        raise DataError(f"{source}: missing values in {listed}; set data.impute: median (filled from the "
                        "training split) or drop those rows")


def _names(names) -> str:
    names = [str(n) for n in names]
    return ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")


# --- arrays -----------------------------------------------------------------------------------------


def read_npy(file: Path, config: DataConfig, like: Raw | None) -> Raw:
    return _from_array(_load_array(file, lambda: np.load(file, mmap_mode="r", allow_pickle=False)), None, str(file), like)


def read_npz(file: Path, config: DataConfig, like: Raw | None) -> Raw:
    try:
        archive = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"{file}: cannot read it as .npz: {str(error).splitlines()[0]}") from None
    with archive:
        if "x" not in archive.files:
            raise DataError(f"{file}: no array named 'x' (it holds {', '.join(archive.files) or 'nothing'}); "
                            "save the inputs as x (and optional labels as y)")
        x = _load_array(file, lambda: archive["x"])
        y = _load_array(file, lambda: archive["y"]) if "y" in archive.files else None
    if y is not None and (y.ndim != 1 or len(y) != len(x)):
        raise DataError(f"{file}: y has shape {y.shape}; it must hold one label per row of x ({len(x)})")
    return _from_array(x, None if y is None else np.asarray(y).astype(str).astype(object), str(file), like)


def _load_array(file: Path, load) -> np.ndarray:
    try:
        return load()
    except (OSError, ValueError) as error:  # ValueError: object arrays (pickles), bad headers
        raise DataError(f"{file}: cannot read it as a NumPy array: {str(error).splitlines()[0]}") from None


def _from_array(x: np.ndarray, labels: np.ndarray | None, source: str, like: Raw | None) -> Raw:
    if x.dtype.kind not in "fiub":
        raise DataError(f"{source}: x has dtype {x.dtype}; it must hold numbers")
    if x.ndim not in (2, 3, 4) or len(x) == 0:
        raise DataError(f"{source}: x has shape {x.shape}; expected vectors (N, D), or images (N, H, W) or (N, C, H, W)")
    check_fits(tensor_bytes(x.shape), f"{source} ({'x'.join(map(str, x.shape))})")
    modality = VECTOR if x.ndim == 2 else IMAGE
    values = np.asarray(x, dtype=np.float32)
    if x.dtype == np.uint8:
        values = values / np.float32(255.0)  # 8-bit pixels
    if x.ndim == 3:
        values = values[:, None]
    missing = int(np.isnan(values).sum())
    if missing:
        raise DataError(f"{source}: x has {missing} missing (NaN) values; fill or drop them first")
    if like is not None and values.shape[1:] != like.x.shape[1:]:
        raise DataError(f"{source}: inputs of shape {tuple(values.shape[1:])}, but the data has {tuple(like.x.shape[1:])}")
    columns = [Column(f"x{i}", NUMERIC, i) for i in range(values.shape[1])] if modality == VECTOR else []
    return Raw(values, labels, modality, like.columns if like else columns, label_name="y")


# --- folders of images ------------------------------------------------------------------------------


def read_folder(folder: Path, config: DataConfig, like: Raw | None) -> Raw:
    """torchvision's ImageFolder layout (one sub-folder per class, its name the label), or a flat
    folder of images without labels. Each image is decoded once, converted to grey (1 channel)
    or RGB (3) and resized to image_size x image_size."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise DataError(f"{folder}: no images in it (looked for {', '.join(IMG_EXTENSIONS)})")
    nested = [p for p in files if p.parent != folder]
    if nested and len(nested) < len(files):
        loose = next(p for p in files if p.parent == folder)
        raise DataError(f"{folder}: {loose.name} lies beside class folders; put every image in its class's folder, "
                        "or use a flat folder without classes")
    labels = np.array([p.relative_to(folder).parts[0] for p in files], dtype=object) if nested else None
    first = _open_image(files[0], Image, UnidentifiedImageError)
    channels = like.x.shape[1] if like else config.channels or (1 if first.mode in ("1", "L", "I", "I;16", "F") else 3)
    size = (like.x.shape[2], like.x.shape[3]) if like else (config.image_size or first.height, config.image_size or first.width)
    check_fits(tensor_bytes((len(files), channels, *size)), f"{folder.name}/ ({len(files)} images of {channels}x{size[0]}x{size[1]})")
    x = np.empty((len(files), channels, *size), dtype=np.float32)
    mode = "L" if channels == 1 else "RGB"
    for i, path in enumerate(files):
        image = _open_image(path, Image, UnidentifiedImageError).convert(mode)
        if image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        x[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return Raw(x, labels, IMAGE, label_name="class folders",
               files=np.array([p.relative_to(folder).as_posix() for p in files], dtype=object))


def _open_image(path: Path, Image, UnidentifiedImageError):
    try:
        image = Image.open(path)
        image.load()
        return image
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable image ({type(error).__name__}: {str(error).splitlines()[0]})") from None


# --- the formats, by the suffix that names them ----------------------------------------------------

FORMATS.add("csv", DataFormat(read_table, TABLE, (".csv",), frame=pd.read_csv))
FORMATS.add("parquet", DataFormat(read_table, TABLE, (".parquet", ".pq"), frame=pd.read_parquet))
FORMATS.add("npy", DataFormat(read_npy, ARRAYS, (".npy",)))
FORMATS.add("npz", DataFormat(read_npz, ARRAYS, (".npz",)))
FORMATS.add("folder", DataFormat(read_folder, IMAGES))


# --- will it fit ------------------------------------------------------------------------------------


def free_bytes(device: str = "cpu") -> int:
    """Free memory of a device: the CUDA device's, or the host's available memory."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def tensor_bytes(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.float64)) * BYTES_PER_VALUE


def check_fits(needed: int, what: str, device: str = "cpu") -> None:
    """Refuse data of `needed` bytes that would not fit in the device's free memory: checked before
    reading it where its shape is known first (arrays, image folders), and before moving it to a GPU."""
    free = free_bytes(device)
    if needed > free:
        raise DataError(f"{what}: the data needs {needed / 2**30:.1f} GiB as float32 tensors, but {device} has "
                        f"{free / 2**30:.1f} GiB free; the data is held in memory whole: use fewer or smaller inputs")
