"""The search's best model, logged with a signature and registered in MLflow's model registry
(what it serves: `served_model`)."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import threading
import warnings
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aesearch.tracking.runs import TRIAL_ID_TAG
from aesearch.tracking.store import fluent_api_on
from aesearch.training.checkpoints import BEST_CHECKPOINT

if TYPE_CHECKING:
    from mlflow import MlflowClient


def start_export_warmup() -> threading.Thread:
    """Load, in a background thread, what `register_best_model` needs (MLflow's pyfunc flavour and
    model signatures take seconds to import), so that the search's end does not wait for them."""

    def warm_up() -> None:
        with contextlib.suppress(Exception):  # register_best_model then pays for it itself
            import mlflow.models.signature  # noqa: F401
            import mlflow.pyfunc  # noqa: F401

    thread = threading.Thread(target=warm_up, name="aesearch-export-warmup", daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def no_type_hint_advice():
    """The served model's predict has no type hints on purpose (its signature is given): MLflow's advice
    to add them is not wanted; other warnings pass."""
    with warnings.catch_warnings(record=True) as caught:  # a filter would not do: MLflow sets its own inside
        yield
    for warning in caught:
        if "type hint" not in str(warning.message):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


CHAMPION = "champion"  # the registry alias of a search's best model (MLflow's aliases replace stages)


def register_best_model(client: MlflowClient, uri: str, parent_run_id: str, name: str, run: Any,
                        metrics: dict[str, float], front: list[str] | None = None) -> str | None:
    """Log the trial run's best model (best weights, with a signature) under the search run, register
    it as `name` and point the alias `champion` at that version; None if the trial ended before its
    first best epoch. `front` (a multi-objective search): the trials on the Pareto front, as a tag of
    the version (the champion is the front member best on the first objective)."""
    import mlflow
    from mlflow.models import infer_signature

    from aesearch.plugins import load_plugins, shipped_modules
    from aesearch.training.checkpoints import load_trained_model

    with no_type_hint_advice():  # MLflow gives it when the model's class is defined, and when it is logged
        from aesearch.tracking.served_model import CHECKPOINT, MODEL_CODE, example_input, predict

    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run.info.run_id, BEST_CHECKPOINT, folder)
        except Exception:  # noqa: BLE001 - a trial that ended before its first best epoch
            return None
        trained = load_trained_model(path, where=f"{BEST_CHECKPOINT} of run {run.info.run_id}")
        example = example_input(trained.model.spec)
        signature = infer_signature(example, predict(trained, example))
        code = Path(folder) / "served_model.py"
        code.write_text(MODEL_CODE, encoding="utf-8")
        quiet = contextlib.redirect_stderr(io.StringIO())  # MLflow prints its own notes on the registry
        with fluent_api_on(uri), mlflow.start_run(run_id=parent_run_id), quiet, no_type_hint_advice():
            logging.getLogger("mlflow.utils.environment").setLevel(logging.ERROR)  # pip version guessing
            info = mlflow.pyfunc.log_model(
                name="best_model", python_model=str(code), artifacts={CHECKPOINT: path}, signature=signature,
                input_example=example, registered_model_name=name,
                # the user's plug-ins travel with the model: MLflow puts them on sys.path where it loads it
                code_paths=shipped_modules(load_plugins(trained.config.plugins)) or None,
                pip_requirements=[f"torch=={metadata.version('torch')}", f"aesearch=={metadata.version('aesearch')}"],
                metadata={"trial_id": run.data.tags.get(TRIAL_ID_TAG), "trial_run_id": run.info.run_id,
                          **{k: float(v) for k, v in metrics.items()}},
            )
            mlflow.set_tag("best_trial_run", run.info.run_id)
            mlflow.log_metrics({f"best/{k}": float(v) for k, v in metrics.items()})
    version = str(info.registered_model_version)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "trial_id", str(run.data.tags.get(TRIAL_ID_TAG)))
    if front:
        client.set_model_version_tag(name, version, "pareto_front", ", ".join(front))
    return info.model_uri
