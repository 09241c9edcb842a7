"""`aesearch score` on a model trained here (`aesearch train`, 2 epochs, no Ray): each output row keeps
its input's identifier and label, in the input's order, and `is_anomaly` is the score above a threshold
chosen on the model's own validation split, stated beside the output and overridable."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import f1_score

from aesearch.cli import main
from tests.test_bad_input import nothing_written, refused
from tests.user_data import wine_table

ID = "wine_id"


@pytest.fixture(scope="module")
def wine_model(tmp_path_factory):
    """A checkpoint trained on wine.csv (labelled anomalies, an id column), and the table it read."""
    folder = tmp_path_factory.mktemp("score")
    table = wine_table()
    table.insert(0, ID, [f"w{i:03d}" for i in range(len(table))])
    table.to_csv(folder / "wine.csv", index=False)
    config = {"data": {"path": str(folder / "wine.csv"), "label": "Class", "anomaly": [1], "id": ID},
              "epochs": 2, "model": {"hidden_dims": [16], "latent_dim": 4},
              "evaluation": {"iwae_samples": 5, "kmeans_restarts": 1}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(folder / "config.yaml"), "--out", str(folder / "run")]) == 0
    return folder / "run" / "best.pt", table


def validation_scores(checkpoint):
    """The model's scores of its validation split, and which of those rows are anomalies: computed
    here from the parts, independently of `score`."""
    from aesearch.api import load_model
    from aesearch.parts.data import load_data
    from aesearch.training.inference import infer

    trained = load_model(checkpoint)
    data = load_data(trained.config.data)
    return infer(trained.model, data.val_x, trained.scorer).scores.numpy(), data.spec.is_anomaly(data.val_y).numpy()


def score(capsys, checkpoint, input, out, *options):
    assert main(["score", str(checkpoint), "--input", str(input), "--out", str(out), *options]) == 0
    capsys.readouterr()
    return json.loads(out.with_name(out.name + ".json").read_text())


def test_scores_keep_each_rows_id_and_label_in_input_order_and_flag_those_above_the_validation_threshold(
        wine_model, tmp_path, capsys):
    checkpoint, table = wine_model
    shuffled = table.sample(frac=1, random_state=1)  # not the training order
    shuffled.to_csv(tmp_path / "new.csv", index=False)
    stated = score(capsys, checkpoint, tmp_path / "new.csv", tmp_path / "scores.csv")
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert list(scores.columns[:4]) == [ID, "Class", "score", "is_anomaly"]
    assert scores[ID].tolist() == shuffled[ID].tolist() and scores["Class"].tolist() == shuffled["Class"].tolist()
    assert "error_alcohol" in scores.columns and "error_region" in scores.columns and f"error_{ID}" not in scores.columns
    # labelled anomalies: the threshold that maximises F1 on validation, stated with its rule
    assert stated["rule"] == "f1" and stated["is_anomaly"] == "score > threshold"
    threshold = stated["threshold"]
    assert scores["is_anomaly"].tolist() == (scores["score"] > threshold).tolist()
    val, anomalous = validation_scores(checkpoint)
    assert stated["validation_rows"] == len(val)
    best = max(f1_score(anomalous, val >= cut) for cut in val)
    assert f1_score(anomalous, val > threshold) == pytest.approx(best)


def test_without_an_id_column_the_row_index_identifies_rows(wine_model, tmp_path, capsys):
    checkpoint, table = wine_model
    rows = table.drop(columns=[ID, "Class"]).iloc[::-1]  # a Parquet file keeps its (here reversed) index
    rows.to_parquet(tmp_path / "new.parquet")
    score(capsys, checkpoint, tmp_path / "new.parquet", tmp_path / "scores.parquet")
    scores = pd.read_parquet(tmp_path / "scores.parquet")
    assert list(scores.columns[:3]) == ["row", "score", "is_anomaly"]
    assert scores["row"].tolist() == rows.index.tolist()


def test_the_threshold_can_be_given_or_chosen_by_contamination(wine_model, tmp_path, capsys):
    checkpoint, table = wine_model
    table.to_csv(tmp_path / "new.csv", index=False)
    stated = score(capsys, checkpoint, tmp_path / "new.csv", tmp_path / "given.csv", "--threshold", "0.5")
    given = pd.read_csv(tmp_path / "given.csv")
    assert stated["threshold"] == 0.5 and stated["rule"] == "given"
    assert given["is_anomaly"].tolist() == (given["score"] > 0.5).tolist()
    stated = score(capsys, checkpoint, tmp_path / "new.csv", tmp_path / "share.npy", "--contamination", "0.2")
    val, _ = validation_scores(checkpoint)
    assert stated["rule"] == "contamination" and stated["contamination"] == 0.2
    assert stated["threshold"] == pytest.approx(np.quantile(val, 0.8), rel=1e-6)
    array = np.load(tmp_path / "share.npy")  # .npy: the numeric columns (not the text ids), named in the statement
    assert stated["columns"][:3] == ["Class", "score", "is_anomaly"] and array.shape == (len(table), len(stated["columns"]))
    assert np.array_equal(array[:, 2], array[:, 1] > stated["threshold"])


@pytest.mark.parametrize("options, message", [
    (["--threshold", "nan"], "--threshold nan: must be a finite number"),
    (["--threshold", "inf"], "--threshold inf: must be a finite number"),
    (["--contamination", "0"], "--contamination 0.0: must be between 0 and 1"),
    (["--contamination", "1.5"], "--contamination 1.5: must be between 0 and 1"),
    (["--threshold", "1", "--contamination", "0.1"], "not allowed with argument"),
])
def test_a_bad_threshold_is_refused_in_one_line_and_nothing_is_written(options, message, wine_model, tmp_path,
                                                                       capsys, monkeypatch):
    checkpoint, table = wine_model
    monkeypatch.chdir(tmp_path)
    table.to_csv("new.csv", index=False)
    line = refused(capsys, ["score", str(checkpoint), "--input", "new.csv", "--out", "scores.csv", *options])
    assert message in line
    nothing_written(tmp_path, "new.csv")


def test_a_category_level_never_seen_in_training_is_always_an_error_of_its_column(wine_model, tmp_path, capsys):
    """error_<categorical column> is 1 where the reconstruction's most likely level is not the row's:
    a level training never saw (encoded as no level at all) can never be reconstructed."""
    checkpoint, table = wine_model
    table.assign(region="east").to_csv(tmp_path / "new.csv", index=False)
    score(capsys, checkpoint, tmp_path / "new.csv", tmp_path / "scores.csv")
    assert (pd.read_csv(tmp_path / "scores.csv")["error_region"] == 1).all()


def test_without_the_models_own_data_the_threshold_must_be_given(wine_model, tmp_path, capsys, monkeypatch):
    """The threshold is chosen on the model's validation split: data that is gone, or changed since
    training (another fingerprint), cannot choose it; one line says so, and nothing is written."""
    checkpoint, table = wine_model
    monkeypatch.chdir(tmp_path)
    table.to_csv("new.csv", index=False)
    data = checkpoint.parent.parent / "wine.csv"
    kept = data.read_bytes()
    try:
        data.unlink()
        line = refused(capsys, ["score", str(checkpoint), "--input", "new.csv", "--out", "scores.csv"])
        assert "the model's data, which cannot be read" in line and "wine.csv': no such file" in line
        assert line.endswith("give --threshold")
        table.assign(alcohol=table["alcohol"].to_numpy()[::-1]).to_csv(data, index=False)
        line = refused(capsys, ["score", str(checkpoint), "--input", "new.csv", "--out", "scores.csv"])
        assert "wine.csv: not the data the model was trained on (fingerprint" in line
        nothing_written(tmp_path, "new.csv")
        score(capsys, checkpoint, "new.csv", tmp_path / "scores.csv", "--threshold", "1")  # given: no data needed
    finally:
        data.write_bytes(kept)
