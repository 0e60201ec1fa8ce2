"""Progress of long passes: a tqdm bar on a terminal, a line at intervals in logs.

``progress(total, desc, unit, enabled)`` is a context manager yielding an object with ``update(n)``.  On a terminal
(stderr is a TTY) it is a tqdm bar that clears itself; otherwise (CI logs, files, pipes) it writes one line to stderr
every ``interval`` seconds, ``[fxcompress] calibrate: 40/128 batch, 12 s``, and a last line when a pass that wrote
any finishes.  ``enabled=False`` shows nothing; ``True`` forces the bar; ``None`` decides by the terminal.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator

from tqdm import tqdm

INTERVAL = 30.0  # seconds between log lines


class _Lines:
    def __init__(self, total: int | None, desc: str, unit: str, interval: float):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n, self.start = 0, time.perf_counter()
        self.last, self.written = self.start, False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            self.write(now)

    def write(self, now: float) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        print(f"[fxcompress] {self.desc}: {self.n}{of} {self.unit}, {now - self.start:.0f} s", file=sys.stderr,
              flush=True)
        self.written = True

    def close(self) -> None:
        if self.written:
            self.write(time.perf_counter())


class _Nothing:
    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def progress(total: int | None, desc: str, unit: str, enabled: bool | None = None,
             interval: float = INTERVAL) -> Iterator[tqdm | _Lines | _Nothing]:
    if enabled is False:
        yield _Nothing()
        return
    if enabled or sys.stderr.isatty():
        with tqdm(total=total, unit=unit, desc=desc, leave=False) as bar:
            yield bar
        return
    lines = _Lines(total, desc, unit, interval)
    try:
        yield lines
    finally:
        lines.close()
