"""Load the bench's 8B int4 checkpoint onto the GPU in a fresh process and report time to ready and the host
memory it took: peak resident set (VmHWM) growth over the process before loading, against the rank's slice.

    python -m benchmarks.load_host_memory [CHECKPOINT_DIR]   # default: the one `shardgen bench` writes
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from shardgen.actors.model.checkpoint import Checkpoint
from shardgen.actors.model.loader import load_model


def vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/shardgen-bench-llama8b-int4")
    torch.zeros(1, device="cuda")  # CUDA context first: it is not the checkpoint's memory
    with Checkpoint(path) as ckpt:
        slice_bytes = sum(f.stat().st_size for f in ckpt.files)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM, so the peak is the load's own
    except OSError:
        pass
    before = vm("VmRSS")
    start = time.perf_counter()
    loaded = load_model(path, device="cuda")
    ready = time.perf_counter() - start
    row = {"device": torch.cuda.get_device_name(), "checkpoint_gib": round(slice_bytes / 2**30, 2),
           "read_s": round(loaded.load_s, 2), "convert_s": round(loaded.convert_s, 2), "ready_s": round(ready, 2),
           "host_peak_growth_gib": round((vm("VmHWM") - before) / 2**30, 2),
           "ratio_to_slice": round((vm("VmHWM") - before) / slice_bytes, 3)}
    print(json.dumps(row))
    out = Path(__file__).parent / "results" / f"load_host_memory-{row['device'].replace(' ', '_')}.json"
    out.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
