"""benchmarks/scale.py's timer of the MLflow server's HTTP requests, as its clients see them.

scale.py puts this folder on PYTHONPATH for a search on a server stack, so that every Python process
of the search (the driver, Ray's workers, the trial actors) runs it at start-up: with
AESEARCH_SCALE_REQUESTS set, each `requests` call to the URL it names (the tracking server) adds a
line to a file of that process's own in the folder AESEARCH_SCALE_REQUEST_LOG: its start (Unix
time), its seconds, method, path and status (or the exception's name), tab-separated. MLflow's
client makes every call, artifacts included, through `requests.Session.request`.
"""

import os


def install() -> None:
    import time

    import requests.sessions

    timed_url, folder = os.environ["AESEARCH_SCALE_REQUESTS"], os.environ["AESEARCH_SCALE_REQUEST_LOG"]
    request = requests.sessions.Session.request
    log = []  # the file, opened at the first timed request

    def timed(session, method, url, *args, **kwargs):
        if not str(url).startswith(timed_url):
            return request(session, method, url, *args, **kwargs)
        started, clock = time.time(), time.perf_counter()
        outcome = "error"
        try:
            response = request(session, method, url, *args, **kwargs)
            outcome = str(response.status_code)
            return response
        except BaseException as error:
            outcome = type(error).__name__
            raise
        finally:
            if not log:
                log.append(open(f"{folder}/{os.getpid()}.tsv", "a", buffering=1))  # noqa: SIM115 - a line each
            path = str(url)[len(timed_url):].split("?")[0]
            log[0].write(f"{started:.3f}\t{time.perf_counter() - clock:.6f}\t{method}\t{path}\t{outcome}\n")

    requests.sessions.Session.request = timed


if os.environ.get("AESEARCH_SCALE_REQUESTS"):
    install()
