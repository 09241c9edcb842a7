"""User data for the tests: real files written by the product's own example writers, and a small
hand-built table spec for the parts' arithmetic."""

from aesearch.examples import wine_table, write_digit_images
from aesearch.parts.data import CATEGORICAL, NUMERIC, VECTOR, Column, DataSpec

# A table as the model sees it: alcohol (numeric), colour (one-hot over 3 levels), acidity (numeric).
TABLE = DataSpec("wine.csv", VECTOR, (5,), unit_range=False, columns=(
    Column("alcohol", NUMERIC, 0, center=13.0, scale=0.8),
    Column("colour", CATEGORICAL, 1, levels=("red", "white", "rose")),
    Column("acidity", NUMERIC, 4, center=3.0, scale=0.5),
))



def write_separable_wine(folder):
    """The wine table with its anomalies moved ten standard deviations away from every normal row,
    as a CSV file: anomaly metrics are saturated (AUROC 1) from the first epoch. Its data section."""
    table = wine_table()
    numeric = [name for name in table.columns if name not in ("region", "Class")]
    anomalous = table["Class"] == 1
    table.loc[anomalous, numeric] += 10 * table.loc[~anomalous, numeric].std()
    path = folder / "separable.csv"
    table.to_csv(path, index=False)
    return {"path": str(path), "label": "Class", "anomaly": [1]}


__all__ = ["TABLE", "wine_table", "write_digit_images", "write_separable_wine"]
