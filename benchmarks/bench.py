"""The GPU benchmark of the GPU issue: same as ``shardgen bench`` (see ``jobs/bench.py``); takes the same options.

    python benchmarks/bench.py --workloads decode-heavy --scale 0.1
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jobs.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["bench", *sys.argv[1:]])
