"""The driver's memory on big inputs (CPU, the demo model): resume over 1,000,000 finished rows, and a run over
100,000 short prompts. Prints the driver's resident memory at the start and its peak, and writes
``benchmarks/results/driver_memory.json``.

    python -m benchmarks.driver_memory resume --finished 1000000 --todo 100
    python -m benchmarks.driver_memory load --prompts 100000
    python -m benchmarks.driver_memory million --prompts 1000000 --kill-at 0.5

``million`` runs the job as a user would (``shardgen run`` in its own process, on a Ray cluster started with
``ray start --head``), samples the driver's and every Ray worker's resident memory, kills the driver (SIGKILL) once
``--kill-at`` of the rows are written, runs the same command again (it resumes) and checks that every id is written
exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import subprocess
import sys
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
    rss = proc_rss_mib("self")
    assert rss is not None  # this process's own status is always readable
    return rss


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


def proc_rss_mib(pid: int | str) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    except (OSError, StopIteration):
        return None


def ray_workers() -> dict[int, str]:
    """pid -> name (``ray::Rank``, ``ray::MapWorker(...)``, ``ray::IDLE``) of this machine's Ray worker processes."""
    workers = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    name = f.read().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if name.startswith("ray::"):  # ray::ShardWorker.collect while it runs a method: named by its actor
                workers[int(entry)] = re.sub(r"\.[A-Za-z_]\w*$", "", name.split(" ")[0])
    return workers


class PartCounter:
    """Rows written so far: the part files' row counts, each file's footer read once."""

    def __init__(self, output: Path) -> None:
        self.output, self.rows = output, {}

    def __call__(self) -> tuple[int, int]:
        for path in self.output.glob(f"{output_dir.PART_PREFIX}*.parquet"):
            if path.name not in self.rows:
                try:
                    self.rows[path.name] = pq.read_metadata(path).num_rows
                except OSError:  # being replaced by a rename this instant
                    continue
        return sum(self.rows.values()), len(self.rows)


def watch(command: list[str], env: dict[str, str], log: Path, counter: PartCounter, kill_at_rows: int | None,
          every: float) -> dict:
    """Run ``command`` (the driver) to its end, or SIGKILL it once ``kill_at_rows`` rows are written; sample the
    driver's and the Ray workers' memory every ``every`` seconds."""
    t0 = time.perf_counter()
    samples, peaks = [], {}
    with open(log, "w") as out:
        driver = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        killed = False
        while driver.poll() is None:
            time.sleep(every)
            rows, files = counter()
            workers = {pid: (name, proc_rss_mib(pid)) for pid, name in ray_workers().items()}
            by_name: dict[str, float] = {}
            for name, rss in workers.values():
                if rss is not None:
                    by_name[name] = max(by_name.get(name, 0.0), rss)
                    peaks[name] = max(peaks.get(name, 0.0), rss)
            samples.append({"s": round(time.perf_counter() - t0, 1), "rows": rows, "files": files,
                            "driver_rss_mib": round(proc_rss_mib(driver.pid) or 0.0, 1),
                            "workers_rss_mib": round(sum(r for _, r in workers.values() if r), 1),
                            "largest_rss_mib_by_worker": {k: round(v, 1) for k, v in sorted(by_name.items())}})
            print(f"{samples[-1]['s']:8.1f} s {rows:>9,} rows {files:>6} files  driver "
                  f"{samples[-1]['driver_rss_mib']:.0f} MiB  workers {samples[-1]['workers_rss_mib']:.0f} MiB",
                  flush=True)
            if kill_at_rows is not None and rows >= kill_at_rows:
                driver.send_signal(signal.SIGKILL)
                killed = True
        driver.wait()
    rows, files = counter()
    driver_peak = max((s["driver_rss_mib"] for s in samples), default=0.0)
    return {"wall_s": round(time.perf_counter() - t0, 1), "killed": killed, "exit_code": driver.returncode,
            "rows_at_end": rows, "files_at_end": files, "driver_rss_peak_mib": driver_peak,
            "worker_rss_peak_mib": {k: round(v, 1) for k, v in sorted(peaks.items())},
            "samples": samples[:: max(1, len(samples) // 40)] + samples[-1:],
            "log_tail": log.read_text().splitlines()[-6:]}


def million(a: argparse.Namespace, tmp: Path) -> dict:
    """A million rows through ``shardgen run``, its driver killed half-way and resumed."""
    model, _ = demo_assets()
    write_prompts(tmp / "in", a.prompts)
    out = tmp / "out"
    port = 6390 + os.getpid() % 100
    address = f"127.0.0.1:{port}"
    ray = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # a cluster of this machine only, for this benchmark
    subprocess.run([ray, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=3",
                    "--include-dashboard=false", "--disable-usage-stats"], check=True, capture_output=True, env=env)
    command = [sys.executable, "-m", "shardgen.jobs.cli", "run", "--model", str(model), "--input", str(tmp / "in"),
               "--output", str(out), "--max-new-tokens", "1", "--batch-size", "256", "--address", address]
    counter = PartCounter(out)
    try:
        first = watch(command, env, tmp / "first.log", counter, int(a.prompts * a.kill_at) if a.kill_at else None,
                      a.every)
        second = watch(command, env, tmp / "resumed.log", counter, None, a.every) if first["killed"] else None
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env)
    ids = pq.read_table(out, columns=["id", "error"])
    unique = len(set(ids.column("id").to_pylist()))
    return {"mode": "million", "input_rows": a.prompts, "command": " ".join(command[1:]), "kill_at": a.kill_at,
            "first": first, "resumed": second, "rows_written": ids.num_rows, "unique_ids": unique,
            "errors": ids.num_rows - ids.column("error").null_count,
            "every_id_once": ids.num_rows == a.prompts == unique,
            "rows_per_s": round(a.prompts / (first["wall_s"] + (second["wall_s"] if second else 0.0)), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["resume", "load", "million"])
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--todo", type=int, default=100)
    parser.add_argument("--prompts", type=int, default=100_000)
    parser.add_argument("--kill-at", type=float, default=0.5, help="million: share of rows after which the driver "
                        "is killed (0: never)")
    parser.add_argument("--every", type=float, default=5.0, help="million: seconds between memory samples")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/driver_memory.json"))
    a = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shardgen-driver-memory-"))
    if a.mode == "million":
        result = million(a, tmp)
        print(json.dumps({k: v for k, v in result.items() if k not in ("first", "resumed")}))
        save(a.results, result)
        return
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
    save(a.results, result)


def save(path: Path, result: dict) -> None:
    earlier = json.loads(path.read_text()) if path.exists() else {}
    earlier[result["mode"]] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(earlier, indent=2))


if __name__ == "__main__":
    main()
