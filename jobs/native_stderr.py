"""A line filter on what native code (Ray's C++ core worker) writes to this process's stderr.

Ray's core worker logs some ERROR lines straight to file descriptor 2, from C++, once per process: no Python logger
carries them, so ``logging`` cannot silence them. The one a shardgen run always hit says an actor "has constructor
arguments in the object store and max_restarts > 0" (ray-project/ray#53727). Ray Data passes its map actors
object-store references that it keeps alive for the whole operator, so the hazard it warns of cannot happen, and
turning restarts off to silence it would lose Ray Data's recovery from a dead actor.

Ray's driver also prints the raylet's warnings to ``sys.stdout`` from a thread of its own (``(raylet) WARNING: 8
PYTHON worker processes have been started ...``): while the filter runs, ``sys.stdout`` drops those lines too.

While the filter runs, descriptor 2 is a pipe into a small child process that copies every line to the real stderr
except the known noise; Python's ``sys.stderr`` (progress redraws, messages, tracebacks) writes to the real stderr
directly. The child runs in its own session, so a Ctrl-C meant for shardgen does not stop it, and it outlives a
crash of this process long enough to pass on the crash's last lines.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

RAY_NOISE = (
    "has constructor arguments in the object store and max_restarts > 0",
    # The raylet's note that it started many worker processes at once: Ray Data's actor pools and the replicas'
    # rank actors start together by design.
    "PYTHON worker processes have been started on node",
)

_COPY_LINES = """
import sys
drop = [s.encode() for s in sys.argv[1:]]
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    if not any(d in line for d in drop):
        out.write(line)
        out.flush()
"""


class NativeStderrFilter:
    """Drops lines containing any of ``drop`` from what is written to descriptor 2 until ``stop``."""

    def __init__(self, drop: tuple[str, ...] = RAY_NOISE) -> None:
        self.drop = drop
        self._real: int | None = None
        self._child: subprocess.Popen | None = None

    def start(self) -> "NativeStderrFilter":
        sys.stderr.flush()
        real = os.dup(2)
        read_end, write_end = os.pipe()
        self._child = subprocess.Popen([sys.executable, "-I", "-S", "-c", _COPY_LINES, *self.drop], stdin=read_end,
                                       stdout=real, start_new_session=True, close_fds=True)
        os.close(read_end)
        os.dup2(write_end, 2)
        os.close(write_end)
        os.set_inheritable(real, False)
        self._real = real
        sys.stderr = io.TextIOWrapper(io.FileIO(os.dup(real), "w"), encoding=sys.stderr.encoding,
                                      errors="backslashreplace", line_buffering=True, write_through=True)
        return self

    def stop(self, timeout_s: float = 2.0) -> None:
        """Give descriptor 2 back to the real stderr and let the child pass on what it still holds. ``sys.stderr``
        stays on its own copy of the real stderr, so a late write through it still lands."""
        if self._real is None:
            return
        sys.stderr.flush()
        os.dup2(self._real, 2)  # closes this process's write end of the pipe: the child reads to its end
        os.close(self._real)
        self._real = None
        try:
            self._child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:  # a process started from here still holds the pipe open
            self._child.kill()


class DropLines:
    """A text stream that passes everything to ``stream`` except writes holding any of ``drop`` (and the newline
    ``print`` writes after one)."""

    def __init__(self, stream, drop: tuple[str, ...] = RAY_NOISE) -> None:
        self.stream, self.drop = stream, drop
        self._dropped = False

    def write(self, text: str) -> int:
        if any(d in text for d in self.drop):
            self._dropped = True
            return len(text)
        if self._dropped and text == "\n":
            self._dropped = False
            return 1
        self._dropped = False
        return self.stream.write(text)

    def __getattr__(self, name: str):  # flush, isatty, encoding, fileno, ...: the stream's own
        return getattr(self.stream, name)


_active: NativeStderrFilter | None = None


def start_filter() -> None:
    """Filter Ray's noise from this process's stderr and stdout (once; a no-op when stderr is captured, as in
    tests)."""
    global _active
    if _active is None and sys.stderr is sys.__stderr__:
        _active = NativeStderrFilter().start()
        sys.stdout = DropLines(sys.stdout)


def stop_filter() -> None:
    global _active
    if _active is not None:
        _active.stop()
        _active = None
        if isinstance(sys.stdout, DropLines):
            sys.stdout = sys.stdout.stream
