"""aesearch: distributed hyperparameter search for autoencoders (Ray Tune + Optuna + ASHA, tracked in MLflow).

The public Python API is `aesearch.api`, re-exported here: `load_space`, `run_search`, `make_report`,
`reproduce`, `train`, `load_model`, ... It loads on first use, so `import aesearch` (and the
command line's start) stays light. `load_space("quickstart")` and `load_config("vae")` read the
spaces and configs shipped inside the package, from any folder.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "SearchSpace", "TrainConfig", "TrainedModel", "encode", "load_config", "load_model", "load_space", "make_report",
    "parse_config", "parse_space", "reproduce", "run_search", "score", "train",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from aesearch import api

        return getattr(api, name)
    raise AttributeError(f"module 'aesearch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
