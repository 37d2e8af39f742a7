"""The run's progress line: rows on disk / total, generated tokens/s, ETA.

Rows are counted from the Parquet files as they land (not what Ray Data says it scheduled): a row in a part file
survives an interrupted run. Generated tokens are counted as the engines report them (``tokens``), so the rate is
right from the first decode step, long before the first row is written. The ETA extrapolates the rows written
since the first ones landed (start-up and the first wave's latency left out). In a terminal the line is redrawn in
place every second, cut to the terminal's width; redirected to a file, a line is printed every ``interval_s``
seconds, and once at the end.
"""

from __future__ import annotations

import shutil
import threading
import time
from typing import Callable, TextIO

from shardgen.pipeline.stages import write
from shardgen.pipeline.storage import Location, Where


class Progress:
    """Watches ``output`` for part files that were not there at ``start`` (a resumed run counts only its own)."""

    def __init__(self, output: Where, total_rows: int | None, stream: TextIO, interactive: bool | None = None,
                 interval_s: float = 15.0, poll_s: float = 1.0, tokens: Callable[[], int] | None = None) -> None:
        self.output = Location.of(output)
        self.tokens = tokens  # tokens the engines have generated so far (None: count the part files' only)
        self.engine_tokens = 0
        self.total_rows = total_rows  # None: too big to count cheaply, so no ETA
        self.stream = stream
        self.interactive = stream.isatty() if interactive is None else interactive
        self.interval_s = interval_s
        self.poll_s = poll_s
        self.written = write.WriteStats()  # of the part files this run wrote
        self._seen = {f.path for f in write.existing_output(self.output)}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.perf_counter()
        self._last_line = 0.0
        self._first_rows: tuple[float, int] | None = None  # (when, rows) at the first poll that found rows

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
        if self.interactive:
            # Redrawn over itself: padding wipes what a longer line left; a line wider than the terminal would
            # wrap, and the carriage return would then redraw only its last part.
            width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
            line = "\r" + line[:width].ljust(width)
        self.stream.write(line + end)
        self.stream.flush()

    def poll(self) -> None:
        """Add the rows and generated tokens of part files that appeared since the last poll."""
        for path in write.existing_output(self.output):
            if path.path in self._seen:
                continue
            try:
                stats = write.read_stats(path)
            except (OSError, ValueError):  # vanished (an --overwrite elsewhere) or unreadable: counted if it returns
                continue
            self._seen.add(path.path)
            self.written.add(stats)
        if self.rows and self._first_rows is None:
            self._first_rows = (time.perf_counter(), self.rows)
        if self.tokens is not None:
            try:
                self.engine_tokens = max(self.engine_tokens, self.tokens())
            except Exception:  # a busy or finished cluster: the part files' count stands in
                pass

    @property
    def rows(self) -> int:
        """Input rows answered (a row's n samples count once)."""
        return self.written.inputs

    def line(self) -> str:
        now = time.perf_counter()
        elapsed = max(now - self._started, 1e-9)
        generated = max(self.engine_tokens, self.written.completion_tokens)
        if self.total_rows:
            done = min(self.rows, self.total_rows)
            rows = f"rows {done:,}/{self.total_rows:,} ({100 * done / self.total_rows:.0f}%)"
            left = self.total_rows - done
            eta = ""
            if self._first_rows is not None and left > 0 and self.rows > self._first_rows[1]:
                rate = (self.rows - self._first_rows[1]) / max(now - self._first_rows[0], 1e-9)
                eta = f", ETA {_duration(left / rate)}"
        else:
            rows, eta = f"rows {self.rows:,}", ""
        return f"shardgen: {rows}, {generated / elapsed:,.0f} generated tok/s, {_duration(elapsed)} elapsed{eta}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min"
