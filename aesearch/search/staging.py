"""Searches of one name started at once on one machine each get a staging folder of their own.

Ray Tune stages a search's state on the driver's machine, in `<Ray session>/artifacts/<the second
it started>/<search name>/`, and copies that folder to the search's storage. Two searches of the same
name started within one second on one machine (a script that launches several, two users' drivers
on the head node) would share the folder, and each copy the other's trials and search state into
its own storage, silently. Ray names the folder by the second only, so aesearch makes such searches
start in different seconds: a driver holds its search name's lock, in that same session folder, from
just before Tune starts until Tune has named the folder (the `StagingNamed` callback's setup), and
writes down that second; the next driver of the name waits for a later one.
"""

from __future__ import annotations

import fcntl
import time
from pathlib import Path
from typing import IO

from ray.train.constants import _get_ray_train_session_dir  # where Tune puts its staging folders
from ray.tune import Callback

_held: dict[str, StartClaim] = {}  # this driver's claims, by search name, until Tune names the folder
_staged: dict[str, str] = {}  # search name -> its staging folder, once a trial has started


def staging_root() -> Path:
    """Where Tune puts this machine's staging folders in the connected Ray session."""
    return Path(_get_ray_train_session_dir())


class StartClaim:
    """`with StartClaim(name, staging_root()): tuner.fit()`: no other search of this name starts Tune
    in the same second from the same staging root."""

    def __init__(self, name: str, root: Path):
        self.name, self.root = name, root
        self.lock: IO[str] | None = None

    def __enter__(self) -> StartClaim:
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = open(self.root / f".aesearch-start-{self.name}", "a+", encoding="utf-8")
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        self.lock.seek(0)
        previous = int(self.lock.read().strip() or 0)  # the second the last search of this name started in
        while time.time() < previous + 1:
            time.sleep(previous + 1 - time.time())
        _held[self.name] = self
        return self

    def release(self) -> None:
        """Tune has named the staging folder by now: write down this second, let the next one start."""
        _held.pop(self.name, None)
        if self.lock is None:
            return
        self.lock.seek(0)
        self.lock.truncate()
        self.lock.write(f"{int(time.time())}\n")
        self.lock.flush()
        fcntl.flock(self.lock, fcntl.LOCK_UN)
        self.lock.close()
        self.lock = None

    def __exit__(self, *exc) -> None:
        self.release()  # Tune failed before its callbacks' setup, or it was released already


def staged_folder(name: str) -> str | None:
    """The staging folder of this driver's search `name` (None if no trial of it started)."""
    return _staged.get(name)


class StagingNamed(Callback):
    """Releases the search's start claim: Tune calls `setup` after it has named its staging folder;
    and learns that folder from the first trial to start (`staged_folder`)."""

    def __init__(self, name: str):
        self.name = name

    def setup(self, **info):
        claim = _held.get(self.name)
        if claim is not None:
            claim.release()

    def on_trial_start(self, iteration, trials, trial, **info):
        _staged[self.name] = trial.storage.experiment_driver_staging_path
