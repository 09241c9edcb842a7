"""`aesearch relocate`: moves the artifacts an earlier aesearch misplaced back beside the store.

Those versions named an embedded store's artifact folder `file:////abs/mlartifacts/NAME`, which
MLflow reads as host `abs`: it wrote them under `/mlartifacts/...` less the first folder of the
path (see `aesearch.locations`). Relocating moves that folder to where it was meant to be and
rewrites the locations the SQLite store holds (the experiment's, every run's, the registered
model versions'), so MLflow, the report, reproduce and score find them there.
"""

from __future__ import annotations

import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from aesearch.errors import UserError
from aesearch.locations import file_uri, local_path, misplaced_artifacts
from aesearch.tracking.store import check_store_exists, client


@dataclass(frozen=True)
class Relocation:
    experiment: str
    source: Path  # where MLflow had put the artifacts
    target: Path  # beside the store, where they belong
    moved: bool  # False: nothing was at `source` (a search that could not write there)
    rows: int  # records of the store that named the old location


def relocate(uri: str, experiment: str) -> Relocation:
    database = local_path(uri)
    if database is None or not uri.startswith("sqlite:"):
        raise UserError(f"--tracking-uri {uri}: only an embedded SQLite store can have misplaced artifacts")
    check_store_exists(uri)
    found = client(uri).get_experiment_by_name(experiment)
    if found is None:
        raise UserError(f"experiment {experiment!r}: no such experiment in the tracking store {uri}")
    old = found.artifact_location
    misplaced = misplaced_artifacts(old)
    if misplaced is None:
        raise UserError(f"experiment {experiment!r}: its artifacts are where its location says ({old}); "
                        "nothing to relocate")
    source, meant = misplaced
    if meant.exists() and any(meant.iterdir()):
        raise UserError(f"experiment {experiment!r}: {meant} already holds files; move {source} there yourself")
    moved = source.is_dir()
    if moved:
        meant.parent.mkdir(parents=True, exist_ok=True)
        if meant.exists():
            meant.rmdir()
        shutil.move(str(source), str(meant))
    new = file_uri(meant)
    mlflow_form = "file://" + old.removeprefix("file:////")  # how MLflow wrote each run's location
    rows = _rewrite(database, {old: new, mlflow_form: new})
    return Relocation(experiment, source, meant, moved, rows)


def _rewrite(database: Path, replacements: dict[str, str]) -> int:
    """Replaces each old location by the new one in every text column of the store, in one transaction."""
    changed = 0
    with sqlite3.connect(database) as connection:
        tables = [name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            columns = [row[1] for row in connection.execute(f'PRAGMA table_info("{table}")')
                       if any(kind in row[2].upper() for kind in ("CHAR", "TEXT", "CLOB"))]
            for column in columns:
                for old, new in replacements.items():
                    changed += connection.execute(
                        f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) WHERE instr("{column}", ?) > 0',
                        (old, new, old)).rowcount
    return changed
