"""The run's progress line: rows on disk / total, generated tokens/s, ETA, counted from the Parquet files as they land.

Counting what is written (not what Ray Data says it scheduled) is what the user can rely on: a row in a part file
survives an interrupted run. In a terminal the line is redrawn in place every second; redirected to a file, a line
is printed every ``interval_s`` seconds, and once at the end.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TextIO

from pipeline import write


class Progress:
    """Watches ``output`` for part files that were not there at ``start`` (a resumed run counts only its own)."""

    def __init__(self, output: Path, total_rows: int | None, stream: TextIO, interactive: bool | None = None,
                 interval_s: float = 15.0, poll_s: float = 1.0) -> None:
        self.output = output
        self.total_rows = total_rows  # None: too big to count cheaply, so no ETA
        self.stream = stream
        self.interactive = stream.isatty() if interactive is None else interactive
        self.interval_s = interval_s
        self.poll_s = poll_s
        self.written = write.WriteStats()  # of the part files this run wrote
        self._seen: set[Path] = set(write.existing_output(output))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.perf_counter()
        self._last_line = 0.0

    def start(self) -> "Progress":
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="shardgen-progress")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Count what landed last and print the final line (ends a redrawn line with a newline)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.poll()
        self._show(self.line(), end="\n")

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()
            now = time.perf_counter()
            if self.interactive:
                self._show(self.line(), end="")
            elif now - self._last_line >= self.interval_s:
                self._last_line = now
                self._show(self.line(), end="\n")

    def _show(self, line: str, end: str) -> None:
        # In a terminal the line is redrawn over itself; padding wipes what a longer line left behind.
        self.stream.write(("\r" + line.ljust(100) if self.interactive else line) + end)
        self.stream.flush()

    def poll(self) -> None:
        """Add the rows and generated tokens of part files that appeared since the last poll."""
        for path in write.existing_output(self.output):
            if path in self._seen:
                continue
            try:
                stats = write.read_stats(path)
            except (OSError, ValueError):  # vanished (an --overwrite elsewhere) or unreadable: counted if it returns
                continue
            self._seen.add(path)
            self.written.add(stats)

    @property
    def rows(self) -> int:
        return self.written.rows

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        rate = self.rows / elapsed
        if self.total_rows:
            done = min(self.rows, self.total_rows)
            rows = f"rows {done:,}/{self.total_rows:,} ({100 * done / self.total_rows:.0f}%)"
            left = self.total_rows - done
            eta = f", ETA {_duration(left / rate)}" if rate > 0 and left > 0 else ""
        else:
            rows, eta = f"rows {self.rows:,}", ""
        return f"shardgen: {rows}, {self.written.completion_tokens / elapsed:,.0f} generated tok/s, {_duration(elapsed)} elapsed{eta}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min"
