"""Checkpoint files: plain tensors and plain data, read back only with `weights_only=True`.

A checkpoint holds everything that continues a run exactly (model, optimiser, epoch, the
state of the run's random generator, history, best weights so far) and everything that explains
it (the resolved config, the dataset fingerprint, and the data's spec: its shape, its columns and
their scaling, so that the model can be rebuilt and fed new inputs without the training data). Nothing in it is a pickled object, so loading it runs no code.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aesearch.config import TrainConfig, on_device, parse_config, resolve_device
from aesearch.errors import CheckpointError
from aesearch.parts.data import DataSpec
from aesearch.parts.models import Autoencoder, build_model
from aesearch.training.scoring import FittedScorer

if TYPE_CHECKING:
    from aesearch.parts.data import Data

FORMAT = "aesearch-checkpoint/1"
BEST_FILE = "best.pt"  # a run's best epoch so far: in its run folder, its Tune checkpoints, ...
BEST_CHECKPOINT = f"checkpoints/{BEST_FILE}"  # ... and its MLflow run's artifacts
REQUIRED_KEYS = {"format", "config", "fingerprint", "epoch", "model", "optimizer", "rng", "history", "best"}


def save_checkpoint(path: Path | str, state: dict[str, Any]) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save({"format": FORMAT, **state}, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read a checkpoint on the CPU; refuse anything that is not plain tensors and data."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):  # torch.save always writes a zip archive
        raise CheckpointError(f"{path}: not a readable checkpoint (not a torch.save archive: corrupted or truncated?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        culprit = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        raise CheckpointError(
            f"{path}: refused to load: it holds pickled objects, not only tensors and plain data"
            + (f" (it would call {culprit.group(1)})" if culprit else "")
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupted or truncated: {type(error).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not REQUIRED_KEYS <= state.keys():
        raise CheckpointError(f"{path}: not an aesearch checkpoint (expected format {FORMAT!r})")
    return state


@dataclass
class TrainedModel:
    """A model as a checkpoint left it: the autoencoder (in eval mode), its config, the whole state."""

    model: Autoencoder
    config: TrainConfig
    state: dict[str, Any]

    @cached_property
    def scorer(self) -> FittedScorer:
        """The anomaly scorer fitted to the best weights, as the checkpoint keeps it (one per model: a
        served model builds its scorer's detector once)."""
        return FittedScorer.from_checkpoint(self.state)

    @property
    def centres(self) -> torch.Tensor | None:
        """The cluster centres fitted to (or refined with) the best weights; None: the model was not
        trained to cluster (see Trainer.clusters_wanted)."""
        return self.state.get("cluster_centres")


def load_trained_model(source: Path | str | dict[str, Any], data: Data | None = None, device: str | None = None,
                       where: str | None = None) -> TrainedModel:
    """The model a checkpoint (a path, or its loaded state) holds, on `device` (default: the config's, or
    the CPU). With `data`, refuse a checkpoint made on other data (its fingerprint differs)."""
    state = source if isinstance(source, dict) else load_checkpoint(source)
    where = where or str(source if not isinstance(source, dict) else "checkpoint")
    config = on_device(parse_config(state["config"], source=f"{where} (config)"), device)
    if data is not None and data.fingerprint != state["fingerprint"]:
        raise CheckpointError(
            f"{where}: trained on dataset fingerprint {state['fingerprint']}, but {config.data.dataset} here has "
            f"fingerprint {data.fingerprint}: the data (or its files under the data directory) changed"
        )
    model = build_model(config.model, checkpoint_spec(state, config))
    model.load_state_dict(state["model"])
    return TrainedModel(model.to(resolve_device(config.runtime.device) if device else "cpu").eval(), config, state)


def checkpoint_spec(state: dict[str, Any], config: TrainConfig) -> DataSpec:
    """The spec of the data a checkpoint was trained on; checkpoints made before specs were saved
    were all trained on built-in datasets."""
    if "data_spec" in state:
        return DataSpec.from_dict(state["data_spec"])
    return config.data.known_spec
