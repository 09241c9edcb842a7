"""The outbox the driver closes trial runs through: delivered by a thread of its own, in order, kept
while the tracking server does not answer, waited for at a save of the search state and at its end."""

import threading
import time

import pytest
import requests

from aesearch.tracking.outbox import Outbox, patiently


def test_a_background_outbox_does_not_make_its_sender_wait_and_keeps_the_order():
    release, delivered, warnings = threading.Event(), [], []
    outbox = Outbox(on_error=lambda what, error: warnings.append(what), in_background=True)

    def slow_first() -> None:
        release.wait(10)
        delivered.append("first")

    started = time.monotonic()
    outbox.send("first", slow_first)
    for name in ("second", "third"):
        outbox.send(name, lambda name=name: delivered.append(name))
    assert time.monotonic() - started < 1 and delivered == []  # the sender went on; the server is slow
    release.set()
    assert outbox.flush()  # waits for what the thread is delivering, then delivers what is left
    assert delivered == ["first", "second", "third"] and outbox.undelivered() == "" and warnings == []


def test_a_sender_faster_than_the_server_waits_once_more_than_most_waiting_records_wait():
    """most_waiting: the sender goes on while at most that many records wait; the send that finds more
    waits until they are delivered, so that no wait for them (a save of the search state) grows without
    bound. A slow server: each record takes 0.2 s."""
    delivered = []
    outbox = Outbox(on_error=lambda what, error: None, in_background=True, most_waiting=3)

    def slow(name: str) -> None:
        time.sleep(0.2)
        delivered.append(name)

    took = []
    for number in range(8):
        started = time.monotonic()
        outbox.send(str(number), lambda name=str(number): slow(name))
        took.append(time.monotonic() - started)
    # up to 3 waiting (the one being delivered among them), the sender goes on; the 4th send waits until
    # all 4 are delivered (0.8 s), and so on
    assert [seconds > 0.3 for seconds in took] == [False, False, False, True] * 2, took
    assert max(took[:3] + took[4:7]) < 0.1 and delivered[:4] == ["0", "1", "2", "3"]
    assert outbox.flush() and delivered == [str(n) for n in range(8)]  # in order, all of them


def test_what_the_server_did_not_take_waits_in_order_and_is_delivered_when_it_answers():
    answering_after, delivered, warnings = time.monotonic() + 0.6, [], []
    outbox = Outbox(retry_every_s=0.1, on_error=lambda what, error: warnings.append(what), in_background=True)

    def record(name: str) -> None:
        if time.monotonic() < answering_after:
            raise requests.exceptions.ConnectionError("Max retries exceeded: connection refused")
        delivered.append(name)

    for name in ("a", "b", "c"):
        outbox.send(name, lambda name=name: record(name))
    time.sleep(0.2)
    assert delivered == [] and outbox.undelivered().startswith("3 records not delivered (a, b, c)")
    assert outbox.deliver(patience_s=5)
    assert delivered == ["a", "b", "c"] and warnings == []


def test_a_record_the_server_refuses_is_handed_to_on_error_and_the_rest_go_on():
    delivered, warnings = [], []
    outbox = Outbox(on_error=lambda what, error: warnings.append((what, str(error))), in_background=True)

    def refused() -> None:
        raise ValueError("RESOURCE_DOES_NOT_EXIST: run 123")

    outbox.send("a tag of run 123", refused)
    outbox.send("the outcome of trial 7", lambda: delivered.append("outcome"))
    assert outbox.deliver(patience_s=5)
    assert warnings == [("a tag of run 123", "RESOURCE_DOES_NOT_EXIST: run 123")] and delivered == ["outcome"]


def test_a_background_outbox_needs_somewhere_to_put_its_errors():
    with pytest.raises(ValueError, match="on_error"):
        Outbox(in_background=True)


def test_a_file_waits_in_a_copy_of_its_own_and_no_folder_outlives_its_delivery(tmp_path, monkeypatch):
    """Trial processes are killed by Ray without notice: nothing but undelivered copies stays behind."""
    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(spool))
    picture = tmp_path / "epoch_0001.png"
    picture.write_bytes(b"a picture")
    answering, logged = False, []

    class Server:
        def log_artifact(self, run_id, local_path, artifact_path):
            if not answering:
                raise requests.exceptions.ConnectionError("Max retries exceeded: connection refused")
            logged.append((run_id, open(local_path, "rb").read(), artifact_path))

    outbox = Outbox(retry_every_s=0.0)
    outbox.send_file(picture, "images", Server(), "run-1")
    picture.unlink()  # the trial goes on: the copy is what waits
    assert [p.read_bytes() for p in spool.rglob("*.png")] == [b"a picture"] and logged == []
    answering = True
    assert outbox.deliver(patience_s=5)
    assert logged == [("run-1", b"a picture", "images")] and list(spool.iterdir()) == []


def failing(error: BaseException):
    def call():
        failing.calls += 1
        raise error
    return call


def test_patiently_tries_again_only_what_does_not_answer_and_only_up_to_its_patience():
    attempts = []

    def answers_at_the_third_try() -> str:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise OSError("AWS Error NETWORK_CONNECTION during PutObject")
        return "stored"

    def down(error: BaseException) -> bool:  # what the storage's errors say (search.storage.storage_unreachable)
        return "NETWORK_CONNECTION" in str(error)

    assert patiently(answers_at_the_third_try, 10, retry_every_s=0.1, transient=down) == "stored"
    assert len(attempts) == 3 and attempts[2] - attempts[0] >= 0.2
    failing.calls = 0
    with pytest.raises(PermissionError):  # a refusal is not waited out
        patiently(failing(PermissionError("AccessDenied")), 10, retry_every_s=0.1, transient=down)
    assert failing.calls == 1
    started = time.monotonic()
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):  # past the patience, the last error
        patiently(failing(OSError("AWS Error NETWORK_CONNECTION")), 0.5, retry_every_s=0.1, transient=down)
    assert 0.5 <= time.monotonic() - started < 2
    with pytest.raises(requests.exceptions.ConnectionError):  # by default: the tracking server's errors
        patiently(failing(requests.exceptions.ConnectionError("refused")), 0.3, retry_every_s=0.1)
