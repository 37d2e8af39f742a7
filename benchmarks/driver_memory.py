"""The driver's memory on big inputs (CPU, the demo model): resume over 1,000,000 finished rows, and a run over
100,000 short prompts. Prints the driver's resident memory at the start and its peak, and writes
``benchmarks/results/driver_memory.json``.

    python -m benchmarks.driver_memory resume --finished 1000000 --todo 100
    python -m benchmarks.driver_memory load --prompts 100000
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import threading
import time
from pathlib import Path


import pyarrow as pa
import pyarrow.parquet as pq

from shardgen.actors.engine.sequence import SamplingParams
from shardgen.jobs.demo import demo_assets
from shardgen.pipeline import output_dir
from shardgen.pipeline.columns import OUTPUT_SCHEMA
from shardgen.pipeline.options import RunOptions
from shardgen.pipeline.plan import connect, run_manifest
from shardgen.pipeline.run import run

MiB = 2**20


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Sampler:
    """The driver's resident memory every half second while a run goes on."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._start = time.perf_counter()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self.samples.append((round(time.perf_counter() - self._start, 1), round(rss_mib(), 1)))

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def write_prompts(path: Path, n: int, rows_per_file: int = 100_000) -> None:
    path.mkdir(parents=True)
    for start in range(0, n, rows_per_file):
        ids = [f"row-{i:09d}" for i in range(start, min(n, start + rows_per_file))]
        pq.write_table(pa.table({"id": ids, "prompt": [f"def f{i % 97}(" for i in range(len(ids))]}),
                       path / f"prompts-{start // rows_per_file:05d}.parquet")


def write_finished(output: Path, options: RunOptions, n: int, rows_per_file: int = 100_000) -> None:
    """An output that already holds rows 0..n-1, as a run killed after writing them would have left it."""
    output.mkdir(parents=True)
    for start in range(0, n, rows_per_file):
        k = min(n, start + rows_per_file) - start
        table = pa.table({
            "id": [f"row-{i:09d}" for i in range(start, start + k)], "prompt": ["def f("] * k, "completion": ["x"] * k,
            "completion_token_ids": [[120]] * k, "prompt_tokens": [6] * k, "completion_tokens": [1] * k,
            "finish_reason": ["length"] * k, "error": [None] * k, "logprobs": [None] * k, "top_logprobs": [None] * k,
            "prompt_logprobs": [None] * k},
            schema=OUTPUT_SCHEMA)
        pq.write_table(table, output / f"{output_dir.PART_PREFIX}synthetic-{start // rows_per_file:05d}.parquet")
    output_dir.write_manifest(output, run_manifest(options))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["resume", "load"])
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--todo", type=int, default=100)
    parser.add_argument("--prompts", type=int, default=100_000)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/driver_memory.json"))
    a = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shardgen-driver-memory-"))
    model, _ = demo_assets()
    total = a.finished + a.todo if a.mode == "resume" else a.prompts
    write_prompts(tmp / "in", total)
    options = RunOptions(model=model, input=tmp / "in", output=tmp / "out", batch_size=256,
                         sampling=SamplingParams(max_new_tokens=1))
    if a.mode == "resume":
        write_finished(tmp / "out", options, a.finished)
    connect(options)
    start_rss = rss_mib()
    t0 = time.perf_counter()
    with Sampler() as sampler:
        summary = run(options)
    result = {
        "mode": a.mode, "input_rows": total, "finished_before": a.finished if a.mode == "resume" else 0,
        "rows_written": summary.rows, "resumed": summary.resumed, "errors": summary.errors,
        "wall_s": round(time.perf_counter() - t0, 1), "driver_rss_start_mib": round(start_rss, 1),
        "driver_rss_peak_mib": round(max([start_rss] + [s for _, s in sampler.samples]), 1),
        "driver_maxrss_mib": round(peak_mib(), 1), "rss_samples": sampler.samples[:: max(1, len(sampler.samples) // 60)],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rss_samples"}))
    earlier = json.loads(a.results.read_text()) if a.results.exists() else {}
    earlier[a.mode] = result
    a.results.parent.mkdir(parents=True, exist_ok=True)
    a.results.write_text(json.dumps(earlier, indent=2))


if __name__ == "__main__":
    main()
