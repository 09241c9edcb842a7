"""The model a search registers in MLflow: raw data in; codes, reconstructions and anomaly scores out.

It is an MLflow `python_function` model logged "from code" (MLflow loads this class, not a pickle),
with the best trial's checkpoint as its one artifact, read with `weights_only=True`. The checkpoint
carries the data's spec, so the scaler and the one-hot encoding travel inside the model:

- a model of a table takes raw rows (a pandas DataFrame with the training columns, numbers in their
  original units, categories as text) and returns a DataFrame: `score`, `error_<column>`, the codes
  `z0, z1, ...` and the reconstruction `recon_<column>` in original units (categories as levels);
- a model of images (or of a plain feature matrix) takes an array of inputs and returns a dict of
  arrays: `score` (N,), `code` (N, latent_dim) and `reconstruction` (the inputs' shape).

`mlflow models serve -m models:/NAME/VERSION --env-manager local` serves it over HTTP.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

CHECKPOINT = "checkpoint"  # the artifact's key
# The file MLflow runs to get the model ("models from code"); written next to the checkpoint when
# the model is logged, so that importing this module sets nothing.
MODEL_CODE = """import mlflow.models
from aesearch.tracking.served_model import AutoencoderModel

mlflow.models.set_model(AutoencoderModel())
"""


class AutoencoderModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from aesearch.training.checkpoints import load_trained_model

        self.trained = load_trained_model(context.artifacts[CHECKPOINT])

    # A DataFrame hint is one MLflow infers no schema from (the model is logged with a signature of its
    # own) and converts nothing for; without a hint MLflow warns at every load. Images arrive as arrays.
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        return predict(self.trained, model_input)


def predict(trained: Any, model_input: Any) -> pd.DataFrame | dict[str, np.ndarray]:
    """What the served model answers for `model_input` (see the module docstring)."""
    from aesearch.parts.data import decode_rows, encode_array, encode_frame
    from aesearch.training.inference import infer

    spec = trained.model.spec
    if isinstance(model_input, pd.DataFrame) and spec.columns:
        x = encode_frame(model_input, spec, trained.config.data.impute, "request")
    else:
        x = encode_array(np.asarray(model_input.values if isinstance(model_input, pd.DataFrame) else model_input),
                         spec, "request")
    result = infer(trained.model, x, trained.scorer, trained.centres)
    if not spec.columns or not isinstance(model_input, pd.DataFrame):
        clusters = {} if result.clusters is None else {"cluster": result.clusters.numpy()}
        return {"score": result.scores.numpy(), "code": result.codes.numpy(),
                "reconstruction": result.reconstructions.numpy(), **clusters}
    reconstruction = decode_rows(result.reconstructions.numpy(), spec).add_prefix("recon_")
    return pd.concat([result.score_table(), result.code_table(), reconstruction], axis=1)


def example_input(spec: Any) -> pd.DataFrame | np.ndarray:
    """Two raw inputs of the training data's kind: rows at the columns' centres (first levels), or zeros."""
    from aesearch.parts.data import decode_rows

    if not spec.columns:
        return np.zeros((2, *spec.shape), dtype=np.float32)
    values = np.zeros((2, spec.features), dtype=np.float32)
    for group in spec.categorical_groups:
        values[:, group.start] = 1.0
    return decode_rows(values, spec)
