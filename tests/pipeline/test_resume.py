"""Driver death and resume: ``shardgen run`` killed mid-job (the driver and the local Ray cluster it started, all at
once, as when its machine goes away), then the same command run again, gives what an uninterrupted run gives."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.dataset as pads
import pytest

from shardgen.jobs.demo import demo_assets
from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def command(model: Path, prompts: Path, output: Path) -> list[str]:
    return [sys.executable, "-m", "shardgen.jobs.generate", "--model", str(model), "--input", str(prompts), "--output",
            str(output), "--batch-size", "8", "--max-new-tokens", "24"]


def environment() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)  # each run starts its own local cluster
    return env


def rows(output: Path) -> dict[str, dict]:
    table = pads.dataset(output, format="parquet").to_table().to_pylist()
    ids = [r["id"] for r in table]
    assert len(ids) == len(set(ids)), "an id appears twice"
    return {r["id"]: r for r in table}


def kill_tree(pid: int) -> int:
    """SIGKILL a process and every process under it; returns how many."""
    root = psutil.Process(pid)
    procs = [*root.children(recursive=True), root]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    return len(procs)


def test_a_killed_driver_is_resumed_by_the_same_command(tmp_path):
    model, prompts = demo_assets()
    want = {json.loads(line)["id"] for line in prompts.read_text().splitlines()}
    calm = subprocess.run(command(model, prompts, tmp_path / "calm"), cwd=ROOT, env=environment(),
                          capture_output=True, text=True, timeout=600)
    assert calm.returncode == 0, calm.stderr[-3000:]

    out = tmp_path / "out"
    driver = subprocess.Popen(command(model, prompts, out), cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(out.glob("part-*.parquet")) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert driver.poll() is None, "the run ended before it could be killed"
    killed = kill_tree(driver.pid)
    before = rows(out)
    assert 0 < len(before) < len(want)

    again = subprocess.run(command(model, prompts, out), cwd=ROOT, env=environment(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    print(f"killed the driver and {killed - 1} Ray processes with {len(before)} of {len(want)} rows written; "
          f"the rerun said: {[line for line in again.stdout.splitlines() if 'rows' in line]}")
    assert f"{len(before)} rows were there already" in again.stdout
    assert f"shardgen run: {len(want) - len(before)} rows (0 errors)" in again.stdout
    resumed, reference = rows(out), rows(tmp_path / "calm")
    assert set(resumed) == set(reference) == want
    assert all(resumed[i]["completion_token_ids"] == reference[i]["completion_token_ids"] for i in want)
    assert not list(out.glob(".*.tmp")), "a partial write was left behind"
