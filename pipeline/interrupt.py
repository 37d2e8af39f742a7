"""Ctrl-C and SIGTERM during a run: the finished rows are written, then the run stops and says what is safe.

The first signal asks every generate stage (through the run's ``RunControl`` actor) to write the rows it has
finished and return; once the output directory has been quiet for a moment (at most ``GRACE_S``), the driver
stops the dataset. A second signal stops at once. Rerunning the same command resumes from what is on disk.
"""

from __future__ import annotations

import _thread
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

GRACE_S = 15.0  # longest wait for the stages' last writes after a stop
QUIET_S = 2.0  # the output is taken as complete once no part file has appeared for this long


class Interrupted(RuntimeError):
    """The run was stopped by a signal; the message says what is safe on disk and how to resume."""


class RunControl:
    """A Ray actor per run that the generate stages poll (has the run been asked to stop?) and tell how many tokens
    their engines generated (for the progress line), the hardware layout their replicas run and how many prompt
    tokens came from the prefix cache (for the summary)."""

    def __init__(self) -> None:
        self._stopping = False
        self._generated: dict[str, int] = {}
        self._cached: dict[str, int] = {}
        self._layouts: dict[str, str] = {}

    def report(self, stage: str, generated_tokens: int, layout: str, cached_tokens: int = 0) -> None:
        self._generated[stage] = generated_tokens
        self._cached[stage] = cached_tokens
        self._layouts[stage] = layout

    def generated(self) -> int:
        return sum(self._generated.values())

    def cached(self) -> int:
        return sum(self._cached.values())

    def layouts(self) -> list[str]:
        return sorted(set(self._layouts.values()))

    def stop(self) -> None:
        self._stopping = True

    def stopping(self) -> bool:
        return self._stopping


def control_name(run_id: str) -> str:
    return f"shardgen-control-{run_id}"


def start_control(run_id: str):
    import ray

    return ray.remote(RunControl).options(name=control_name(run_id), num_cpus=0).remote()


class Stop:
    """Whether a signal asked the run to stop (the dataset may finish on its own while the stages return)."""

    def __init__(self) -> None:
        self.requested = False
        self.done = threading.Event()  # the guarded block is over: a late drain must not interrupt anything
        self.lock = threading.Lock()  # the drain's last check and its interrupt, against the block's end


@contextmanager
def stop_on_signals(control, files_on_disk: Callable[[], int], echo: Callable[[str], None]) -> Iterator[Stop]:
    """While the block runs, SIGINT/SIGTERM stop the run gracefully (see the module docstring): the block then
    raises KeyboardInterrupt in the main thread, or ends with ``Stop.requested`` set. Outside the main thread
    (tests calling ``run``), signals are left alone."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def drain() -> None:
        started = last_change = time.monotonic()
        files = files_on_disk()
        while time.monotonic() - started < GRACE_S and time.monotonic() - last_change < QUIET_S:
            if stop.done.wait(0.25):
                return
            now = files_on_disk()
            if now != files:
                files, last_change = now, time.monotonic()
        with stop.lock:
            if not stop.done.is_set():
                _thread.interrupt_main()  # handled by on_signal, still installed: the block raises

    def on_signal(signum: int, frame: object) -> None:
        if stop.requested:  # a second signal (or the drain's): stop now
            raise KeyboardInterrupt
        stop.requested = True
        echo(f"\nshardgen: {signal.Signals(signum).name}: writing the rows that are finished, then stopping "
             f"(again to stop at once)")
        control.stop.remote()
        threading.Thread(target=drain, daemon=True, name="shardgen-drain").start()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        try:
            with stop.lock:  # a drain's interrupt pending here is raised here, and the run reports it
                stop.done.set()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
