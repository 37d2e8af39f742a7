"""``ray job submit -- python -m shardgen.jobs.generate`` against a local head (loopback) gives what ``shardgen run`` gives."""

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from shardgen.actors.model.distributed import free_port
from shardgen.jobs.demo import demo_assets
from tests.helpers import ROOT

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _env(token_file: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this environment's
    # Ray 2.60 clusters require a token by default; the head and the job client share this one.
    token_file.write_text(secrets.token_hex(32))
    env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN_PATH"] = "token", str(token_file)
    return env


def _stop_head(temp_dir: str, address: str) -> None:
    """Stop the head this test started (``--temp-dir``; the client server names only its ``address``) and every
    process under it. ``ray stop`` would stop every Ray on the machine: a user's cluster, or a test run beside."""
    import psutil

    mine = [p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid()
            and any(temp_dir in a or a.endswith(address) for a in p.info["cmdline"] or [])]
    family = set(mine)
    for p in mine:
        try:
            family.update(p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for signal_ in ("terminate", "kill"):  # kill what a terminate left alive after 15 s
        for p in family:
            try:
                getattr(p, signal_)()
            except psutil.NoSuchProcess:
                pass
        family = psutil.wait_procs(family, timeout=15)[1]


def _rows(path: Path) -> dict[str, list[int]]:
    rows = pads.dataset(path).to_table().to_pylist()
    assert len(rows) == len({r["id"] for r in rows})
    return {r["id"]: r["completion_token_ids"] for r in rows}


def test_ray_job_submit_gives_the_same_output_as_shardgen_run(tmp_path):
    model, prompts = demo_assets()
    args = ["--model", str(model), "--input", str(prompts), "--max-new-tokens", "8", "--batch-size", "32"]
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dashboard = free_port(), free_port()
    env = _env(tmp_path / "ray-token")
    # Every port a head listens on is a free one, not Ray's default: another Ray on this machine (a test run
    # beside this one) holds the defaults (the client server's 10001, the agents'), and `ray start` fails on them.
    ports = [f"--{name}-port={free_port()}" for name in ("ray-client-server", "dashboard-agent-listen",
                                                         "dashboard-agent-grpc", "runtime-env-agent",
                                                         "metrics-export", "node-manager", "object-manager")]
    start = subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", *ports,
                            "--num-cpus=2",  # what a plain `ray start --head` gives a 2-core machine: enough for tp 1
                            "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, f"ray start failed:\n{start.stdout[-3000:]}\n{start.stderr[-3000:]}"
    try:
        # The head's job agent starts after `ray start` returns; a submission before it is up is refused with
        # "No available agent" (and no job is created), so wait for it as a user would, by trying again.
        deadline = time.monotonic() + 180
        while True:
            job = subprocess.run(
                [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir",
                 str(ROOT), "--", "python", "-m", "shardgen.jobs.generate", *args, "--output", str(tmp_path / "job")],
                env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in job.stdout + job.stderr or time.monotonic() > deadline:
                break
            time.sleep(5)
        print(job.stdout[-2000:])
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "shardgen run: 200 rows (0 errors)" in job.stdout
    finally:
        _stop_head(temp_dir, f"127.0.0.1:{port}")
        shutil.rmtree(temp_dir, ignore_errors=True)
    local = subprocess.run([str(BIN / "shardgen"), "run", *args, "--output", str(tmp_path / "local")],
                           env=_env(tmp_path / "local-token"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr[-3000:]
    assert _rows(tmp_path / "job") == _rows(tmp_path / "local")
