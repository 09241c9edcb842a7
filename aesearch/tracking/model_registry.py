"""The search's best model, logged with a signature and registered in MLflow's model registry."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import threading
from importlib import metadata
from typing import TYPE_CHECKING, Any

import torch

from aesearch.tracking.runs import TRIAL_ID_TAG
from aesearch.tracking.store import fluent_api_on
from aesearch.training.checkpoints import BEST_CHECKPOINT

if TYPE_CHECKING:
    from mlflow import MlflowClient


class Reconstruction(torch.nn.Module):
    """What the registered model serves: images (N, C, H, W) in [0, 1] in, reconstructions out."""

    def __init__(self, autoencoder: torch.nn.Module):
        super().__init__()
        self.autoencoder = autoencoder.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder(x, sample=False).x_hat


def start_export_warmup() -> threading.Thread:
    """Load, in a background thread, what `register_best_model` needs: MLflow's PyTorch flavour and
    torch.export (torch._dynamo and friends take seconds to import and to export a first model),
    so that the search's end does not wait for them."""

    def warm_up() -> None:
        import mlflow.pytorch  # noqa: F401
        import torch.export

        with contextlib.suppress(Exception):  # register_best_model then pays for it itself
            torch.export.export(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sigmoid()), (torch.zeros(1, 2),))

    thread = threading.Thread(target=warm_up, name="aesearch-export-warmup", daemon=True)
    thread.start()
    return thread


def register_best_model(client: MlflowClient, uri: str, parent_run_id: str, name: str, run: Any,
                        metrics: dict[str, float]) -> str | None:
    """Log the trial run's best model (best weights, with a signature) under the search run and
    register it as `name`; None if the trial ended before its first best epoch."""
    import mlflow
    from mlflow.models import infer_signature

    from aesearch.training.checkpoints import load_trained_model

    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run.info.run_id, BEST_CHECKPOINT, folder)
        except Exception:  # noqa: BLE001 - a trial that ended before its first best epoch
            return None
        trained = load_trained_model(path, where=f"{BEST_CHECKPOINT} of run {run.info.run_id}")
    shape = trained.model.spec.shape
    model = Reconstruction(trained.model)
    example = torch.rand(2, *shape)
    with torch.no_grad():
        signature = infer_signature(example.numpy(), model(example).numpy())
    quiet = contextlib.redirect_stderr(io.StringIO())  # MLflow prints its own notes on the registry
    with fluent_api_on(uri), mlflow.start_run(run_id=parent_run_id), quiet:
        logging.getLogger("mlflow.utils.environment").setLevel(logging.ERROR)  # pip version guessing
        info = mlflow.pytorch.log_model(
            model, name="best_model", signature=signature, input_example=example.numpy(),
            registered_model_name=name,
            pip_requirements=[f"torch=={metadata.version('torch')}", f"aesearch=={metadata.version('aesearch')}"],
            metadata={"trial_id": run.data.tags.get(TRIAL_ID_TAG), "trial_run_id": run.info.run_id,
                      **{k: float(v) for k, v in metrics.items()}},
        )
        mlflow.set_tag("best_trial_run", run.info.run_id)
        mlflow.log_metrics({f"best/{k}": float(v) for k, v in metrics.items()})
    return info.model_uri
