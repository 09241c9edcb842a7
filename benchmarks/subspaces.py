"""The dense subspace of the shipped space mnist_variants, which the benchmarks search and train."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from aesearch.schema import load_yaml

SPACE_FILE = Path(__file__).resolve().parent.parent / "aesearch" / "spaces" / "mnist_variants.yaml"


def dense_subspace() -> dict[str, Any]:
    """The space's document with `model.architecture` fixed to dense and the parameters that
    exist only for other architectures left out."""
    document = copy.deepcopy(load_yaml(SPACE_FILE))
    document["space"]["model.architecture"]["choices"] = ["dense"]
    document["space"] = {
        name: parameter for name, parameter in document["space"].items()
        if parameter.get("when", {}).get("model.architecture", "dense") == "dense"
    }
    return document
