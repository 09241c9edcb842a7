"""Local paths and the URIs that name them, turned one into the other in one place.

A hand-built URI goes wrong quietly: `sqlite:////home/a/mlflow.db` split by `urlsplit` has the path
`//home/a/mlflow.db`, and `Path("//home/a").as_uri()` is `file:////home/a`, which MLflow reads as
host `home`, path `/a`: every artifact of a search went to `/a/...` at the filesystem root (or
failed, for anyone not root). Every path is made absolute first (`~` expanded), since a search's
Ray workers do not share the working directory the user typed it in.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from aesearch.errors import UserError

LOCAL_HOSTS = ("", "localhost")
DEFAULT_STORAGE = "ray_results"  # a search's results and checkpoints, from the command line as from Python


def absolute(path: str | Path) -> Path:
    """`~` expanded, relative to the working directory, `..` resolved; links kept as they are."""
    return Path(os.path.abspath(Path(path).expanduser()))


def file_uri(path: str | Path) -> str:
    """`file:///abs/path`, percent-encoded (spaces, non-ASCII, `#`, `?`), as MLflow and pyarrow read it."""
    return absolute(path).as_uri()


def sqlite_uri(path: str | Path) -> str:
    """`sqlite:////abs/path.db`, the path as it is: MLflow creates the database's folder from the
    URI's text, SQLAlchemy opens the file from the decoded text, so a path that percent-encoding
    would change (`?` starts a query, `%41` decodes to `A`) cannot be named at all: refused."""
    database = str(absolute(path))
    if "?" in database or re.search("%[0-9A-Fa-f]{2}", database):
        raise UserError(f"{database}: a SQLite tracking store's path may not contain '?' or '%' followed by two "
                        "hex digits (MLflow and SQLAlchemy would read two different files); use another folder")
    return "sqlite:///" + database


def local_path(uri: str) -> Path | None:
    """The local file a `sqlite:`/`file:` URI or a plain path names; None for other stores (http,
    postgresql, s3, ...) and for a `file:` URI that names another host."""
    parts = urlsplit(uri)
    if parts.scheme == "sqlite":
        database = unquote(uri.split(":///", 1)[1].split("?", 1)[0]) if ":///" in uri else ""
        return absolute(database) if database and database != ":memory:" else None
    if parts.scheme == "file":
        return Path(url2pathname(parts.path)) if parts.netloc in LOCAL_HOSTS else None
    if parts.scheme == "":  # a plain path
        return absolute(uri)
    return None


def local_or_uri(location: str | Path) -> str:
    """A search's storage as Ray Tune takes it: a URI (s3://, gs://, file://) as given, a local
    folder as an absolute path."""
    return str(location) if "://" in str(location) else str(absolute(location))


def misplaced_artifacts(uri: str) -> tuple[Path, Path] | None:
    """(where MLflow really put the artifacts, where they were meant to be) for a location that
    an earlier aesearch wrote, `file:////abs/...`, or MLflow's rewriting of it, `file://abs/...`
    (host `abs`): MLflow stored them under `/...`, without the path's first folder. None for any
    other location."""
    parts = urlsplit(uri)
    if parts.scheme != "file":
        return None
    if uri.startswith("file:////"):
        meant = Path("/", *Path(url2pathname(parts.path)).parts[1:])  # //abs/...: a doubled slash
    elif parts.netloc not in LOCAL_HOSTS:
        meant = Path("/", parts.netloc, *Path(url2pathname(parts.path)).parts[1:])
    else:
        return None
    return Path("/", *meant.parts[2:]), meant
