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
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                    "--num-cpus=2",  # what a plain `ray start --head` gives a 2-core machine: enough for tp 1
                    "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=120)
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
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)
    local = subprocess.run([str(BIN / "shardgen"), "run", *args, "--output", str(tmp_path / "local")],
                           env=_env(tmp_path / "local-token"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr[-3000:]
    assert _rows(tmp_path / "job") == _rows(tmp_path / "local")
