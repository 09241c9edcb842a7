"""When the tracking server does not answer: records wait in an outbox and are sent again.

A trial keeps training while the server is down; what it could not log is retried every few
seconds, and at its end for up to `budget.tracking_patience_s`.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient


def is_unreachable(error: BaseException) -> bool:
    """The tracking server did not answer (down, restarting, overloaded): worth trying again later.
    MLflow wraps the HTTP client's error in an MlflowException; its cause or context names it."""
    import requests

    transient = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.RetryError,
                 ConnectionError, TimeoutError)
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, transient) or "Max retries exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def describe_error(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


class Outbox:
    """What is sent to the tracking server, delivered in order. While the server does not answer,
    everything is kept (files copied aside) and training goes on; each later send tries again (at
    most every `retry_every_s`), and `deliver` waits for it, up to a patience, at the end. What could
    not be delivered is named by `undelivered`, never dropped in silence.

    `in_background`: a thread of its own delivers, so that the sender does not wait for the server
    (the search driver, whose every wait delays the next trial); `flush` and `deliver` then wait for
    what it is delivering. Errors other than the server not answering go to `on_error`, required then.
    `most_waiting` (in the background): a send that finds more records waiting waits until they are
    delivered. A sender faster than the server (trials ending faster than their runs are closed)
    otherwise piles up records without bound, and every wait for them (each save of the search state)
    grows with the pile: at 10,000 trials, minutes."""

    def __init__(self, retry_every_s: float = 5.0, on_error: Any = None, in_background: bool = False,
                 most_waiting: int | None = None):
        self.pending: list[tuple[str, Any]] = []  # (what, a call that delivers it)
        self.on_error = on_error  # given: other errors are handed to it (and the item dropped), not raised
        self.retry_every_s = retry_every_s
        self.failed_at: float | None = None  # when the server last did not answer
        self.last_error = ""
        self.seconds = 0.0  # time spent delivering (and waiting for the server)
        self.delivering = threading.Lock()  # one deliverer at a time: the order is kept
        self.wake: threading.Event | None = None
        self.most_waiting = most_waiting
        if in_background:
            if on_error is None:
                raise ValueError("a background outbox cannot raise into its sender: give it on_error")
            self.wake = threading.Event()
            threading.Thread(target=self._deliver_in_background, name="aesearch-outbox", daemon=True).start()

    def send(self, what: str, deliver: Any) -> None:
        self.pending.append((what, deliver))
        if self.wake is None or self.most_waiting is not None and len(self.pending) > self.most_waiting:
            self.flush()  # here; in the background, after what the thread is delivering
        else:
            self.wake.set()

    def _deliver_in_background(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            if not self.flush(force=True):  # the server does not answer: try again later
                time.sleep(self.retry_every_s)
                self.wake.set()

    def send_file(self, path: Path | str, artifact_path: str, client: MlflowClient, run_id: str) -> None:
        """An artifact: a copy waits in a folder of its own until the server has it (then the folder goes;
        no folder outlives what it holds, even in a process Ray kills)."""
        import shutil

        kept = Path(tempfile.mkdtemp(prefix="aesearch-outbox-")) / Path(path).name
        shutil.copyfile(path, kept)

        def deliver() -> None:
            client.log_artifact(run_id, str(kept), artifact_path)
            shutil.rmtree(kept.parent, ignore_errors=True)

        self.send(f"{artifact_path}/{kept.name}", deliver)

    def flush(self, force: bool = False) -> bool:
        """Deliver what waits, in order; False if the server still does not answer."""
        if not force and self.failed_at is not None and time.monotonic() - self.failed_at < self.retry_every_s:
            return False
        started = time.perf_counter()
        try:
            return self._deliver_pending()
        finally:
            self.seconds += time.perf_counter() - started

    def _deliver_pending(self) -> bool:
        with self.delivering:
            while self.pending:
                try:
                    self.pending[0][1]()
                except Exception as error:
                    if is_unreachable(error):
                        self.failed_at, self.last_error = time.monotonic(), describe_error(error)
                        return False
                    if self.on_error is None:
                        raise
                    self.on_error(self.pending[0][0], error)
                self.pending.pop(0)
            self.failed_at = None
            return True

    def deliver(self, patience_s: float) -> bool:
        """Wait (up to `patience_s`) until everything is delivered."""
        deadline = time.monotonic() + patience_s
        while not self.flush(force=True):
            if time.monotonic() >= deadline:
                return False
            pause = min(self.retry_every_s, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)
            self.seconds += pause
        return True

    def undelivered(self) -> str:
        """'' when everything arrived, else what did not and why."""
        if not self.pending:
            return ""
        names = ", ".join(what for what, _ in self.pending[:5]) + (", ..." if len(self.pending) > 5 else "")
        return f"{len(self.pending)} records not delivered ({names}): {self.last_error}"


def patiently(call: Any, patience_s: float, retry_every_s: float = 5.0, transient: Any = is_unreachable) -> Any:
    """`call()`, tried again while the tracking server (or what `transient` tells) does not answer, up to
    `patience_s`."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return call()
        except Exception as error:
            if not transient(error) or time.monotonic() >= deadline:
                raise
            time.sleep(min(retry_every_s, max(0.0, deadline - time.monotonic())))
