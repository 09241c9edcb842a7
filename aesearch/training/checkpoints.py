"""Checkpoint files: plain tensors and plain data, read back only with `weights_only=True`.

A checkpoint holds everything that continues a run exactly (model, optimiser, epoch, the
state of the run's random generator, history, best weights so far) and everything that explains it (the resolved config and
the dataset fingerprint). Nothing in it is a pickled object, so loading it runs no code.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from aesearch.errors import CheckpointError

FORMAT = "aesearch-checkpoint/1"
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
