"""The user's own data: tables, arrays and image folders read, split, scaled and checked."""

import numpy as np
import pandas as pd
import pytest
import torch

from aesearch.errors import DataError
from aesearch.parts.data import CATEGORICAL, IMAGE, VECTOR, DataConfig, DataSpec, load_data
from tests.user_data import wine_table, write_digit_images


@pytest.fixture
def wine_csv(tmp_path):
    path = tmp_path / "wine.csv"
    wine_table().to_csv(path, index=False)
    return path


def data_from(path, **fields):
    return load_data(DataConfig(path=str(path), **fields))


def test_a_csv_table_becomes_scaled_vectors_with_one_hot_categories_and_labels(wine_csv):
    data = data_from(wine_csv, label="Class", anomaly=[1])
    spec = data.spec
    assert spec.modality == VECTOR and not spec.unit_range and spec.classes == ("0", "1") and spec.anomalies == ("1",)
    names = [c.name for c in spec.columns]
    assert names[:2] == ["alcohol", "malic_acid"] and names[-1] == "region" and "Class" not in names
    region = spec.columns[-1]
    assert region.kind == CATEGORICAL and region.levels == ("north", "south")
    assert spec.shape == (13 + 2,)
    numeric = spec.numeric_positions
    # scaling fitted on the training split: mean 0 and std 1 there, not exactly elsewhere
    assert torch.allclose(data.train_x[:, numeric].mean(0), torch.zeros(13), atol=1e-5)
    assert torch.allclose(data.train_x[:, numeric].std(0, unbiased=False), torch.ones(13), atol=1e-4)
    assert not torch.allclose(data.test_x[:, numeric].mean(0), torch.zeros(13), atol=1e-3)
    # one-hot: each row has exactly one level of region
    assert torch.equal(data.train_x[:, region.positions].sum(1), torch.ones(len(data.train_x)))
    # the original units come back from the spec
    alcohol = spec.columns[0]
    table = wine_table()
    original = data.train_x[:, 0] * alcohol.scale + alcohol.center
    assert set(np.round(original.numpy(), 3)) <= set(np.round(table["alcohol"].to_numpy(np.float32), 3))


def test_anomalies_are_kept_out_of_training_but_not_out_of_validation_and_test(wine_csv):
    data = data_from(wine_csv, label="Class", anomaly=[1])
    assert (data.train_y == 0).all()
    total_anomalies = int((wine_table()["Class"] == 1).sum())
    assert int((data.val_y == 1).sum()) + int((data.test_y == 1).sum()) == total_anomalies
    assert (data.test_y == 1).any()  # stratified: the rare class reaches the test split
    assert len(data.normal_val_x) == int((data.val_y == 0).sum())


def test_parquet_and_csv_of_the_same_table_give_the_same_data(wine_csv, tmp_path):
    parquet = tmp_path / "wine.parquet"
    pd.read_csv(wine_csv).to_parquet(parquet)
    a, b = data_from(wine_csv, label="Class"), data_from(parquet, label="Class")
    assert a.fingerprint == b.fingerprint and a.spec.columns == b.spec.columns


def test_loading_is_deterministic_and_follows_the_split_seed(wine_csv):
    a, b = data_from(wine_csv, label="Class"), data_from(wine_csv, label="Class")
    assert a.fingerprint == b.fingerprint
    assert data_from(wine_csv, label="Class", split_seed=1).fingerprint != a.fingerprint


def test_without_a_label_the_data_is_unlabelled(wine_csv):
    data = data_from(wine_csv, features=["alcohol", "ash", "proline"])
    assert data.train_y is None and data.test_y is None and not data.spec.labelled
    assert data.spec.shape == (3,)


def test_minmax_scaling_puts_training_values_in_the_unit_interval(wine_csv):
    data = data_from(wine_csv, label="Class", scale="minmax", features=["alcohol", "ash"])
    assert data.train_x.min() == 0 and data.train_x.max() == 1


def test_a_separate_test_file_is_the_test_split(wine_csv, tmp_path):
    table = wine_table()
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    table.iloc[:100].to_csv(train, index=False)
    table.iloc[100:].to_csv(test, index=False)
    data = data_from(train, test=str(test), label="Class")
    assert len(data.test_x) == len(table) - 100 and len(data.train_x) + len(data.val_x) == 100


def test_npy_vectors_and_npz_with_labels(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    data = data_from(tmp_path / "x.npy")
    assert data.spec.modality == VECTOR and data.spec.shape == (6,) and data.train_y is None
    assert [c.name for c in data.spec.columns] == [f"x{i}" for i in range(6)]
    np.savez(tmp_path / "xy.npz", x=x, y=np.repeat(["a", "b"], 100))
    labelled = data_from(tmp_path / "xy.npz", anomaly=["b"])
    assert labelled.spec.classes == ("a", "b") and (labelled.train_y == 0).all()


def test_npy_images_of_8_bit_pixels_become_unit_range_images(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (50, 12, 10), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    data = data_from(tmp_path / "images.npy")
    assert data.spec.modality == IMAGE and data.spec.shape == (1, 12, 10) and data.spec.unit_range
    everything = torch.cat([data.train_x, data.val_x, data.test_x])
    assert sorted((everything * 255).round().flatten().tolist()) == sorted(images.flatten().astype(float).tolist())


def test_an_image_folder_with_classes_and_a_flat_one(tmp_path):
    write_digit_images(tmp_path / "classes", per_class=12, classes=(0, 1, 2))
    data = data_from(tmp_path / "classes", image_size=16)
    assert data.spec.modality == IMAGE and data.spec.shape == (1, 16, 16) and data.spec.classes == ("0", "1", "2")
    assert len(data.train_x) + len(data.val_x) + len(data.test_x) == 36
    write_digit_images(tmp_path / "flat", per_class=12, classes=(0, 1, 2), flat=True)
    flat = data_from(tmp_path / "flat", channels=3)
    assert flat.spec.shape == (3, 8, 8) and not flat.spec.labelled
    assert flat.train_x.min() >= 0 and flat.train_x.max() <= 1


def test_a_spec_survives_plain_data_and_back(wine_csv):
    spec = data_from(wine_csv, label="Class", anomaly=[1]).spec
    assert DataSpec.from_dict(spec.to_dict()) == spec


def test_missing_values_are_refused_naming_columns_and_counts_or_imputed_from_training(wine_csv, tmp_path):
    table = pd.read_csv(wine_csv)
    table.loc[[3, 7, 11], "ash"] = np.nan
    table.loc[5, "region"] = None
    path = tmp_path / "gaps.csv"
    table.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"gaps\.csv: missing values in 'ash' \(3 missing\), 'region' \(1 missing\); "
                                        r"set data\.impute: median"):
        data_from(path, label="Class")
    data = data_from(path, label="Class", impute="median")
    assert not torch.isnan(torch.cat([data.train_x, data.val_x, data.test_x])).any()
    assert "<missing>" in data.spec.columns[-1].levels


def test_a_constant_column_is_dropped_with_a_note(wine_csv, tmp_path, capsys):
    table = pd.read_csv(wine_csv).assign(site=4.0)
    path = tmp_path / "constant.csv"
    table.to_csv(path, index=False)
    data = data_from(path, label="Class")
    assert "site" not in [c.name for c in data.spec.columns]
    assert "column 'site' of constant.csv is constant (4.0)" in capsys.readouterr().err


def test_a_numeric_column_with_stray_text_is_refused_naming_a_row_and_its_value(wine_csv, tmp_path):
    """Read as text, every number would become a category of its own: one line, unless declared categorical."""
    table = pd.read_csv(wine_csv)
    table["alcohol"] = table["alcohol"].astype(object)
    table.loc[42, "alcohol"], table.loc[90, "alcohol"] = "-abc205", "twelve"
    path = tmp_path / "typo.csv"
    table.to_csv(path, index=False)
    with pytest.raises(DataError) as refused:
        data_from(path, label="Class")
    message = str(refused.value)
    assert "\n" not in message
    assert (f"column 'alcohol' is numeric in {len(table) - 2:,} of {len(table):,} rows, but row 42 (line 44 of the "
            "file) holds '-abc205'") in message and "data.categorical" in message
    declared = data_from(path, label="Class", categorical=["alcohol", "region"])
    alcohol = next(c for c in declared.spec.columns if c.name == "alcohol")
    assert alcohol.kind == CATEGORICAL and "-abc205" in alcohol.levels  # what the user asked for


def test_an_identifier_column_is_refused_as_a_category_unless_declared(wine_csv, tmp_path):
    table = pd.read_csv(wine_csv)
    table.insert(0, "customer", [f"cust{i:05d}" for i in range(len(table))])
    path = tmp_path / "customers.csv"
    table.to_csv(path, index=False)
    with pytest.raises(DataError, match=rf"column 'customer' has {len(table)} levels in {len(table)} rows \(e\.g\. "
                                        r"'cust00000'\), a distinct value in \(nearly\) every row: it names rows"):
        data_from(path, label="Class")
    named = data_from(path, label="Class", id="customer")  # what it is: the rows' names, kept beside scores
    assert "customer" not in [c.name for c in named.spec.columns]
    # More levels than the cap, though repeated: refused too, unless declared or the cap is raised.
    table["customer"] = [f"cust{i % 60:05d}" for i in range(len(table))]
    table.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"column 'customer' has 60 levels .* more levels than data\.max_levels=50;"):
        data_from(path, label="Class", max_levels=50)
    assert data_from(path, label="Class", max_levels=60).spec.columns[0].name == "customer"
    assert data_from(path, label="Class", max_levels=50, categorical=["customer", "region"]).spec.columns[0].width == 60


@pytest.mark.parametrize("fields, message", [
    ({"label": "Klass"}, r"data\.label='Klass': no such column in wine\.csv \(columns: alcohol, "),
    ({"id": "name"}, r"data\.id='name': no such column in wine\.csv \(columns: alcohol, "),
    ({"features": ["alcohol", "acidity"]}, r"data\.features: no column 'acidity' in wine\.csv"),
    ({"label": "Class", "anomaly": [7]}, r"data\.anomaly: '7' never occurs in the column 'Class' of wine\.csv \(values: 0, 1\)"),
    ({"anomaly": [1]}, r"data\.anomaly=\[1\]: wine\.csv has no labels"),
    ({"categorical": []}, r"data\.features: column 'region' of wine\.csv is not numeric \(e\.g\. '(north|south)'\); list it"),
    ({"features": ["alcohol"], "val_fraction": 0.001, "test_fraction": 0.001},
     r"the validation split of wine\.csv has [01] rows .* each split needs at least 2"),
])
def test_bad_tables_are_refused_in_one_line(wine_csv, fields, message):
    with pytest.raises(DataError, match=message) as caught:
        data_from(wine_csv, **fields)
    assert "\n" not in str(caught.value)


def test_files_that_are_not_what_they_say_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"data\.path='.*nowhere\.csv': no such file or folder"):
        data_from(tmp_path / "nowhere.csv")
    (tmp_path / "binary.parquet").write_bytes(b"\x00\x01 not parquet")
    with pytest.raises(DataError, match=r"binary\.parquet: cannot read it as parquet"):
        data_from(tmp_path / "binary.parquet")
    np.savez(tmp_path / "no_x.npz", inputs=np.zeros((10, 2)))
    with pytest.raises(DataError, match=r"no_x\.npz: no array named 'x' \(it holds inputs\)"):
        data_from(tmp_path / "no_x.npz")
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    with pytest.raises(DataError, match=r"text\.npy: x has dtype <U1; it must hold numbers"):
        data_from(tmp_path / "text.npy")
    text = pd.DataFrame({"name": ["a", "b", "c"], "city": ["x", "y", "z"]})
    text.to_csv(tmp_path / "text.csv", index=False)
    with pytest.raises(DataError, match=r"no numeric feature columns \(columns: name, city\)"):
        data_from(tmp_path / "text.csv")


def test_bad_image_folders_are_refused_naming_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no images in it"):
        data_from(tmp_path / "empty")
    write_digit_images(tmp_path / "broken", per_class=2, classes=(0, 1))
    (tmp_path / "broken" / "1" / "1_001.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"1_001\.png: not a readable image"):
        data_from(tmp_path / "broken")


def test_data_too_large_for_memory_is_refused_before_it_is_read(tmp_path):
    write_digit_images(tmp_path / "small", per_class=40, classes=(0, 1, 2), flat=True)
    with pytest.raises(DataError, match=r"small/ \(120 images of 3x8192x8192\): the data needs 90\.0 GiB as float32 "
                                        r"tensors, but cpu has [\d.]+ GiB free"):
        data_from(tmp_path / "small", image_size=8192, channels=3)


@pytest.mark.parametrize("fields, message", [
    ({"path": "x.csv", "name": "mnist"}, r"give one of them, not both"),
    ({"path": "notes.txt"}, r"data\.path='notes\.txt': its format comes from the suffix"),
    ({"name": "digits", "label": "y"}, r"data\.label applies to data\.path"),
    ({"path": "x.npy", "label": "y"}, r"data\.label applies to tables"),
    ({"path": "x.npy", "id": "name"}, r"data\.id applies to tables"),
    ({"path": "x.csv", "label": "y", "id": "y"}, r"data\.id='y' is also in data\.label: an id column only names rows"),
    ({"path": "x.csv", "image_size": 32}, r"data\.image_size applies to image folders"),
    ({"path": "x.csv", "test": "y.npz"}, r"data\.test='y\.npz' must have the format of data\.path='x\.csv' \(csv\)"),
    ({"anomaly": [10]}, r"data\.anomaly: 10 is not a class of digits \(0\.\.9\)"),
    ({"path": "x.csv", "scale": "robust"}, r"data\.scale='robust': unknown scaling; valid names: minmax, none, standard$"),
    ({"path": "x.csv", "impute": "mean"}, r"data\.impute='mean': unknown imputation; valid names: median, none$"),
    ({"name": "mnist", "binarize": "yes"}, r"data\.binarize='yes': unknown binarization; valid names: dynamic, none, static$"),
])
def test_data_fields_are_checked_before_any_file_is_read(fields, message):
    from aesearch.config import parse_config
    from aesearch.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_config({"data": fields})


def test_new_rows_are_encoded_and_scaled_as_the_training_data_was(wine_csv, tmp_path, capsys):
    from aesearch.parts.data import read_inputs

    data = data_from(wine_csv, label="Class", split_seed=3)
    table = pd.read_csv(wine_csv)
    inputs = read_inputs(str(wine_csv), data.spec).x  # the label column is not a feature: left out, with a note
    assert "columns Class were not features in training: left out" in capsys.readouterr().err
    every_row = {tuple(np.round(row, 4)) for row in inputs.tolist()}
    assert {tuple(np.round(row, 4)) for row in data.train_x.tolist()} <= every_row
    assert len(inputs) == len(table)
    table.drop(columns=["ash", "region"]).to_csv(tmp_path / "fewer.csv", index=False)
    with pytest.raises(DataError, match=r"fewer\.csv: no column 'ash', which the data was trained with"):
        read_inputs(str(tmp_path / "fewer.csv"), data.spec)
    np.save(tmp_path / "narrow.npy", np.zeros((4, 14), np.float32))
    with pytest.raises(DataError, match=r"narrow\.npy: inputs of shape \(14,\), but the data has \(15,\)"):
        read_inputs(str(tmp_path / "narrow.npy"), data.spec)
    with pytest.raises(DataError, match=r"--input .*: the model takes vector of 15 features .*; give it as \.csv, "
                                        r"\.parquet/\.pq, \.npy, \.npz$"):
        read_inputs(str(tmp_path), data.spec)


def test_new_inputs_keep_what_names_each_row_and_its_label(tmp_path):
    """`score` writes these beside each score: an image's file and class folder, an array's row number and y."""
    from aesearch.parts.data import read_inputs

    write_digit_images(tmp_path / "digits", per_class=10, classes=(0, 1))
    spec = data_from(tmp_path / "digits").spec
    rows = read_inputs(str(tmp_path / "digits"), spec).rows
    assert rows["file"].tolist()[9:11] == ["0/0_009.png", "1/1_000.png"] and len(rows) == 20
    assert rows["class"].tolist() == ["0"] * 10 + ["1"] * 10
    np.savez(tmp_path / "v.npz", x=np.random.default_rng(0).normal(size=(20, 3)), y=np.arange(20) % 2)
    inputs = read_inputs(str(tmp_path / "v.npz"), data_from(tmp_path / "v.npz").spec)
    assert inputs.rows["row"].tolist() == list(range(20)) and inputs.rows["y"].tolist() == ["0", "1"] * 10
