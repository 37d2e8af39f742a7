"""The filter on what native code writes to stderr: Ray's known noise goes, everything else stays, in order."""

import subprocess
import sys

from tests.helpers import ROOT


SCRIPT = """
import os, sys
from shardgen.jobs.native_stderr import RAY_NOISE, start_filter, stop_filter
start_filter()
os.write(2, b"[E core_worker.cc] Actor X " + RAY_NOISE[0].encode() + b". See ray#53727\\n")
os.write(2, b"native line kept\\n")
print("python line kept", file=sys.stderr)
os.write(2, b"last native line, no newline")
stop_filter()
os.write(2, b"\\nafter the filter\\n")
"""


def run_script(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_rays_constructor_arguments_line_is_dropped_and_other_native_lines_pass():
    r = run_script(SCRIPT)
    assert r.returncode == 0, r.stderr
    assert "constructor arguments in the object store" not in r.stderr
    for line in ("native line kept", "python line kept", "last native line, no newline", "after the filter"):
        assert line in r.stderr, r.stderr
    assert r.stderr.index("last native line") < r.stderr.index("after the filter")  # stop waits for the child


def test_native_lines_written_just_before_a_crash_still_arrive():
    r = run_script("import os\nfrom jobs.native_stderr import start_filter\nstart_filter()\n"
                   "os.write(2, b'fatal: check failed\\n')\nos.abort()")
    assert r.returncode != 0
    assert "fatal: check failed" in r.stderr, r.stderr


def test_rays_raylet_warnings_printed_to_stdout_are_dropped_and_other_lines_pass():
    import io

    from shardgen.jobs.native_stderr import DropLines

    out = io.StringIO()
    stream = DropLines(out)
    print("(raylet) WARNING: 8 PYTHON worker processes have been started on node: n with address: a", file=stream)
    print("shardgen run: 200 rows", file=stream)
    print("", file=stream)  # a blank line of our own stays
    assert out.getvalue() == "shardgen run: 200 rows\n\n"
