"""What the shardgen process does around its commands: how it exits, where it keeps its cache, and the library
notices it drops."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable

from shardgen.jobs.native_stderr import stop_filter


class _DropTorchaoCppNotice(logging.Filter):
    """torchao logs that its own C++ CPU ops are skipped; shardgen does not use them (int4 runs on fbgemm or dequantized)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping import of cpp extensions" not in record.getMessage()


logging.getLogger("torchao").addFilter(_DropTorchaoCppNotice())


def run_then_exit(entry: Callable[[], object]) -> None:
    """Run a command line entry point, then ``quick_exit`` with its exit status."""
    try:
        entry()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    quick_exit(code)


def quick_exit(code: int) -> None:
    """Stop Ray if this process uses it, flush, and leave without the interpreter's teardown."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    stop_filter()
    os._exit(code)


def user_cache_dir() -> Path:
    """Where shardgen keeps what it measures once per machine (int4 kernel timings): $XDG_CACHE_HOME/shardgen."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shardgen"
