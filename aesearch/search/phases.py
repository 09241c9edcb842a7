"""Where a command's time goes: named phases from its start to now.

`aesearch search` prints them on its last line (`aesearch: time: ...`), so a user who waits
sees what for, and benchmarks/search_overhead.py reads them.
"""

from __future__ import annotations

import time


class Phases:
    """Marks in order; each phase runs from the previous mark (the first, from `started`: for the
    command line, when `aesearch.cli` was imported, before any of the heavy imports)."""

    def __init__(self, started: float | None = None) -> None:
        self.marks: list[tuple[str, float]] = [("start", time.time() if started is None else started)]

    def mark(self, phase: str) -> None:
        """`phase` ends now."""
        self.marks.append((phase, time.time()))

    def seconds(self) -> dict[str, float]:
        return {name: end - start for (_, start), (name, end) in zip(self.marks, self.marks[1:])}

    def line(self) -> str:
        spent = self.seconds()
        parts = " | ".join(f"{name} {seconds:.1f} s" for name, seconds in spent.items())
        return f"{parts} = {sum(spent.values()):.1f} s"
